"""The one pytree a training run carries and checkpoints: step, params, EMA, optimiser state, RNG.

`step` counts micro-batches (data batches consumed); with gradient accumulation the optimiser
steps every `gradient_accumulate_every` of them. Where the data iterator stands (epoch, batch in
epoch) is host-side and lives beside this state in the checkpoint (see checkpointing.py).
"""

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

PyTree = Any


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 scalar: micro-batches consumed.
  params: PyTree  # Raw parameters (`variables['params']`), trained by the optimiser.
  ema_params: PyTree  # EMA copy: sampling, rollouts, exported policies.
  opt_state: optax.OptState
  rng: jax.Array  # Raw uint32[2] PRNG key (orbax-friendly), split once per step.


def create_train_state(params: PyTree, tx: optax.GradientTransformation,
                       rng: jax.Array) -> TrainState:
  """Step 0 from initial `params`; the EMA starts as a copy (the reference's deepcopy).

  Pure and jit-able: the trainer jits it with replicated `out_shardings`, so every host builds
  the same global state.
  """
  return TrainState(
      step=jnp.zeros((), jnp.int32),
      params=params,
      ema_params=jax.tree.map(jnp.copy, params),
      opt_state=tx.init(params),
      rng=rng,
  )
