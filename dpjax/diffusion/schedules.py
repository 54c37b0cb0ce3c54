"""DDPM noise schedules (betas, alphas, cumulative alphas) and inference timestep spacing.

The numbers follow `diffusers` exactly (SPEC §6): betas are computed in float64 (or, for the
linear schedules, as a linspace) and cast to float32; alphas = 1 − betas in float32 and their
cumulative product accumulated in float64, as diffusers/torch do, so that the reverse process
reproduces the oracle to float32 rounding even where 1/sqrt(alphas_cumprod) is large.
"""

import math

import flax.struct
import jax.numpy as jnp
import numpy as np

BETA_SCHEDULES = ('squaredcos_cap_v2', 'linear', 'scaled_linear')


@flax.struct.dataclass
class NoiseSchedule:
  """Per-timestep coefficients, each (K,) float32, K = num_train_timesteps (static)."""
  betas: jnp.ndarray
  alphas: jnp.ndarray
  alphas_cumprod: jnp.ndarray
  num_train_timesteps: int = flax.struct.field(pytree_node=False)


def _cosine_betas(num_train_timesteps: int, max_beta: float = 0.999) -> np.ndarray:
  """Glide cosine schedule: beta_i = min(1 - abar((i+1)/K) / abar(i/K), max_beta)."""

  def alpha_bar(tau):
    return math.cos((tau + 0.008) / 1.008 * math.pi / 2) ** 2

  k = num_train_timesteps
  return np.array(
      [min(1 - alpha_bar((i + 1) / k) / alpha_bar(i / k), max_beta) for i in range(k)],
      dtype=np.float64)


def make_noise_schedule(beta_schedule: str = 'squaredcos_cap_v2',
                        num_train_timesteps: int = 100,
                        beta_start: float = 1e-4,
                        beta_end: float = 0.02) -> NoiseSchedule:
  """Builds the schedule named `beta_schedule` (`beta_start`/`beta_end`: linear ones only)."""
  if beta_schedule not in BETA_SCHEDULES:
    raise ValueError(f'diffusion.beta_schedule: unknown schedule {beta_schedule!r}; '
                     f'expected one of {BETA_SCHEDULES}')
  if int(num_train_timesteps) < 1:
    raise ValueError(f'diffusion.num_train_timesteps must be >= 1, got {num_train_timesteps}')
  k = int(num_train_timesteps)
  if beta_schedule == 'squaredcos_cap_v2':
    betas = _cosine_betas(k).astype(np.float32)
  elif beta_schedule == 'linear':
    betas = np.linspace(beta_start, beta_end, k, dtype=np.float64).astype(np.float32)
  else:  # scaled_linear: linear in sqrt(beta), squared in float32 as diffusers does.
    betas = np.linspace(beta_start**0.5, beta_end**0.5, k, dtype=np.float64).astype(np.float32)
    betas = betas**2
  alphas = np.float32(1.0) - betas
  # torch's float32 cumprod accumulates in float64 on CPU; so do we.
  alphas_cumprod = np.cumprod(alphas.astype(np.float64)).astype(np.float32)
  return NoiseSchedule(betas=jnp.asarray(betas), alphas=jnp.asarray(alphas),
                       alphas_cumprod=jnp.asarray(alphas_cumprod), num_train_timesteps=k)


def leading_timesteps(num_train_timesteps: int, num_inference_steps: int) -> np.ndarray:
  """Diffusers' 'leading' spacing (steps_offset 0): [(n-1)·r, …, r, 0], r = K // n; int32."""
  k, n = int(num_train_timesteps), int(num_inference_steps)
  if not 1 <= n <= k:
    raise ValueError(f'diffusion.num_inference_steps must be in [1, num_train_timesteps={k}], '
                     f'got {num_inference_steps}')
  return (np.arange(n, dtype=np.int64) * (k // n))[::-1].astype(np.int32)


def alphas_cumprod_at(schedule: NoiseSchedule, t: jnp.ndarray) -> jnp.ndarray:
  """abar_t for a (possibly traced) int t, and 1 for t < 0 (the step after the last one)."""
  abar = schedule.alphas_cumprod
  return jnp.where(t >= 0, abar[jnp.maximum(t, 0)], jnp.ones((), abar.dtype))
