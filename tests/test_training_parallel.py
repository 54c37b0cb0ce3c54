"""Data parallelism: 1 device and 2 (simulated CPU) devices train the policy to the same params.

XLA's device count is fixed when jax starts, so the comparison runs in subprocesses: one started
with --xla_force_host_platform_device_count=2 trains the smoke policy three steps on the same
global batches from the same key on a 1-device mesh and on a 2-device mesh (XLA's ops for both);
one with a single device trains as a 1-device run does, on the C++ CPU kernels where they build.
"""

import json
import os
import subprocess
import sys
import textwrap

import jax
import numpy as np
from dpjax.training import parallel

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = textwrap.dedent('''
    import json, sys
    import jax, numpy as np
    from configs import lift
    from dpjax.data.normalizer import Normalizer
    from dpjax.data.shape_meta import ShapeMeta
    from dpjax.diffusion.policy import DiffusionPolicy
    from dpjax.models import cpu_kernels
    from dpjax.training import optimizer, parallel, train_state

    num_devices = len(jax.devices())
    config = lift.get_config('smoke')
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    rng = np.random.default_rng(0)
    normalizer = Normalizer.fit({'robot0_eef_pos': rng.random((20, 3)),
                                 'robot0_gripper_qpos': rng.random((20, 2))}, shape_meta)
    policy = DiffusionPolicy(config, shape_meta, normalizer)
    batch_size, to = config.data.batch_size, config.task.n_obs_steps
    def make_batch():  # Full 84x84 images: the encoder random-crops them (rng stream 'crop').
      obs = {s.key: (rng.integers(0, 256, (batch_size, to) + s.shape, dtype=np.uint8)
                     if s.kind == 'rgb' else rng.normal(size=(batch_size, to) + s.shape)
                     .astype(np.float32)) for s in shape_meta.obs}
      action = rng.uniform(-1, 1, (batch_size, config.task.horizon, 7)).astype(np.float32)
      return {'obs': obs, 'action': action}
    batches = [make_batch() for _ in range(3)]
    loss_fn = lambda p, b, r: policy.compute_loss({'params': p}, b, r, True)
    tx = optimizer.make_optimizer(config.optimizer, 10)
    params = jax.device_get(policy.init(jax.random.PRNGKey(3))['params'])
    out = {}
    for n in sorted({1, num_devices}):
      mesh = parallel.make_mesh(jax.devices()[:n])
      state = jax.jit(lambda p, k: train_state.create_train_state(p, tx, k),
                      out_shardings=parallel.replicated(mesh))(
                          parallel.replicate(params, mesh), jax.random.PRNGKey(4))
      if n == 1:
        np.savez(sys.argv[1] + '/params_init.npz', *jax.tree.leaves(jax.device_get(state.params)))
        out['kernels'] = cpu_kernels.enabled(jax.numpy.float32)
      step = parallel.make_train_step(loss_fn, tx, mesh, ema_config=config.ema)
      losses = []
      for b in batches:
        global_batch = parallel.shard_batch(b, mesh)
        assert len(global_batch['action'].sharding.device_set) == n
        state, metrics = step(state, global_batch)
        losses.append(float(metrics['loss']))
      assert len(state.params['noise_model']['input_emb']['kernel'].sharding.device_set) == n
      host = jax.device_get(state)
      np.savez(sys.argv[1] + f'/params_{n}_of_{num_devices}.npz',
               *jax.tree.leaves((host.params, host.ema_params)))
      out[n] = losses
    try:
      parallel.check_global_batch_size(3, parallel.make_mesh())
    except ValueError as e:
      out['error'] = str(e)
    print('RESULT ' + json.dumps(out))
''')


def _train(tmp_path, num_devices: int) -> dict:
  # Unoptimised XLA code compiles twice as fast; every run uses the same flags.
  env = dict(os.environ, JAX_PLATFORMS='cpu', PYTHONPATH=REPO,
             XLA_FLAGS=f'--xla_force_host_platform_device_count={num_devices} '
                       '--xla_backend_optimization_level=0')
  proc = subprocess.run([sys.executable, '-c', _SCRIPT, str(tmp_path)], cwd=REPO, env=env,
                        capture_output=True, text=True, timeout=600)
  assert proc.returncode == 0, proc.stderr[-4000:]
  return json.loads(proc.stdout.split('RESULT ', 1)[1])


def test_one_device_and_two_devices_give_the_same_parameters(tmp_path):
  two_devices, one_device = _train(tmp_path, 2), _train(tmp_path, 1)
  assert not two_devices['kernels']  # The kernels run on a single device only.
  np.testing.assert_allclose(two_devices['1'], two_devices['2'], rtol=1e-5)
  np.testing.assert_allclose(one_device['1'], two_devices['2'], rtol=1e-5)
  assert 'does not divide by the 2 devices' in two_devices['error']
  runs = {name: np.load(tmp_path / f'params_{name}.npz')
          for name in ('1_of_1', '1_of_2', '2_of_2')}
  assert len(runs['1_of_1'].files) == len(runs['2_of_2'].files) > 10
  for name in runs['2_of_2'].files:  # Only the order of float reductions may differ.
    for single in ('1_of_1', '1_of_2'):
      np.testing.assert_allclose(runs[single][name], runs['2_of_2'][name], rtol=2e-5, atol=2e-6,
                                 err_msg=f'{single}: {name}')
  initial = np.load(tmp_path / 'params_init.npz')
  changed = [not np.array_equal(initial[name], runs['2_of_2'][name]) for name in initial.files]
  assert sum(changed) > len(changed) // 2  # The steps really trained (lr > 0 after warmup).


def test_shard_batch_keeps_rows_in_order():
  mesh = parallel.make_mesh(jax.devices()[:1])
  assert parallel.per_process_batch_size(64, mesh) == 64
  local = {'obs': {'x': np.arange(12, dtype=np.float32).reshape(4, 3)}, 'action': np.ones((4, 2))}
  global_batch = parallel.shard_batch(local, mesh)
  assert global_batch['obs']['x'].shape == (4, 3)
  np.testing.assert_array_equal(np.asarray(global_batch['obs']['x']), local['obs']['x'])
