"""Parity of dpjax.diffusion schedules and steps with diffusers' PyTorch schedulers (the oracle)."""

import functools

import diffusers
import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from dpjax.diffusion import ddim, ddpm, schedules

# Max abs error for values of order 1. Unclipped epsilon steps on random model outputs reach
# |x| ~ 1e2 (x0 = x_t / sqrt(abar_99) ~ 1e4), where float32's own spacing is ~1e-5, so the bound
# scales with the magnitude there: err <= TOL * max(1, max|x|).
TOL = 1e-5
SHAPE = (3, 10, 7)  # (B, T, Da) as the policy samples.


def _assert_close(ours, theirs, what):
  ours = np.asarray(ours, np.float64)
  theirs = theirs.detach().numpy().astype(np.float64) if torch.is_tensor(theirs) else theirs
  err = np.max(np.abs(ours - theirs))
  bound = TOL * max(1.0, np.max(np.abs(theirs)))
  assert err <= bound, f'{what}: max abs error {err:.3g} > {bound:.3g}'



def _model_output(rng, prediction_type):
  """Random network outputs of a realistic scale: epsilon ~ N(0, 1), x0 in (-1, 1)."""
  output = rng.standard_normal(SHAPE).astype(np.float32)
  return np.tanh(output) if prediction_type == 'sample' else output

@pytest.mark.parametrize('beta_schedule,num_train_timesteps', [
    ('squaredcos_cap_v2', 100), ('squaredcos_cap_v2', 1000), ('linear', 100),
    ('linear', 1000), ('scaled_linear', 100)])
def test_schedule_matches_diffusers(beta_schedule, num_train_timesteps):
  ours = schedules.make_noise_schedule(beta_schedule, num_train_timesteps, 1e-4, 0.02)
  theirs = diffusers.DDPMScheduler(num_train_timesteps=num_train_timesteps, beta_start=1e-4,
                                   beta_end=0.02, beta_schedule=beta_schedule)
  for name in ('betas', 'alphas', 'alphas_cumprod'):
    value = getattr(ours, name)
    assert value.dtype == jnp.float32 and value.shape == (num_train_timesteps,)
    # Relative check too: 1/sqrt(abar) amplifies abar errors near the end of the chain.
    np.testing.assert_allclose(value, getattr(theirs, name).numpy(), rtol=1e-6, atol=1e-9,
                               err_msg=f'{beta_schedule} {name}')


def test_cosine_schedule_matches_spec_formula():
  k = 100
  abar = lambda tau: np.cos((tau + 0.008) / 1.008 * np.pi / 2)**2
  i = np.arange(k)
  expected = np.minimum(1 - abar((i + 1) / k) / abar(i / k), 0.999)
  np.testing.assert_allclose(schedules.make_noise_schedule().betas, expected, rtol=1e-6)


def test_unknown_schedule_and_bad_step_count_are_rejected():
  with pytest.raises(ValueError, match='beta_schedule.*sigmoid'):
    schedules.make_noise_schedule('sigmoid')
  with pytest.raises(ValueError, match='num_inference_steps'):
    schedules.leading_timesteps(100, 101)


def test_add_noise_matches_diffusers():
  ours = schedules.make_noise_schedule('squaredcos_cap_v2', 100)
  theirs = diffusers.DDPMScheduler(num_train_timesteps=100, beta_schedule='squaredcos_cap_v2')
  rng = np.random.default_rng(0)
  x0 = rng.standard_normal(SHAPE).astype(np.float32)
  noise = rng.standard_normal(SHAPE).astype(np.float32)
  t = np.array([0, 57, 99], np.int32)
  expected = theirs.add_noise(torch.from_numpy(x0), torch.from_numpy(noise), torch.from_numpy(t))
  _assert_close(jax.jit(ddpm.add_noise)(ours, x0, noise, t), expected, 'add_noise')


@pytest.mark.parametrize('num_inference_steps', [100, 16])
@pytest.mark.parametrize('variance_type', ddpm.VARIANCE_TYPES)
@pytest.mark.parametrize('prediction_type', ddpm.PREDICTION_TYPES)
@pytest.mark.parametrize('clip_sample', [True, False])
def test_ddpm_sequence_matches_diffusers(num_inference_steps, variance_type, prediction_type,
                                         clip_sample):
  k = 100
  theirs = diffusers.DDPMScheduler(num_train_timesteps=k, beta_schedule='squaredcos_cap_v2',
                                   variance_type=variance_type, clip_sample=clip_sample,
                                   prediction_type=prediction_type)
  theirs.set_timesteps(num_inference_steps)
  ours = schedules.make_noise_schedule('squaredcos_cap_v2', k)
  timesteps, prev_timesteps = ddpm.ddpm_timesteps(k, num_inference_steps)
  np.testing.assert_array_equal(timesteps, theirs.timesteps.numpy())

  step = jax.jit(functools.partial(
      ddpm.ddpm_step, ours, variance_type=variance_type, clip_sample=clip_sample,
      prediction_type=prediction_type))
  rng = np.random.default_rng(1)
  # diffusers draws its step noise from `generator` (only when t > 0); a twin generator with
  # the same seed replays the same draws for our step.
  generator, twin = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
  sample_theirs = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
  sample_ours = sample_theirs.numpy()
  for t, prev_t in zip(timesteps, prev_timesteps):
    model_output = _model_output(rng, prediction_type)
    if t > 0:
      noise = torch.randn(SHAPE, generator=twin).numpy()
    else:  # diffusers adds no noise at t = 0; ours must ignore what it is given.
      noise = rng.standard_normal(SHAPE).astype(np.float32) * 100
    sample_theirs = theirs.step(torch.from_numpy(model_output), int(t), sample_theirs,
                                generator=generator).prev_sample
    sample_ours = step(model_output, t, sample_ours, noise, prev_t=prev_t)
    _assert_close(sample_ours, sample_theirs, f'DDPM step at t={t}')


@pytest.mark.parametrize('num_inference_steps', [10, 16])
@pytest.mark.parametrize('eta', [0.0, 1.0])
@pytest.mark.parametrize('prediction_type', ddpm.PREDICTION_TYPES)
@pytest.mark.parametrize('clip_sample', [True, False])
def test_ddim_sequence_matches_diffusers(num_inference_steps, eta, prediction_type, clip_sample):
  k = 100
  theirs = diffusers.DDIMScheduler(num_train_timesteps=k, beta_schedule='squaredcos_cap_v2',
                                   clip_sample=clip_sample, set_alpha_to_one=True,
                                   steps_offset=0, prediction_type=prediction_type)
  theirs.set_timesteps(num_inference_steps)
  ours = schedules.make_noise_schedule('squaredcos_cap_v2', k)
  timesteps, prev_timesteps = ddim.ddim_timesteps(k, num_inference_steps)
  np.testing.assert_array_equal(timesteps, theirs.timesteps.numpy())

  step = jax.jit(functools.partial(ddim.ddim_step, ours, eta=eta, clip_sample=clip_sample,
                                   prediction_type=prediction_type))
  rng = np.random.default_rng(2)
  sample_theirs = torch.from_numpy(rng.standard_normal(SHAPE).astype(np.float32))
  sample_ours = sample_theirs.numpy()
  for t, prev_t in zip(timesteps, prev_timesteps):
    model_output = _model_output(rng, prediction_type)
    noise = rng.standard_normal(SHAPE).astype(np.float32)
    sample_theirs = theirs.step(torch.from_numpy(model_output), int(t), sample_theirs, eta=eta,
                                variance_noise=torch.from_numpy(noise)).prev_sample
    sample_ours = step(model_output, t, prev_t, sample_ours, noise)
    _assert_close(sample_ours, sample_theirs, f'DDIM step at t={t}')
