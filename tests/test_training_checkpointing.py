"""Orbax checkpoints: retention (latest + top-k), restore, crash safety, policy export/load."""

import gc
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import textwrap
import time

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from configs import lift
from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.training import checkpointing, optimizer, parallel, train_state

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def smoke_normalizer(config):
  """A normaliser of the smoke config's low-dimensional keys, fitted on random values."""
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  rng = np.random.default_rng(0)
  return Normalizer.fit({'robot0_eef_pos': rng.random((10, 3)),
                         'robot0_gripper_qpos': rng.random((10, 2))}, shape_meta)


def _toy_state(seed=0):
  config = lift.get_config('smoke')
  tx = optimizer.make_optimizer(config.optimizer, 10, decay_groups=[])
  init = lambda key: {'noise_model': {'kernel': jax.random.normal(key, (4, 3))},
                      'obs_encoder': {'bias': jnp.zeros(3)}}
  mesh = parallel.make_mesh(jax.devices()[:1])
  return jax.jit(lambda key: train_state.create_train_state(init(key), tx, key),
                 out_shardings=parallel.replicated(mesh))(jax.random.PRNGKey(seed))


def _bump(state):
  return state.replace(step=state.step + 1,
                       params=jax.tree.map(lambda x: x + 1, state.params),
                       ema_params=jax.tree.map(lambda x: x + 0.5, state.ema_params))


def test_latest_and_topk_by_success_are_kept_across_restarts(tmp_path, caplog):
  caplog.set_level(logging.WARNING)
  config = lift.get_config('smoke')
  normalizer = smoke_normalizer(config)
  state = _toy_state()
  directory = tmp_path / 'checkpoints'
  successes = [None, 0.6, None, 0.2, 0.9]  # steps 1..5
  checkpointer = checkpointing.Checkpointer(directory, topk=2)
  for success in successes:
    state = _bump(state)
    checkpointer.save(state, progress={'epoch': int(state.step), 'batch_in_epoch': 0},
                      config=config, normalizer=normalizer, success_rate=success)
  checkpointer.wait_until_finished()
  # Best two by success (steps 2 and 5, 5 also the latest); unranked 1, 3 and low 4 go.
  assert checkpointer.all_steps() == [2, 5]
  checkpointer.close()
  # Unranked saves are by design: orbax's warning at each would only worry the user.
  assert not [r for r in caplog.records if 'tracked_metric' in r.getMessage()]

  # A new manager (a resumed run) still knows the ranking: metrics live on disk.
  checkpointer = checkpointing.Checkpointer(directory, topk=2)
  for success in (None, None):  # steps 6, 7: unranked, only ever kept while latest.
    state = _bump(state)
    checkpointer.save(state, progress={'epoch': int(state.step), 'batch_in_epoch': 0},
                      config=config, normalizer=normalizer, success_rate=success)
  checkpointer.wait_until_finished()
  assert checkpointer.all_steps() == [2, 5, 7]
  assert sorted(os.listdir(directory)) == ['2', '5', '7']

  restored, progress = checkpointer.restore(_toy_state(seed=1))
  assert progress == {'epoch': 7, 'batch_in_epoch': 0, 'step': 7}
  host, expected = jax.device_get(restored), jax.device_get(state)
  assert int(host.step) == 7
  for a, b in zip(jax.tree.leaves(host), jax.tree.leaves(expected)):
    np.testing.assert_array_equal(a, b)
  assert restored.params['noise_model']['kernel'].sharding.is_fully_replicated
  checkpointer.close()


_WRITER = textwrap.dedent('''
    import sys
    import jax, jax.numpy as jnp, numpy as np
    from configs import lift
    from dpjax.data.normalizer import Normalizer
    from dpjax.data.shape_meta import ShapeMeta
    from dpjax.training import checkpointing, train_state
    config = lift.get_config('smoke')
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    normalizer = Normalizer.fit({'robot0_eef_pos': np.ones((2, 3)),
                                 'robot0_gripper_qpos': np.ones((2, 2))}, shape_meta)
    big = {'noise_model': {'kernel': jnp.zeros((2048, 4096))}}  # 32 MiB per copy
    state = train_state.TrainState(step=jnp.zeros((), jnp.int32), params=big, ema_params=big,
                                   opt_state=(), rng=jax.random.PRNGKey(0))
    checkpointer = checkpointing.Checkpointer(sys.argv[1], topk=1)
    while True:  # Save forever; the test kills this process at some point of a write.
      state = state.replace(step=state.step + 1,
                            params=jax.tree.map(lambda x: x + 1, state.params))
      checkpointer.save(state, progress={'epoch': 0, 'batch_in_epoch': 0}, config=config,
                        normalizer=normalizer)
''')


def test_sigkill_during_a_write_leaves_a_loadable_latest(tmp_path):
  directory = tmp_path / 'checkpoints'
  env = dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu')
  proc = subprocess.Popen([sys.executable, '-c', _WRITER, str(directory)], cwd=REPO, env=env,
                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
  caught_mid_write = False
  try:
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
      names = os.listdir(directory) if directory.exists() else []
      finished = [n for n in names if n.isdigit()]
      writing = [n for n in names if 'tmp' in n]
      if finished and writing:
        caught_mid_write = True
        break
      time.sleep(0.005)
    assert proc.poll() is None, proc.stderr.read().decode()[-3000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert caught_mid_write, 'never saw a write in progress next to a finished checkpoint'

  checkpointer = checkpointing.Checkpointer(directory, topk=1)
  latest = checkpointer.latest_step()
  assert latest is not None and latest >= 1
  # The latest finished checkpoint loads, with the values of that step.
  target = train_state.TrainState(
      step=jnp.zeros((), jnp.int32), params={'noise_model': {'kernel': jnp.ones((2048, 4096))}},
      ema_params={'noise_model': {'kernel': jnp.ones((2048, 4096))}}, opt_state=(),
      rng=jax.random.PRNGKey(1))
  restored, _ = checkpointer.restore(target)
  assert int(restored.step) == latest
  np.testing.assert_array_equal(np.asarray(restored.params['noise_model']['kernel'][:2, :2]),
                                np.full((2, 2), latest, np.float32))
  # The resumed run writes on; the partial write is gone (orbax clears it before saving).
  config = lift.get_config('smoke')
  checkpointer.save(restored.replace(step=restored.step + 1), progress={'epoch': 0,
                    'batch_in_epoch': 0}, config=config, normalizer=smoke_normalizer(config))
  checkpointer.close()
  assert sorted(os.listdir(directory)) == [str(latest + 1)]


def test_exported_policy_and_checkpoints_load_on_their_own(tmp_path, caplog):
  config = lift.get_config('smoke')
  normalizer = smoke_normalizer(config)
  policy = DiffusionPolicy(config, ShapeMeta.from_config(config.task.shape_meta), normalizer)
  params = policy.init(jax.random.PRNGKey(0))['params']
  ema_params = jax.tree.map(lambda x: x * 0.5, params)

  exported = checkpointing.export_policy(tmp_path / 'policy', ema_params=ema_params,
                                         config=config, normalizer=normalizer)
  assert json.loads((exported / 'config.json').read_text())['name'] == 'lift_smoke'
  loaded_config, loaded_policy, variables = checkpointing.load_policy(exported)
  assert loaded_config.task.horizon == 10 and loaded_policy.n_action_steps == 8
  assert loaded_policy.normalizer.keys == tuple(sorted(normalizer.keys))
  for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(ema_params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # Exporting again replaces the export whole (no leftovers of the temporary directory).
  checkpointing.export_policy(tmp_path / 'policy', ema_params=params, config=config,
                              normalizer=normalizer)
  assert sorted(os.listdir(tmp_path)) == ['policy']
  _, _, variables = checkpointing.load_policy(tmp_path / 'policy')
  for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(params)):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))

  # A training checkpoint (workdir, its checkpoints dir, or one step) gives its EMA params.
  state = train_state.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                                 ema_params=ema_params, opt_state=(), rng=jax.random.PRNGKey(0))
  checkpointer = checkpointing.Checkpointer(tmp_path / 'run' / 'checkpoints', topk=1)
  checkpointer.save(state, progress={'epoch': 1, 'batch_in_epoch': 0}, config=config,
                    normalizer=normalizer)
  checkpointer.close()
  caplog.set_level(logging.WARNING)
  for path in (tmp_path / 'run', tmp_path / 'run' / 'checkpoints',
               tmp_path / 'run' / 'checkpoints' / '3'):
    _, _, variables = checkpointing.load_policy(path)
    for a, b in zip(jax.tree.leaves(variables['params']), jax.tree.leaves(ema_params)):
      np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  # Loading a sound checkpoint is nothing to warn about (orbax's read-only notes were).
  assert not [r.getMessage() for r in caplog.records if r.levelno >= logging.WARNING]


def test_a_damaged_step_fails_with_one_error_not_one_per_array(tmp_path, caplog):
  config = lift.get_config('smoke')
  state = _toy_state()
  checkpointer = checkpointing.Checkpointer(tmp_path / 'checkpoints', topk=1)
  checkpointer.save(state, progress={'epoch': 0, 'batch_in_epoch': 0}, config=config,
                    normalizer=smoke_normalizer(config))
  checkpointer.wait_until_finished()
  shutil.rmtree(checkpointer.step_dir(checkpointer.latest_step()) / 'state' / 'd')
  gc.collect()  # Earlier tests' damaged reads log theirs now, before this one is watched.
  with caplog.at_level(logging.ERROR, logger='asyncio'):
    with pytest.raises(ValueError, match='Error reading'):
      checkpointer.restore(state)
    checkpointer.close()
    gc.collect()  # Unretrieved task errors are logged when their tasks are collected.
  assert not [r for r in caplog.records if r.name == 'asyncio']
