"""DDIM reverse step (diffusers `DDIMScheduler` maths, set_alpha_to_one=True); jit-safe.

Matches diffusion_policy's DDIM configuration: 'leading' timestep spacing, steps_offset 0,
abar_prev = 1 after the last step, `use_clipped_model_output` False.
"""

from typing import Optional

import chex
import jax.numpy as jnp
import numpy as np

from dpjax.diffusion.ddpm import check_prediction_type
from dpjax.diffusion.schedules import NoiseSchedule, alphas_cumprod_at, leading_timesteps


def ddim_timesteps(num_train_timesteps: int,
                   num_inference_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """(timesteps, prev_timesteps), each (n,) int32; prev = t − K // n as `DDIMScheduler.step`."""
  timesteps = leading_timesteps(num_train_timesteps, num_inference_steps)
  prev = timesteps - np.int32(int(num_train_timesteps) // int(num_inference_steps))
  return timesteps, prev.astype(np.int32)


def ddim_step(schedule: NoiseSchedule,
              model_output: jnp.ndarray,
              t: jnp.ndarray,
              prev_t: jnp.ndarray,
              sample: jnp.ndarray,
              noise: Optional[jnp.ndarray],
              *,
              eta: float = 0.0,
              clip_sample: bool = True,
              clip_sample_range: float = 1.0,
              prediction_type: str = 'epsilon') -> jnp.ndarray:
  """One DDIM step x_t → x_prev_t (DDIM paper eq. 12 and 16); returns prev_sample.

  Args:
    schedule: the training noise schedule.
    model_output: the network's prediction (epsilon or x0), same shape as `sample`.
    t, prev_t: current and next timestep, int scalars (may be traced); prev_t < 0 means the
      final step (abar_prev = 1).
    sample: x_t.
    noise: standard normal like `sample`, scaled by eta·sigma_t; may be None when eta == 0.
    eta: 0 deterministic DDIM, 1 DDPM-like stochasticity.
    clip_sample, clip_sample_range, prediction_type: as diffusers.
  """
  check_prediction_type(prediction_type)
  chex.assert_equal_shape((model_output, sample))
  model_output = model_output.astype(sample.dtype)
  t = jnp.asarray(t, jnp.int32)
  prev_t = jnp.asarray(prev_t, jnp.int32)
  chex.assert_rank((t, prev_t), 0)

  alpha_prod_t = schedule.alphas_cumprod[t]
  alpha_prod_t_prev = alphas_cumprod_at(schedule, prev_t)
  beta_prod_t = 1 - alpha_prod_t

  if prediction_type == 'epsilon':
    pred_x0 = (sample - jnp.sqrt(beta_prod_t) * model_output) / jnp.sqrt(alpha_prod_t)
    pred_epsilon = model_output
  else:
    pred_x0 = model_output
    pred_epsilon = (sample - jnp.sqrt(alpha_prod_t) * pred_x0) / jnp.sqrt(beta_prod_t)
  if clip_sample:
    pred_x0 = jnp.clip(pred_x0, -clip_sample_range, clip_sample_range)

  variance = ((1 - alpha_prod_t_prev) / beta_prod_t) * (1 - alpha_prod_t / alpha_prod_t_prev)
  std = eta * jnp.sqrt(variance)
  direction = jnp.sqrt(1 - alpha_prod_t_prev - std**2) * pred_epsilon
  prev_sample = jnp.sqrt(alpha_prod_t_prev) * pred_x0 + direction
  if noise is None:
    if eta > 0:
      raise ValueError(f'ddim_step: eta={eta} > 0 needs a noise array, got None')
    return prev_sample
  chex.assert_equal_shape((noise, sample))
  return prev_sample + std * noise.astype(sample.dtype)
