"""DDPM forward noising and reverse step (diffusers `DDPMScheduler` maths, SPEC §6); jit-safe.

All functions are pure functions of arrays: the timestep may be a traced scalar, and the
"no noise at t = 0" rule is a `jnp.where`, so a whole reverse process can live in one
`lax.scan`. Shapes: samples are any (B, ...) array; `t` is a scalar unless stated otherwise.
"""

from typing import Optional

import chex
import jax.numpy as jnp
import numpy as np

from dpjax.diffusion.schedules import NoiseSchedule, alphas_cumprod_at, leading_timesteps

VARIANCE_TYPES = ('fixed_small', 'fixed_small_log', 'fixed_large')
PREDICTION_TYPES = ('epsilon', 'sample')


def check_prediction_type(prediction_type: str) -> None:
  if prediction_type not in PREDICTION_TYPES:
    raise ValueError(f'diffusion.prediction_type: unknown value {prediction_type!r}; '
                     f'expected one of {PREDICTION_TYPES}')


def add_noise(schedule: NoiseSchedule, x0: jnp.ndarray, noise: jnp.ndarray,
              t: jnp.ndarray) -> jnp.ndarray:
  """x_t = sqrt(abar_t)·x0 + sqrt(1 − abar_t)·noise; `t` is () or (B,) int, x0 is (B, ...)."""
  chex.assert_equal_shape((x0, noise))
  t = jnp.asarray(t)
  if t.ndim == 1:
    chex.assert_axis_dimension(x0, 0, t.shape[0])
  abar = schedule.alphas_cumprod.astype(x0.dtype)[t]
  abar = abar.reshape(abar.shape + (1,) * (x0.ndim - abar.ndim))
  return jnp.sqrt(abar) * x0 + jnp.sqrt(1 - abar) * noise


def ddpm_step(schedule: NoiseSchedule,
              model_output: jnp.ndarray,
              t: jnp.ndarray,
              sample: jnp.ndarray,
              noise: Optional[jnp.ndarray],
              *,
              prev_t: Optional[jnp.ndarray] = None,
              variance_type: str = 'fixed_small',
              clip_sample: bool = True,
              clip_sample_range: float = 1.0,
              prediction_type: str = 'epsilon') -> jnp.ndarray:
  """One reverse step x_t → x_prev_t; returns prev_sample with `sample`'s shape and dtype.

  Args:
    schedule: the training noise schedule.
    model_output: the network's prediction (epsilon or x0), same shape as `sample`.
    t: current timestep, int scalar (may be traced).
    sample: x_t.
    noise: standard normal, same shape as `sample`; used only when t > 0. None: no noise
      (the deterministic posterior mean).
    prev_t: the next timestep of the inference sequence; default t − 1 (every training step).
      With fewer inference steps diffusers uses the next element of the timestep list
      (`ddpm_timesteps`), and abar_prev = 1 once prev_t < 0.
    variance_type, clip_sample, clip_sample_range, prediction_type: as diffusers.
  """
  if variance_type not in VARIANCE_TYPES:
    raise ValueError(f'diffusion.variance_type: unknown value {variance_type!r}; '
                     f'expected one of {VARIANCE_TYPES}')
  check_prediction_type(prediction_type)
  chex.assert_equal_shape((model_output, sample))
  model_output = model_output.astype(sample.dtype)
  t = jnp.asarray(t, jnp.int32)
  prev_t = t - 1 if prev_t is None else jnp.asarray(prev_t, jnp.int32)
  chex.assert_rank((t, prev_t), 0)

  alpha_prod_t = schedule.alphas_cumprod[t]
  alpha_prod_t_prev = alphas_cumprod_at(schedule, prev_t)
  beta_prod_t = 1 - alpha_prod_t
  beta_prod_t_prev = 1 - alpha_prod_t_prev
  current_alpha_t = alpha_prod_t / alpha_prod_t_prev
  current_beta_t = 1 - current_alpha_t

  if prediction_type == 'epsilon':
    pred_x0 = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
  else:
    pred_x0 = model_output
  if clip_sample:
    pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

  # Posterior mean, DDPM paper eq. (7).
  pred_x0_coeff = (jnp.sqrt(alpha_prod_t_prev) * current_beta_t) / beta_prod_t
  sample_coeff = jnp.sqrt(current_alpha_t) * beta_prod_t_prev / beta_prod_t
  prev_sample = pred_x0_coeff * pred_x0 + sample_coeff * sample
  if noise is None:
    return prev_sample

  chex.assert_equal_shape((noise, sample))
  # Clamped because fixed_small_log takes its log (diffusers does the same for every type).
  variance = jnp.maximum((1 - alpha_prod_t_prev) / (1 - alpha_prod_t) * current_beta_t, 1e-20)
  if variance_type == 'fixed_small':
    std = jnp.sqrt(variance)
  elif variance_type == 'fixed_small_log':
    std = jnp.exp(0.5 * jnp.log(variance))
  else:
    std = jnp.sqrt(current_beta_t)
  std = jnp.where(t > 0, std, jnp.zeros_like(std))
  return prev_sample + std * noise.astype(sample.dtype)


def ddpm_timesteps(num_train_timesteps: int,
                   num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, prev_timesteps), each (n,) int32: diffusers' 'leading' list and, for each
  entry, the next one (−1 after the last), as `DDPMScheduler.previous_timestep`."""
  timesteps = leading_timesteps(num_train_timesteps, num_inference_steps)
  prev = np.append(timesteps[1:], -1).astype(np.int32)
  return timesteps, prev
