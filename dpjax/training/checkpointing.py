"""Orbax checkpoints of a run, and exported policies that load on their own.

Layout of a workdir:
  checkpoints/<step>/{state, progress, config, normalizer}   (orbax CheckpointManager items)
  policy/{params, config.json, normalizer.json}             (export: EMA params only)

Every write is atomic: orbax writes a step into a temporary directory and renames it when
complete (a killed process leaves only a temporary directory, cleared before the next save);
exports are assembled in a temporary directory and swapped in. The latest checkpoint is always
kept, plus the `topk` best by rollout success rate; checkpoints saved without a rollout are
dropped once they are no longer the latest and more than `topk` checkpoints exist. Saves are
asynchronous: `save` returns once the arrays are copied to host memory.
"""

import json
import os
import shutil
from typing import Any

import jax
import ml_collections
import orbax.checkpoint as ocp
from etils import epath
from jax.experimental import multihost_utils
from orbax.checkpoint.checkpoint_managers import preservation_policy as preservation_lib

from dpjax.atomic_write import write_json_atomic
from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy

PyTree = Any
SUCCESS_METRIC = 'success_rate'
CONFIG_FILE = 'config.json'
NORMALIZER_FILE = 'normalizer.json'
PARAMS_DIR = 'params'
CHECKPOINTS_DIR = 'checkpoints'


def config_to_dict(config: ml_collections.ConfigDict) -> dict:
  """JSON-ready copy of a config (tuples become lists; FieldReferences resolve to values)."""
  return json.loads(config.to_json_best_effort())


def config_from_dict(data: dict) -> ml_collections.ConfigDict:
  return ml_collections.ConfigDict(data)


def _normalizer_to_dict(normalizer: Normalizer) -> dict:
  return json.loads(normalizer.to_json())


def _normalizer_from_dict(data: dict, shape_meta: ShapeMeta, source: str) -> Normalizer:
  return Normalizer.from_json(json.dumps(data), shape_meta, source=source)


class Checkpointer:
  """The run's `CheckpointManager`: full train state, data position, config, normaliser.

  All processes call every method (orbax synchronises them); only process 0 writes metadata.
  """

  def __init__(self, directory: str | os.PathLike, *, topk: int):
    self.directory = epath.Path(directory).absolute()
    policy = preservation_lib.AnyPreservationPolicy([
        preservation_lib.LatestN(1),
        preservation_lib.BestN(get_metric_fn=lambda m: m[SUCCESS_METRIC], reverse=False,
                               n=int(topk), keep_checkpoints_without_metrics=False),
    ])
    options = ocp.CheckpointManagerOptions(
        # best_fn makes orbax record each step's metrics on disk, so the ranking survives
        # restarts; the preservation policy above decides what is deleted.
        best_fn=lambda m: m[SUCCESS_METRIC],
        best_mode='max',
        preservation_policy=policy,
        cleanup_tmp_directories=True,
    )
    self._manager = ocp.CheckpointManager(
        self.directory, options=options,
        item_names=('state', 'progress', 'config', 'normalizer'))

  def latest_step(self) -> int | None:
    return self._manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self._manager.all_steps())

  def step_dir(self, step: int) -> epath.Path:
    return self.directory / str(step)

  def save(self, state, *, progress: dict, config: ml_collections.ConfigDict,
           normalizer: Normalizer, success_rate: float | None = None) -> None:
    """Saves at `state.step`; returns once arrays are copied off the devices (writes go on).

    Args:
      state: the replicated `TrainState`.
      progress: host-side position, e.g. {'epoch': 3, 'batch_in_epoch': 0}.
      config, normalizer: stored beside the state so a checkpoint is self-contained.
      success_rate: the rollout success of these EMA params, if a rollout ran; only such
        checkpoints compete for the top-k.
    """
    step = int(jax.device_get(state.step))
    metrics = None if success_rate is None else {SUCCESS_METRIC: float(success_rate)}
    self._manager.save(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardSave(state),
            progress=ocp.args.JsonSave(dict(progress, step=step)),
            config=ocp.args.JsonSave(config_to_dict(config)),
            normalizer=ocp.args.JsonSave(_normalizer_to_dict(normalizer)),
        ),
        metrics=metrics,
        force=True)

  def restore(self, abstract_state, step: int | None = None):
    """Restores (state, progress) from `step` (default: latest) onto `abstract_state`'s shardings.

    `abstract_state` is a `TrainState` of arrays or `jax.ShapeDtypeStruct`s with shardings.
    """
    step = self.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(f'{self.directory}: no finished checkpoint to restore')
    target = jax.tree.map(ocp.utils.to_shape_dtype_struct, abstract_state)
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            state=ocp.args.StandardRestore(target),
            progress=ocp.args.JsonRestore(),
        ))
    return restored.state, dict(restored.progress)

  def wait_until_finished(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()


def export_policy(directory: str | os.PathLike, *, ema_params: PyTree,
                  config: ml_collections.ConfigDict, normalizer: Normalizer) -> epath.Path:
  """Writes a self-contained policy (EMA params + config + normaliser) to `directory`.

  Collective: every process calls it. An existing export is replaced only once the new one is
  complete.
  """
  directory = epath.Path(directory).absolute()
  tmp = directory.parent / (directory.name + '.tmp')
  is_chief = jax.process_index() == 0
  if is_chief and tmp.exists():
    shutil.rmtree(tmp)
  multihost_utils.sync_global_devices('export_policy:clean')
  with ocp.StandardCheckpointer() as checkpointer:
    checkpointer.save(tmp / PARAMS_DIR, {'params': ema_params})
    checkpointer.wait_until_finished()
  if is_chief:
    write_json_atomic(tmp / CONFIG_FILE, config_to_dict(config))
    write_json_atomic(tmp / NORMALIZER_FILE, _normalizer_to_dict(normalizer))
    old = directory.parent / (directory.name + '.old')
    if directory.exists():
      os.replace(directory, old)
    os.replace(tmp, directory)
    if old.exists():
      shutil.rmtree(old)
  multihost_utils.sync_global_devices('export_policy:done')
  return directory


def _restore_target(metadata_tree: PyTree) -> PyTree:
  """Saved shapes and dtypes (orbax metadata), to restore onto the first local device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      metadata_tree)


def _make_policy(config_data: dict, normalizer_data: dict, source: str):
  config = config_from_dict(config_data)
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  normalizer = _normalizer_from_dict(normalizer_data, shape_meta, source)
  return config, DiffusionPolicy(config, shape_meta, normalizer)


def _resolve_checkpoint(path: epath.Path) -> tuple[epath.Path, int | None]:
  """(manager dir, step) for a workdir, a checkpoints dir (latest step) or a step dir."""
  if (path / CHECKPOINTS_DIR).is_dir():
    path = path / CHECKPOINTS_DIR
  if path.name.isdigit() and (path / 'state').is_dir():
    return path.parent, int(path.name)
  return path, None


def load_policy(path: str | os.PathLike):
  """Loads `(config, policy, variables)` from an export, a workdir, a checkpoints dir or a step.

  `variables` = {'params': EMA params} on the first local device, ready for
  `policy.predict_action`. A workdir or checkpoints dir means its latest checkpoint.
  """
  path = epath.Path(path).absolute()
  if (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file():
    config, policy = _make_policy(json.loads((path / CONFIG_FILE).read_text()),
                                  json.loads((path / NORMALIZER_FILE).read_text()),
                                  str(path / NORMALIZER_FILE))
    with ocp.StandardCheckpointer() as checkpointer:
      target = _restore_target(checkpointer.metadata(path / PARAMS_DIR).item_metadata.tree)
      variables = checkpointer.restore(path / PARAMS_DIR, target)
    return config, policy, dict(variables)

  manager_dir, step = _resolve_checkpoint(path)
  if not manager_dir.is_dir():
    raise FileNotFoundError(f'{path}: no such policy export, workdir or checkpoint directory')
  options = ocp.CheckpointManagerOptions(read_only=True)
  with ocp.CheckpointManager(manager_dir, options=options,
                             item_names=('state', 'progress', 'config', 'normalizer')) as manager:
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'{path}: expected a policy export ({PARAMS_DIR}/ + {CONFIG_FILE}) or orbax '
          'checkpoints; found neither')
    meta = manager.restore(step, args=ocp.args.Composite(
        config=ocp.args.JsonRestore(), normalizer=ocp.args.JsonRestore()))
    config, policy = _make_policy(dict(meta.config), dict(meta.normalizer),
                                  f'{manager_dir / str(step)} (normalizer)')
    with ocp.PyTreeCheckpointer() as checkpointer:
      saved = checkpointer.metadata(manager_dir / str(step) / 'state').item_metadata.tree
    target = {'ema_params': _restore_target(saved['ema_params'])}
    restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.PyTreeRestore(
        item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
        partial_restore=True)))
  return config, policy, {'params': restored.state['ema_params']}
