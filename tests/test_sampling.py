"""The scanned reverse process equals a step-by-step Python loop, inpaints, and compiles once."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.diffusion import ddim, ddpm, sampling, schedules

SHAPE = (2, 10, 5)
SCHEDULE = schedules.make_noise_schedule('squaredcos_cap_v2', 100)


def _denoise(x, t):
  """A deterministic stand-in network whose output depends on both x and t."""
  return 0.5 * jnp.tanh(x) + 0.01 * t.astype(x.dtype) - 0.3


def _loop_reference(rng, sampler, num_inference_steps, step_kwargs, cond_data=None,
                    cond_mask=None):
  """Python loop over the same step functions, with the documented key layout."""
  timesteps, prev_timesteps = sampling.inference_timesteps(sampler, 100, num_inference_steps)
  init_key, steps_key = jax.random.split(rng)
  keys = jax.random.split(steps_key, num_inference_steps)
  x = jax.random.normal(init_key, SHAPE)
  inpaint = (lambda x: x) if cond_mask is None else (lambda x: jnp.where(cond_mask, cond_data, x))

  @jax.jit  # One step per call: the loop itself stays in Python.
  def step(x, t, prev_t, key):
    x = inpaint(x)
    out = _denoise(x, t)
    noise = jax.random.normal(key, SHAPE)
    if sampler == 'ddpm':
      return ddpm.ddpm_step(SCHEDULE, out, t, x, noise, prev_t=prev_t, **step_kwargs)
    return ddim.ddim_step(SCHEDULE, out, t, prev_t, x, noise, **step_kwargs)

  for t, prev_t, key in zip(timesteps, prev_timesteps, keys):
    x = step(x, t, prev_t, key)
  return inpaint(x)


@pytest.mark.parametrize('sampler,num_inference_steps,step_kwargs', [
    ('ddpm', 100, dict(variance_type='fixed_small', clip_sample=True, prediction_type='epsilon')),
    ('ddpm', 16, dict(variance_type='fixed_large', clip_sample=False, prediction_type='sample')),
    ('ddim', 16, dict(eta=0.0, clip_sample=True, prediction_type='epsilon')),
    ('ddim', 10, dict(eta=1.0, clip_sample=True, prediction_type='epsilon')),
])
def test_scan_equals_python_loop(sampler, num_inference_steps, step_kwargs):
  rng = jax.random.key(7)
  scanned = jax.jit(lambda key: sampling.sample(
      _denoise, SCHEDULE, shape=SHAPE, rng=key, sampler=sampler,
      num_inference_steps=num_inference_steps, **step_kwargs))(rng)
  expected = _loop_reference(rng, sampler, num_inference_steps, step_kwargs)
  np.testing.assert_allclose(scanned, expected, atol=1e-5, rtol=1e-5)
  assert scanned.shape == SHAPE and scanned.dtype == jnp.float32


def test_different_keys_give_different_samples():
  run = jax.jit(lambda key: sampling.sample(_denoise, SCHEDULE, shape=SHAPE, rng=key,
                                            num_inference_steps=100))
  a, b = run(jax.random.key(0)), run(jax.random.key(1))
  assert np.max(np.abs(np.asarray(a) - np.asarray(b))) > 1e-2
  np.testing.assert_array_equal(a, run(jax.random.key(0)))


def test_inpainting_keeps_conditioned_entries_and_steers_the_rest():
  rng = np.random.default_rng(0)
  cond_data = jnp.asarray(rng.uniform(-1, 1, SHAPE), jnp.float32)
  cond_mask = np.zeros(SHAPE, bool)
  cond_mask[:, :2, 3:] = True  # First To = 2 steps of the feature dims, as the policy does.
  cond_mask = jnp.asarray(cond_mask)
  step_kwargs = dict(variance_type='fixed_small', clip_sample=True, prediction_type='epsilon')

  def denoise(x, t):
    # Mixes every entry with the conditioned ones, so conditioning must reach free entries.
    return _denoise(x, t) + 0.2 * jnp.mean(x[:, :2, 3:], axis=(1, 2), keepdims=True)

  out = jax.jit(lambda key: sampling.sample(
      denoise, SCHEDULE, shape=SHAPE, rng=key, num_inference_steps=100,
      condition_data=cond_data, condition_mask=cond_mask, **step_kwargs))(jax.random.key(3))
  np.testing.assert_array_equal(np.asarray(out)[np.asarray(cond_mask)],
                                np.asarray(cond_data)[np.asarray(cond_mask)])
  free = ~np.asarray(cond_mask)
  unconditioned = jax.jit(lambda key: sampling.sample(
      denoise, SCHEDULE, shape=SHAPE, rng=key, num_inference_steps=100,
      **step_kwargs))(jax.random.key(3))
  assert np.max(np.abs(np.asarray(out)[free] - np.asarray(unconditioned)[free])) > 1e-3


def test_sampler_compiles_once_and_traces_the_network_once():
  traces = {'outer': 0, 'denoise': 0}

  def denoise(x, t):
    traces['denoise'] += 1
    return _denoise(x, t)

  @jax.jit
  def run(key, offset):
    traces['outer'] += 1
    return sampling.sample(lambda x, t: denoise(x, t) + offset, SCHEDULE, shape=SHAPE, rng=key,
                           num_inference_steps=100)

  for seed in range(3):
    jax.block_until_ready(run(jax.random.key(seed), jnp.float32(seed)))
  assert traces == {'outer': 1, 'denoise': 1}  # One trace; the 100 steps are one scan body.


def test_unknown_sampler_is_rejected():
  with pytest.raises(ValueError, match='sampler.*euler'):
    sampling.sample(_denoise, SCHEDULE, shape=SHAPE, rng=jax.random.key(0), sampler='euler',
                    num_inference_steps=10)
