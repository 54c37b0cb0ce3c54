"""Data parallelism: a 1-D ('data',) mesh over all devices of all hosts, and the jitted step.

The step is one `jax.jit` with `NamedSharding`s: the batch is split along its leading axis over
the mesh, the train state is replicated and donated, and XLA inserts the gradient all-reduce
(the `pmean` of a pmap step). Randomness is drawn with global shapes from one key
(`jax_threefry_partitionable`), so a run on 1 device and on N devices computes the same numbers
up to the order of floating-point reductions.
"""

from typing import Any, Callable

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding, PartitionSpec as P

from dpjax.training import ema as ema_lib
from dpjax.training.train_state import TrainState

DATA_AXIS = 'data'
PyTree = Any
# loss_fn(params, batch, rng) -> (scalar loss, {name: scalar}).
LossFn = Callable[[PyTree, PyTree, jax.Array], tuple[jax.Array, dict[str, jax.Array]]]


def make_mesh(devices=None) -> Mesh:
  """All devices of all processes (or `devices`) on one 'data' axis."""
  devices = jax.devices() if devices is None else list(devices)
  return Mesh(np.asarray(devices), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P())


def batch_sharded(mesh: Mesh) -> NamedSharding:
  return NamedSharding(mesh, P(DATA_AXIS))


def check_global_batch_size(global_batch_size: int, mesh: Mesh) -> None:
  """The global batch must split evenly over devices (and hence over processes)."""
  num_devices = mesh.devices.size
  if global_batch_size % num_devices:
    raise ValueError(
        f'config.data.batch_size={global_batch_size} (the global batch) does not divide by the '
        f'{num_devices} devices of the mesh; use a multiple of {num_devices}.')


def per_process_batch_size(global_batch_size: int, mesh: Mesh) -> int:
  """Rows of the global batch that this process loads (its devices' share)."""
  check_global_batch_size(global_batch_size, mesh)
  local_devices = sum(d.process_index == jax.process_index() for d in mesh.devices.flat)
  return global_batch_size // mesh.devices.size * local_devices


def replicate(tree: PyTree, mesh: Mesh) -> PyTree:
  """Host values, identical on every process, → global arrays replicated over the mesh."""
  sharding = replicated(mesh)

  def put(x):
    x = np.asarray(x)
    return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])

  return jax.tree.map(put, tree)


def shard_batch(local_batch: PyTree, mesh: Mesh) -> PyTree:
  """This process's numpy rows → global arrays split over the mesh (rows ordered by process)."""
  sharding = batch_sharded(mesh)
  return jax.tree.map(
      lambda x: jax.make_array_from_process_local_data(sharding, np.asarray(x)), local_batch)


def make_train_step(loss_fn: LossFn,
                    tx: optax.GradientTransformation,
                    mesh: Mesh,
                    *,
                    ema_config: ml_collections.ConfigDict,
                    gradient_accumulate_every: int = 1):
  """Returns `step(state, batch) -> (state, metrics)`, jitted over the mesh, state donated.

  One call consumes one micro-batch. The optimiser (wrapped in `optax.MultiSteps` when
  accumulating) applies an update every `gradient_accumulate_every` calls; the EMA follows only
  those updates, counting optimiser steps as the reference counts `optimization_step`.
  With `ema_config.enabled` False the EMA tree simply mirrors the parameters.
  """
  accumulate = int(gradient_accumulate_every)

  def step_fn(state: TrainState, batch: PyTree):
    rng, step_rng = jax.random.split(state.rng)
    (loss, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, batch, step_rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    step = state.step + 1
    applied = step % accumulate == 0
    if ema_config.enabled:
      decay = ema_lib.ema_decay(step // accumulate - 1, ema_config)
    else:
      decay = jnp.zeros((), jnp.float32)
    # Between optimiser updates decay 1 keeps the EMA bit-for-bit.
    ema_params = ema_lib.ema_update(state.ema_params, params, jnp.where(applied, decay, 1.0))
    metrics = dict(metrics, loss=loss, grad_norm=optax.tree.norm(grads), ema_decay=decay)
    new_state = state.replace(step=step, params=params, ema_params=ema_params,
                              opt_state=opt_state, rng=rng)
    return new_state, metrics

  repl = replicated(mesh)
  return jax.jit(step_fn, in_shardings=(repl, batch_sharded(mesh)),
                 out_shardings=(repl, repl), donate_argnums=(0,))


def make_batch_fn(fn: Callable, mesh: Mesh):
  """Jits `fn(replicated_arg, batch, rng)` with the batch split over the mesh, results replicated.

  Used for validation loss and sampling, which read the state but do not change it.
  """
  repl = replicated(mesh)
  return jax.jit(fn, in_shardings=(repl, batch_sharded(mesh), repl), out_shardings=repl)
