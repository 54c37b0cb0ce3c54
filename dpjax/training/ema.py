"""Exponential moving average of the parameters, the reference `EMAModel` decay (SPEC §7).

`count` is the number of EMA updates already applied (the reference's `optimization_step`), so the
first two updates copy the parameters (decay 0) and the third uses ≈ 0.405.
"""

import jax
import jax.numpy as jnp
import ml_collections


def ema_decay(count, ema_config: ml_collections.ConfigDict):
  """Decay for the update that follows `count` earlier updates; jit-safe (count may be traced).

  step' = max(0, count − update_after_step − 1);
  decay = 0 if step' ≤ 0 else clip(1 − (1 + step'/inv_gamma)^(−power), min_value, max_value).
  """
  step = jnp.maximum(jnp.asarray(count, jnp.float32) - ema_config.update_after_step - 1, 0.0)
  value = 1.0 - (1.0 + step / ema_config.inv_gamma) ** (-ema_config.power)
  value = jnp.clip(value, ema_config.min_value, ema_config.max_value)
  return jnp.where(step <= 0, 0.0, value)


def ema_update(ema_params, params, decay):
  """ema ← decay · ema + (1 − decay) · params, leaf by leaf (dtype of the EMA tree kept)."""
  return jax.tree.map(
      lambda e, p: (decay * e + (1.0 - decay) * p).astype(e.dtype), ema_params, params)
