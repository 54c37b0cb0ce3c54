"""The whole reverse diffusion process as one `jax.lax.scan` (reference `conditional_sample`).

Timesteps are precomputed on the host as constants and every step's noise is drawn from its own
key before the loop (one vectorised draw, fed to the scan), so under `jax.jit` sampling is one
compiled loop with no host round trip.
"""

from typing import Callable, Optional

import chex
import jax
import jax.numpy as jnp

from dpjax.diffusion import ddim, ddpm
from dpjax.diffusion.schedules import NoiseSchedule

SAMPLERS = ('ddpm', 'ddim')

# denoise_fn(sample (B, ...), t () int32) -> model output like `sample`.
DenoiseFn = Callable[[jnp.ndarray, jnp.ndarray], jnp.ndarray]


def inference_timesteps(sampler: str, num_train_timesteps: int, num_inference_steps: int):
  """(timesteps, prev_timesteps) int32 numpy arrays of `sampler`'s inference schedule."""
  if sampler == 'ddpm':
    return ddpm.ddpm_timesteps(num_train_timesteps, num_inference_steps)
  if sampler == 'ddim':
    return ddim.ddim_timesteps(num_train_timesteps, num_inference_steps)
  raise ValueError(f'diffusion.sampler: unknown sampler {sampler!r}; expected one of {SAMPLERS}')


def sample(denoise_fn: DenoiseFn,
           schedule: NoiseSchedule,
           *,
           shape: tuple[int, ...],
           rng: jax.Array,
           sampler: str = 'ddpm',
           num_inference_steps: int,
           condition_data: Optional[jnp.ndarray] = None,
           condition_mask: Optional[jnp.ndarray] = None,
           **step_kwargs) -> jnp.ndarray:
  """Runs the reverse process from N(0, I) and returns x0 of `shape`, float32 (the network may
  compute in lower precision; the trajectory does not).

  Randomness: `init_key, steps_key = split(rng)`; x_T ~ normal(init_key); the noise of step i is
  normal(split(steps_key, n)[i]) (skipped for deterministic DDIM, eta == 0).

  Args:
    denoise_fn: model output for (x_t, t); t is a traced int32 scalar.
    schedule: the training noise schedule.
    shape: sample shape, e.g. (B, T, Da).
    rng: PRNG key.
    sampler: 'ddpm' or 'ddim'.
    num_inference_steps: number of reverse steps (diffusers 'leading' spacing).
    condition_data, condition_mask: optional, both of `shape`; where the mask is True the
      trajectory is overwritten by condition_data before every step and at the end
      (inpainting).
    **step_kwargs: keyword arguments of `ddpm.ddpm_step` or `ddim.ddim_step`.
  """
  timesteps, prev_timesteps = inference_timesteps(sampler, schedule.num_train_timesteps,
                                                  num_inference_steps)
  if (condition_data is None) != (condition_mask is None):
    raise ValueError('sample: condition_data and condition_mask must be given together')
  if condition_mask is not None:
    chex.assert_shape((condition_data, condition_mask), shape)
    condition_data = condition_data.astype(jnp.float32)

  def inpaint(x):
    if condition_mask is None:
      return x
    return jnp.where(condition_mask, condition_data, x)

  deterministic = sampler == 'ddim' and step_kwargs.get('eta', 0.0) == 0.0

  def body(x, step_inputs):
    t, prev_t, noise = step_inputs
    x = inpaint(x)
    model_output = denoise_fn(x, t)
    chex.assert_shape(model_output, shape)
    if sampler == 'ddpm':
      x = ddpm.ddpm_step(schedule, model_output, t, x, noise, prev_t=prev_t, **step_kwargs)
    else:
      x = ddim.ddim_step(schedule, model_output, t, prev_t, x, noise, **step_kwargs)
    return x, None

  init_key, steps_key = jax.random.split(rng)
  x = jax.random.normal(init_key, shape, jnp.float32)
  # All steps' noise at once, before the loop: the same draws, but the random-bit generator
  # (itself a loop) no longer runs inside every step.
  draw = lambda key: jax.random.normal(key, shape, jnp.float32)
  noises = None if deterministic else jax.vmap(draw)(jax.random.split(steps_key, len(timesteps)))
  x, _ = jax.lax.scan(body, x, (jnp.asarray(timesteps), jnp.asarray(prev_timesteps), noises))
  return inpaint(x)
