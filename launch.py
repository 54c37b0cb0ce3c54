"""Command line: parse the config, start multi-host JAX if asked, train and evaluate.

  python launch.py --config configs/lift.py[:VARIANT] [--config.training.num_epochs=5]
                   [--workdir runs/my_run]

Without --workdir a fresh folder under runs/ is used; pass an existing workdir to resume it
(config.training.resume). Without a dataset under config.data.data_dir, demonstrations are
generated and the dataset is built first.

Multi-host: run the same command on every host with --coordinator_address=HOST:PORT
--num_processes=N --process_id=I (and one shared --workdir), or with --distributed to let
`jax.distributed.initialize()` read the cluster's environment (SLURM, Cloud TPU, ...).
"""

import datetime
import logging as pylogging
import os
import sys

import jax
from absl import app, flags, logging
from ml_collections import config_flags

from dpjax.errors import report_user_errors

_CONFIG = config_flags.DEFINE_config_file(
    'config', None, 'Config file and variant, e.g. configs/lift.py:cpu.', lock_config=True)
_WORKDIR = flags.DEFINE_string(
    'workdir', None, 'Run directory (checkpoints, metrics, exported policy). Default: a fresh '
    'runs/<config.name>_<date-time>; required with several processes.')
_COORDINATOR = flags.DEFINE_string(
    'coordinator_address', None, 'HOST:PORT of process 0, for a multi-process run.')
_NUM_PROCESSES = flags.DEFINE_integer('num_processes', None, 'Processes in the run.')
_PROCESS_ID = flags.DEFINE_integer('process_id', None, 'This process, 0 … num_processes − 1.')
_DISTRIBUTED = flags.DEFINE_bool(
    'distributed', False, 'Initialise jax.distributed from the cluster environment.')
flags.mark_flag_as_required('config')


def _initialize_distribution() -> None:
  explicit = [_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value]
  if any(v is not None for v in explicit):
    if not all(v is not None for v in explicit):
      raise app.UsageError('--coordinator_address, --num_processes and --process_id go '
                           'together: pass all three (or --distributed for the cluster '
                           'environment)')
    if _NUM_PROCESSES.value < 1:
      raise app.UsageError(f'--num_processes={_NUM_PROCESSES.value}: expected >= 1')
    if not 0 <= _PROCESS_ID.value < _NUM_PROCESSES.value:
      raise app.UsageError(f'--process_id={_PROCESS_ID.value}: expected 0 … --num_processes '
                           f'− 1 = {_NUM_PROCESSES.value - 1}')
    jax.distributed.initialize(coordinator_address=_COORDINATOR.value,
                               num_processes=_NUM_PROCESSES.value,
                               process_id=_PROCESS_ID.value)
  elif _DISTRIBUTED.value:
    try:
      jax.distributed.initialize()
    except ValueError as e:  # JAX found no cluster to read the three values from.
      raise app.UsageError(f'--distributed: {e} No cluster environment (SLURM, Cloud TPU, ...) '
                           'was recognised; pass --coordinator_address, --num_processes and '
                           '--process_id instead') from None


def _config_file(argv: list[str]) -> str | None:
  """The file that --config names in `argv` (the last one given, without its :VARIANT); None
  where --config has no value on the command line."""
  path = None
  for i, arg in enumerate(argv[1:], 1):
    name, has_value, value = arg.partition('=')
    if name in ('--config', '-config'):
      if not has_value:
        value = argv[i + 1] if i + 1 < len(argv) else ''
      path = value.split(':', 1)[0] or None
  return path


def _parse_flags(argv: list[str]) -> list[str]:
  """absl's flag parsing, and one message for a missing config file (ml_collections keeps the
  error until the config is first read, then raises it with a 30-line traceback) or for an
  override that names no config field (ml_collections raises a bare AttributeError there, which
  absl does not catch)."""
  path = _config_file(argv)
  if path is not None and not os.path.isfile(path):
    sys.exit(f'error: {path}: no such config file')
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:
    cause = e.args[0] if e.args and isinstance(e.args[0], KeyError) else e
    message = str(cause.args[0] if cause.args else cause)
    field = message.splitlines()[0].strip("'") if message else ''
    overrides = [a.split('=')[0] for a in argv[1:] if a.startswith('--config.')]
    if not field or not any(f'.{field}' in o for o in overrides):
      raise  # Not an override's: a bug in the config file, with its traceback.
    sys.exit('error: a --config.* override names no field of the config: '
             + message.replace('\n', ' '))


def _quiet_checkpoint_logs() -> None:
  """orbax logs each file it writes at INFO; keep its warnings and errors only."""
  logging.get_absl_handler().addFilter(
      lambda record: record.levelno >= pylogging.WARNING or '/orbax/' not in record.pathname)


def default_workdir(name: str, root: str = 'runs') -> str:
  """A folder under `root` that does not exist yet: <name>_<YYYYmmdd-HHMMSS>[_k]."""
  stamp = datetime.datetime.now().strftime('%Y%m%d-%H%M%S')
  path = os.path.join(root, f'{name}_{stamp}')
  candidate, k = path, 1
  while os.path.exists(candidate):
    candidate, k = f'{path}_{k}', k + 1
  return candidate


def main(argv) -> None:
  if len(argv) > 1:
    raise app.UsageError(f'unexpected arguments: {argv[1:]}')
  _quiet_checkpoint_logs()
  _initialize_distribution()
  config = _CONFIG.value
  workdir = _WORKDIR.value
  if workdir is None:
    if jax.process_count() > 1:
      raise app.UsageError('--workdir is required with several processes (all must share it)')
    workdir = default_workdir(config.name)
  logging.info('process %d/%d, devices %s, workdir %s', jax.process_index(),
               jax.process_count(), jax.devices(), workdir)
  # Imported here, not at the top: the evaluation's spawned env workers re-import this module,
  # and TensorFlow (pulled in by the trainer's data pipeline) loaded next to MuJoCo's EGL
  # context makes them crash.
  from dpjax.training import trainer  # pylint: disable=g-import-not-at-top
  trainer.train_and_evaluate(config, workdir)
  if jax.process_index() == 0:
    print(f'Training finished; summary in {os.path.join(workdir, trainer.SUMMARY_FILE)}',
          flush=True)


if __name__ == '__main__':
  app.run(report_user_errors(main), flags_parser=_parse_flags)
