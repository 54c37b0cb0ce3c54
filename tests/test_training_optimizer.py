"""Optimiser, schedule, EMA and the jitted step against hand-computed values (SPEC §7)."""

import math

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from configs import lift
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.training import ema, optimizer, parallel, train_state
# pylint: disable-next=g-bad-import-order
from test_training_checkpointing import smoke_normalizer


def _ema_config(**overrides):
  values = dict(enabled=True, update_after_step=0, inv_gamma=1.0, power=0.75, min_value=0.0,
                max_value=0.9999)
  values.update(overrides)
  return ml_collections.ConfigDict(values)


def _optimizer_config(**overrides):
  config = lift.get_config().optimizer
  config.unlock()
  for key, value in overrides.items():
    config[key] = value
  return config


def test_ema_decay_matches_the_reference_formula():
  config = _ema_config()
  # count = EMA updates already applied; step' = count - 1: the first two updates copy.
  assert float(ema.ema_decay(0, config)) == 0.0
  assert float(ema.ema_decay(1, config)) == 0.0
  assert float(ema.ema_decay(2, config)) == pytest.approx(1 - 2 ** -0.75, abs=1e-6)
  assert float(ema.ema_decay(2, config)) == pytest.approx(0.4054, abs=1e-4)
  assert float(ema.ema_decay(101, config)) == pytest.approx(1 - 101 ** -0.75, abs=1e-6)
  assert float(ema.ema_decay(101, config)) == pytest.approx(0.9686, abs=1e-4)
  assert float(ema.ema_decay(10_000_000, config)) == pytest.approx(0.9999, abs=1e-7)
  shifted = _ema_config(update_after_step=5, min_value=0.5)
  assert float(ema.ema_decay(6, shifted)) == 0.0
  assert float(ema.ema_decay(7, shifted)) == pytest.approx(0.5)  # 0.405 clipped up to min.


def test_lr_schedule_warmup_then_cosine_to_zero():
  config = _optimizer_config(lr=1e-4, lr_warmup_steps=10, lr_schedule='cosine')
  total = 100
  schedule = optimizer.make_lr_schedule(config, total)

  def diffusers_cosine(step):  # diffusers get_cosine_schedule_with_warmup, num_cycles 0.5.
    if step < 10:
      return 1e-4 * step / 10
    progress = (step - 10) / (total - 10)
    return 1e-4 * 0.5 * (1 + math.cos(math.pi * progress))

  for step in (0, 1, 5, 9, 10, 11, 55, 99, 100):
    assert float(schedule(step)) == pytest.approx(diffusers_cosine(step), rel=1e-5, abs=1e-12)
  assert float(schedule(10)) == pytest.approx(1e-4)  # Warmup end: the peak.
  assert float(schedule(100)) == pytest.approx(0.0, abs=1e-12)  # End: zero.
  # diffusers' names: 'constant_with_warmup' warms up, 'constant' does not.
  warmed = optimizer.make_lr_schedule(_optimizer_config(lr_schedule='constant_with_warmup'), total)
  assert float(warmed(5)) == pytest.approx(5e-5) and float(warmed(90)) == pytest.approx(1e-4)
  constant = optimizer.make_lr_schedule(_optimizer_config(lr_schedule='constant'), total)
  assert float(constant(0)) == pytest.approx(1e-4) and float(constant(90)) == pytest.approx(1e-4)


def test_total_steps_follow_the_reference():
  assert optimizer.total_optimizer_steps(150, 100, 1) == 15000
  assert optimizer.total_optimizer_steps(150, 100, 4) == 3750
  assert optimizer.total_optimizer_steps(1, 1, 4) == 1


def _policy_params():
  config = lift.get_config('smoke')
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  policy = DiffusionPolicy(config, shape_meta, smoke_normalizer(config))
  return policy.init(jax.random.PRNGKey(0))['params']


def test_weight_decay_groups_on_the_policy_parameters():
  """Zero gradients: Adam moves nothing, so only decoupled weight decay changes a leaf."""
  lr = 0.5
  config = _optimizer_config(lr=lr, lr_warmup_steps=0, lr_schedule='constant')
  params = jax.tree.map(jnp.ones_like, _policy_params())
  tx = optimizer.make_optimizer(config, total_steps=10)

  @jax.jit
  def one_step(params):
    updates, _ = tx.update(jax.tree.map(jnp.zeros_like, params), tx.init(params), params)
    return jax.tree.map(lambda p, u: p + u, params, updates)

  new = one_step(params)
  flat = {'/'.join(str(getattr(k, 'key', k)) for k in path): float(np.asarray(v).ravel()[0])
          for path, v in jax.tree_util.tree_leaves_with_path(new)}

  transformer = {k: v for k, v in flat.items() if k.startswith('noise_model/')}
  encoder = {k: v for k, v in flat.items() if k.startswith('obs_encoder/')}
  assert transformer and encoder and len(transformer) + len(encoder) == len(flat)
  decayed = {k for k, v in transformer.items() if v != 1.0}
  # Transformer: Linear / attention weights decay by lr · 1e-3; nothing else does.
  assert decayed == {k for k in transformer if k.split('/')[-1] in ('kernel', 'in_proj_kernel')}
  for key in decayed:
    assert transformer[key] == pytest.approx(1 - lr * 1e-3, rel=1e-7)
  for name in ('bias', 'scale', 'pos_emb', 'cond_pos_emb'):
    assert any(k.split('/')[-1] == name for k in transformer), name
  assert all(transformer[k] == 1.0 for k in transformer if k.split('/')[-1] in
             ('bias', 'scale', 'pos_emb', 'cond_pos_emb'))
  # Every encoder leaf (convs, norms, biases) decays by lr · 1e-6.
  expected = float(np.float32(1) - np.float32(lr * 1e-6))
  assert all(v == pytest.approx(expected, abs=1e-7) and v < 1.0 for v in encoder.values())


def _toy_loss(params, batch, rng):
  del rng
  pred = batch['x'] @ params['w'] + params['b']
  loss = jnp.mean(jnp.square(pred - batch['y']))
  return loss, {}


def _toy_setup(accumulate, lr_warmup_steps=0, loss_fn=_toy_loss, **optimizer_overrides):
  config = _optimizer_config(lr=1e-2, lr_warmup_steps=lr_warmup_steps,
                             lr_schedule='constant_with_warmup', **optimizer_overrides)
  tx = optimizer.make_optimizer(config, 10, gradient_accumulate_every=accumulate,
                                decay_groups=[(1e-3, lambda p: {'w': True, 'b': False})])
  mesh = parallel.make_mesh(jax.devices()[:1])
  init = lambda key: {'w': jax.random.normal(key, (3, 2)), 'b': jnp.zeros(2)}
  state = train_state.create_train_state(init(jax.random.PRNGKey(0)), tx, jax.random.PRNGKey(1))
  step = parallel.make_train_step(loss_fn, tx, mesh, ema_config=_ema_config(),
                                  gradient_accumulate_every=accumulate)
  return state, step, mesh


def _toy_batches(n, size):
  rng = np.random.default_rng(1)
  return [{'x': rng.normal(size=(size, 3)).astype(np.float32),
           'y': rng.normal(size=(size, 2)).astype(np.float32)} for _ in range(n)]


def test_ema_tracks_the_optimizer_steps_inside_the_jitted_step():
  state, step, mesh = _toy_setup(accumulate=1)
  history = []
  for batch in _toy_batches(4, 4):
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    history.append((jax.device_get(state.params), jax.device_get(state.ema_params),
                    float(metrics['ema_decay'])))
  decays = [d for _, _, d in history]
  assert decays[:2] == [0.0, 0.0]
  assert decays[2] == pytest.approx(1 - 2 ** -0.75, abs=1e-6)
  assert decays[3] == pytest.approx(1 - 3 ** -0.75, abs=1e-6)
  expected = history[1][0]  # Two copies, then the recursion.
  for params, ema_params, decay in history[2:]:
    expected = jax.tree.map(lambda e, p: decay * e + (1 - decay) * p, expected, params)
    np.testing.assert_allclose(ema_params['w'], expected['w'], rtol=1e-6)
  assert not np.allclose(history[-1][1]['w'], history[-1][0]['w'])


def test_first_warmup_step_has_zero_learning_rate():
  state, step, mesh = _toy_setup(accumulate=1, lr_warmup_steps=5)
  before = jax.device_get(state.params)
  state, _ = step(state, parallel.shard_batch(_toy_batches(1, 4)[0], mesh))
  np.testing.assert_array_equal(jax.device_get(state.params)['w'], before['w'])


def test_gradient_accumulation_equals_one_big_batch():
  """Four updates of two accumulated micro-batches each against four steps on the halves
  concatenated. Adam's eps = 1 keeps the update sensitive to the gradient's scale (a sum of the
  micro-batches' gradients in place of their mean would show), and four EMA updates take it past
  its two initial copies."""
  halves = _toy_batches(8, 4)
  wholes = [{k: np.concatenate([a[k], b[k]]) for k in a} for a, b in zip(halves[::2], halves[1::2])]
  state_acc, step_acc, mesh = _toy_setup(accumulate=2, eps=1.0)
  state_big, step_big, _ = _toy_setup(accumulate=1, eps=1.0)
  for i, batch in enumerate(halves):
    before = jax.device_get((state_acc.params, state_acc.ema_params))
    state_acc, _ = step_acc(state_acc, parallel.shard_batch(batch, mesh))
    if i % 2 == 0:  # Mid-accumulation: no update, and the EMA keeps its bits.
      after = jax.device_get((state_acc.params, state_acc.ema_params))
      for was, now in zip(jax.tree.leaves(before), jax.tree.leaves(after)):
        np.testing.assert_array_equal(now, was)
  for whole in wholes:
    state_big, _ = step_big(state_big, parallel.shard_batch(whole, mesh))
  for name in ('params', 'ema_params'):
    np.testing.assert_allclose(jax.device_get(getattr(state_acc, name))['w'],
                               jax.device_get(getattr(state_big, name))['w'], rtol=1e-6,
                               err_msg=name)
  assert int(state_acc.step) == 8 and int(state_big.step) == 4


def _random_draw_loss(params, batch, rng):
  loss, _ = _toy_loss(params, batch, rng)
  return loss, {'draw': jax.random.uniform(rng)}


def test_each_step_draws_from_a_key_of_its_own():
  state, step, mesh = _toy_setup(accumulate=1, loss_fn=_random_draw_loss)
  key, draws = state.rng, []
  for batch in _toy_batches(3, 4):
    key, step_key = jax.random.split(key)
    state, metrics = step(state, parallel.shard_batch(batch, mesh))
    assert float(metrics['draw']) == float(jax.random.uniform(step_key))
    draws.append(float(metrics['draw']))
  assert len(set(draws)) == 3
