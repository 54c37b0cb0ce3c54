"""Mixed precision (`model.compute_dtype='bfloat16'`, float32 parameters) trains like float32.

Both precisions start from the same float32 parameters and see the same batches and keys, so
their diffusion losses are comparable step by step: bfloat16 must follow the float32 curve
(not just stay finite) and both must learn the task.
"""

import jax
import ml_collections
import numpy as np
from configs import lift
from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.training import optimizer, parallel, train_state

NUM_STEPS = 40


def _policy(compute_dtype: str) -> tuple[DiffusionPolicy, ml_collections.ConfigDict]:
  config = lift.get_config('smoke')
  config.model.compute_dtype = compute_dtype
  # Wide enough that, where the C++ kernels run bfloat16, the first stages' convolutions (32
  # and 64 channels) and the FFN's matmuls go through them.
  config.model.resnet_width = 32
  config.optimizer.lr = 1e-3
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  rng = np.random.default_rng(0)
  low_dim = {s.key: rng.normal(size=(50,) + s.shape) for s in shape_meta.obs
             if s.kind == 'low_dim'}
  low_dim['action'] = rng.uniform(-1, 1, (50, shape_meta.action_dim))
  return DiffusionPolicy(config, shape_meta, Normalizer.fit(low_dim, shape_meta)), config


def _train_losses(compute_dtype: str, batches, params) -> np.ndarray:
  policy, config = _policy(compute_dtype)
  tx = optimizer.make_optimizer(config.optimizer, NUM_STEPS)
  mesh = parallel.make_mesh(jax.devices()[:1])
  state = train_state.create_train_state(params, tx, jax.random.key(4))
  step = parallel.make_train_step(
      lambda p, b, r: policy.compute_loss({'params': p}, b, r, True), tx, mesh,
      ema_config=config.ema)
  losses = []
  for i in range(NUM_STEPS):
    state, metrics = step(state, parallel.shard_batch(batches[i % len(batches)], mesh))
    losses.append(float(metrics['loss']))
  return np.asarray(losses)


def _batches(config, shape_meta, num_batches: int):
  """Actions are a smooth function of the end-effector position, so there is signal to learn."""
  rng = np.random.default_rng(0)
  batch_size, to, horizon = config.data.batch_size, config.task.n_obs_steps, config.task.horizon
  batches = []
  for _ in range(num_batches):
    obs = {s.key: (rng.integers(0, 256, (batch_size, to) + s.shape, dtype=np.uint8)
                   if s.kind == 'rgb' else
                   rng.normal(size=(batch_size, to) + s.shape).astype(np.float32))
           for s in shape_meta.obs}
    phase = np.linspace(0, 1, horizon)[None, :, None]
    action = np.tanh(obs['robot0_eef_pos'][:, -1:, :1] * (1 + phase)) * np.ones(
        (1, 1, shape_meta.action_dim))
    batches.append({'obs': obs, 'action': action.astype(np.float32)})
  return batches


def test_bfloat16_compute_follows_the_float32_loss_curve():
  config = lift.get_config('smoke')
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  batches = _batches(config, shape_meta, num_batches=4)
  params = jax.device_get(_policy('float32')[0].init(jax.random.key(3))['params'])

  f32 = _train_losses('float32', batches, params)
  bf16 = _train_losses('bfloat16', batches, params)

  assert np.all(np.isfinite(bf16))
  for losses in (f32, bf16):  # Both learn: the last quarter is well below the first steps.
    assert losses[-10:].mean() < 0.8 * losses[:5].mean(), losses
  # Same keys and batches: step-by-step agreement up to bfloat16 rounding (measured: ≤ 1e-3
  # relative over the 40 steps; a loss is a mean over many entries, so rounding averages out).
  np.testing.assert_allclose(bf16, f32, rtol=0.02)
