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

import contextlib
import json
import logging
import os
import shutil
from collections.abc import Iterator
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
from dpjax.errors import InputError, root_cause
from dpjax.training import config_checks
from dpjax.tree_shapes import shape_differences, summarize

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


class _DropMessages(logging.Filter):
  def __init__(self, prefixes: tuple[str, ...]):
    super().__init__()
    self._prefixes = prefixes

  def filter(self, record: logging.LogRecord) -> bool:
    return not record.getMessage().startswith(self._prefixes)


@contextlib.contextmanager
def _without_messages(logger_name: str, *prefixes: str) -> Iterator[None]:
  """Drops `logger_name`'s records that start with one of `prefixes` while the block runs."""
  logger = logging.getLogger(logger_name)
  log_filter = _DropMessages(prefixes)
  logger.addFilter(log_filter)
  try:
    yield
  finally:
    logger.removeFilter(log_filter)


def _one_error_per_failed_read() -> contextlib.AbstractContextManager[None]:
  """orbax reads a checkpoint's arrays as concurrent asyncio tasks: when the files are damaged,
  the first failure is raised (and reported as one message by the callers) while every other
  task's failure would be logged by asyncio as a traceback of its own."""
  return _without_messages('asyncio', 'Task exception was never retrieved')


def _saved_state_tree(step_dir: epath.Path) -> PyTree:
  """The shapes and dtypes of a step's saved train state (orbax metadata; no arrays read)."""
  state_dir = step_dir / 'state'
  if not state_dir.is_dir():
    raise FileNotFoundError(f'{state_dir} does not exist')
  # The step's _CHECKPOINT_METADATA is one level up, where the manager wrote it.
  with (ocp.PyTreeCheckpointer() as checkpointer,
        _without_messages('absl', 'Metadata file does not exist')):
    metadata = checkpointer.metadata(state_dir).item_metadata
  if metadata is None:  # orbax logs why and returns nothing.
    raise ValueError(f'orbax cannot read the array metadata of {state_dir} (files missing or '
                     'corrupt)')
  return metadata.tree


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
    # Checkpoints without a rollout are meant to stay out of the top-k; orbax would warn at each.
    with _without_messages('absl', 'Requested `tracked_metric`; did not provide metrics'):
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
    with _one_error_per_failed_read():
      restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
              state=ocp.args.StandardRestore(target),
              progress=ocp.args.JsonRestore(),
          ))
    return restored.state, dict(restored.progress)

  def read_metadata(self, step: int) -> tuple[dict, dict, dict]:
    """The (config, normalizer, progress) JSON items stored with `step`, without its arrays.

    A resumed run compares them with its own before restoring the (much larger) state.
    """
    restored = self._manager.restore(
        step,
        args=ocp.args.Composite(
            config=ocp.args.JsonRestore(),
            normalizer=ocp.args.JsonRestore(),
            progress=ocp.args.JsonRestore(),
        ))
    return dict(restored.config), dict(restored.normalizer), dict(restored.progress)

  def state_mismatches(self, abstract_state, step: int) -> list[str]:
    """How `step`'s saved train state differs from `abstract_state` in arrays and shapes.

    Read from orbax's metadata (no arrays are loaded); each entry names a dotted path such as
    'opt_state.0.mu.noise_model.kernel'. Empty when `restore` onto `abstract_state` fits.
    """
    return shape_differences(_saved_state_tree(self.step_dir(step)), abstract_state,
                             got_name='the checkpoint', expected_name='this run')

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


class PolicyLoadError(InputError):
  """A policy export or checkpoint that cannot be loaded: a file missing, corrupt or truncated,
  or parameters that do not match the saved config."""


def is_policy_export(path: str | os.PathLike) -> bool:
  """Whether `path` looks like an `export_policy` folder."""
  path = epath.Path(path)
  return (path / PARAMS_DIR).is_dir() and (path / CONFIG_FILE).is_file()


def _read_json(path: epath.Path) -> dict:
  try:
    data = json.loads(path.read_text())
  except FileNotFoundError as e:
    raise PolicyLoadError(f'{path}: missing; a policy export holds {PARAMS_DIR}/, '
                          f'{CONFIG_FILE} and {NORMALIZER_FILE}') from e
  except (json.JSONDecodeError, UnicodeDecodeError) as e:
    raise PolicyLoadError(f'{path}: not valid JSON ({e}); the file is corrupt or '
                          'truncated') from e
  if not isinstance(data, dict):
    raise PolicyLoadError(f'{path}: expected a JSON object, found {type(data).__name__}')
  return data


def _make_policy(config_data: dict, normalizer_data: dict, config_source: str,
                 normalizer_source: str):
  config = config_from_dict(config_data)
  try:
    config_checks.check_config(config)
  except config_checks.ConfigError as e:
    raise PolicyLoadError(f'{config_source}: not a valid dpjax config:\n  '
                          + '\n  '.join(e.problems)) from e
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  normalizer = _normalizer_from_dict(normalizer_data, shape_meta, normalizer_source)
  return config, DiffusionPolicy(config, shape_meta, normalizer)


def _restore_target(metadata_tree: PyTree) -> PyTree:
  """Saved shapes and dtypes (orbax metadata), to restore onto the first local device."""
  sharding = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
  return jax.tree.map(lambda m: jax.ShapeDtypeStruct(m.shape, m.dtype, sharding=sharding),
                      metadata_tree)


def _check_param_shapes(saved: PyTree, policy: DiffusionPolicy, source: str) -> None:
  """The saved parameters must be the ones the saved config builds (else sampling would fail
  deep inside the network, naming neither)."""
  problems = shape_differences(saved, policy.param_shapes(), got_name='the checkpoint',
                               expected_name='the network the saved config builds')
  if problems:
    raise PolicyLoadError(f'{source}: the saved parameters do not match the saved config '
                          f'({summarize(problems)})')


def _resolve_checkpoint(path: epath.Path) -> tuple[epath.Path, int | None]:
  """(manager dir, step) for a workdir, a checkpoints dir (latest step) or a step dir."""
  if (path / CHECKPOINTS_DIR).is_dir():
    path = path / CHECKPOINTS_DIR
  if path.name.isdigit() and (path / 'state').is_dir():
    return path.parent, int(path.name)
  return path, None


def _load_export(path: epath.Path):
  config, policy = _make_policy(_read_json(path / CONFIG_FILE),
                                _read_json(path / NORMALIZER_FILE), str(path / CONFIG_FILE),
                                str(path / NORMALIZER_FILE))
  params_dir = path / PARAMS_DIR

  def damaged(reason: str) -> PolicyLoadError:
    return PolicyLoadError(f'{params_dir}: the parameters cannot be read ({reason}); the export '
                           'is damaged: export it again from its run\'s checkpoints')

  try:
    with _one_error_per_failed_read(), ocp.StandardCheckpointer() as checkpointer:
      metadata = checkpointer.metadata(params_dir).item_metadata
      if metadata is None:
        raise damaged('orbax finds no metadata')
      saved = metadata.tree
      _check_param_shapes(saved['params'], policy, str(params_dir))
      variables = checkpointer.restore(params_dir, _restore_target(saved))
  except PolicyLoadError:
    raise
  except Exception as e:  # orbax and TensorStore raise many kinds for a damaged folder.
    raise damaged(root_cause(e)) from e
  return config, policy, dict(variables)


def _load_checkpoint(path: epath.Path):
  manager_dir, step = _resolve_checkpoint(path)
  if not manager_dir.is_dir():
    raise FileNotFoundError(f'{path}: no such policy export, workdir or checkpoint directory')
  # Stated, not left to orbax to override with a warning each; read-only is the point.
  options = ocp.CheckpointManagerOptions(read_only=True, save_interval_steps=0, create=False)
  with (_without_messages('absl', 'Given directory is read only'),
        ocp.CheckpointManager(manager_dir, options=options,
                              item_names=('state', 'progress', 'config', 'normalizer'))
        as manager):
    step = manager.latest_step() if step is None else step
    if step is None:
      raise FileNotFoundError(
          f'{path}: expected a policy export ({PARAMS_DIR}/ + {CONFIG_FILE}) or orbax '
          'checkpoints; found neither')
    step_dir = manager_dir / str(step)
    try:
      meta = manager.restore(step, args=ocp.args.Composite(
          config=ocp.args.JsonRestore(), normalizer=ocp.args.JsonRestore()))
      config, policy = _make_policy(dict(meta.config), dict(meta.normalizer),
                                    f'{step_dir} (config)', f'{step_dir} (normalizer)')
      saved = _saved_state_tree(step_dir)
      _check_param_shapes(saved['ema_params'], policy, f'{step_dir} (ema_params)')
      target = {'ema_params': _restore_target(saved['ema_params'])}
      with _one_error_per_failed_read():
        restored = manager.restore(step, args=ocp.args.Composite(
            state=ocp.args.PyTreeRestore(
                item=target, restore_args=ocp.checkpoint_utils.construct_restore_args(target),
                partial_restore=True)))
    except PolicyLoadError:
      raise
    except Exception as e:  # orbax and TensorStore raise many kinds for a damaged step.
      raise PolicyLoadError(f'{step_dir}: the checkpoint cannot be read ({root_cause(e)}); '
                            'evaluate another step of the run') from e
  return config, policy, {'params': restored.state['ema_params']}


def load_policy(path: str | os.PathLike):
  """Loads `(config, policy, variables)` from an export, a workdir, a checkpoints dir or a step.

  `variables` = {'params': EMA params} on the first local device, ready for
  `policy.predict_action`. A workdir or checkpoints dir means its latest checkpoint.

  Raises:
    FileNotFoundError: `path` is none of these.
    PolicyLoadError: a file of it is missing, corrupt or truncated, or its parameters do not
      match its config; the message names the file.
  """
  path = epath.Path(path).absolute()
  if is_policy_export(path):
    return _load_export(path)
  return _load_checkpoint(path)
