"""Runs the scripted expert in robosuite Lift and writes the successful episodes as robomimic hdf5.

Attempt i of a run with seed s uses only `SeedSequence(s, spawn_key=(i,))` for its reset and
its expert, and successes are kept in attempt order, so the file is the same for any number of
workers. Workers are `spawn`ed processes (an EGL context does not survive `fork`), one Lift env
each. The file is written to a temporary name beside `path` and renamed at the end: a crash or
an error never leaves a partial dataset at `path`.

Layout written (SPEC §1): `data` (attrs `total`, `env_args`), `data/demo_<k>` (attrs
`num_samples`, `reset_seed`, `attempt`) with `obs/<key> (L, ...)`, `actions (L, 7) float32`,
`executed_actions (L, 7) float32`, `rewards (L,)`, `dones (L,)`, `states (L, S)`;
`mask/train`, `mask/valid` (demo names, bytes). `actions` are the expert's noise-free labels, what
a policy learns; `executed_actions` are what the env was stepped with (labels plus the expert's
injected noise, see `scripted_expert`), so replaying them from `states[0]` retraces the demo.
"""

import contextlib
import dataclasses
import json
import multiprocessing
import os
import time
from collections.abc import Iterator
from typing import Any

import h5py
import numpy as np
import tqdm

from dpjax.atomic_write import atomic_path
from dpjax.envs.scripted_expert import LiftExpert
from dpjax.errors import InputError

# Bumped when the same (seed, count) would give different demos, so stale caches are not reused
# (2: `actions` became the noise-free labels; 3: the expert holds the gripper top-down;
# 4: fumbled first grasps and empty-grip miss detection, so demos show recoveries).
DEMO_VERSION = 4
VALID_RATIO = 0.1
MAX_EPISODE_STEPS = 150
# Steps recorded after the first success, so demos end holding the cube up.
HOLD_STEPS_AFTER_SUCCESS = 5
# robosuite's concatenations of other keys are not stored; 'object-state' keeps robomimic's name.
_SKIPPED_OBS = ('robot0_proprio-state',)
_RENAMED_OBS = {'object-state': 'object'}


@dataclasses.dataclass(frozen=True)
class EpisodeRecord:
  """One expert attempt; obs keys hold (L, ...) arrays, states (L, S)."""
  attempt: int
  reset_seed: int
  success: bool
  obs: dict[str, np.ndarray]
  actions: np.ndarray
  executed_actions: np.ndarray
  rewards: np.ndarray
  dones: np.ndarray
  states: np.ndarray


def attempt_seeds(seed: int, attempt: int) -> tuple[int, np.random.Generator]:
  """(env reset seed, expert RNG) of one attempt; independent of how attempts are scheduled."""
  sequence = np.random.SeedSequence(seed, spawn_key=(attempt,))
  reset_seed = int(sequence.generate_state(1)[0])
  return reset_seed, np.random.default_rng(sequence)


class _EpisodeRunner:
  """Holds one Lift env (created in the process that uses it) and runs expert attempts."""

  def __init__(self, image_size: int, seed: int, max_episode_steps: int):
    # Imported here: robosuite must load in the worker, after the rendering backend is chosen.
    from dpjax.envs import lift  # pylint: disable=g-import-not-at-top
    # ignore_done=True: the horizon never ends an episode; the default keeps env_args = SPEC.
    self._env = lift.make_lift_env(image_size=image_size)
    self._seed = seed
    self._max_steps = max_episode_steps

  def env_args(self) -> dict[str, Any]:
    return self._env.env_args()

  def close(self) -> None:
    self._env.close()

  def run(self, attempt: int) -> EpisodeRecord:
    reset_seed, expert_rng = attempt_seeds(self._seed, attempt)
    expert = LiftExpert(expert_rng)
    obs = self._env.reset(seed=reset_seed)
    steps, actions, executed, rewards, states = [], [], [], [], []
    success_step = None
    for t in range(self._max_steps):
      states.append(self._env.get_state())
      steps.append(obs)
      action = expert.act(obs)
      obs, reward, _, _ = self._env.step(action.executed)
      success = self._env.is_success()
      actions.append(action.label)
      executed.append(action.executed)
      rewards.append(reward)
      if success and success_step is None:
        success_step = t
      if success_step is not None and t >= success_step + HOLD_STEPS_AFTER_SUCCESS:
        break
    # A demo must end with the cube held up, not merely having touched the threshold once.
    succeeded = success_step is not None and self._env.is_success()
    # As robomimic: done marks the last step of the demo only.
    dones = np.zeros(len(actions), dtype=np.uint8)
    dones[-1] = 1
    stored = {}
    for key in steps[0]:
      if key in _SKIPPED_OBS:
        continue
      stored[_RENAMED_OBS.get(key, key)] = np.stack([s[key] for s in steps])
    return EpisodeRecord(
        attempt=attempt, reset_seed=reset_seed, success=succeeded, obs=stored,
        actions=np.stack(actions).astype(np.float32),
        executed_actions=np.stack(executed).astype(np.float32),
        rewards=np.asarray(rewards, dtype=np.float32),
        dones=dones,
        states=np.stack(states))


# Per worker process: the runner made by `_init_worker` (Pool initializers cannot return it),
# or the error that prevented making it.
_WORKER_STATE: dict[str, Any] = {}


def _init_worker(image_size: int, seed: int, max_episode_steps: int) -> None:
  # Several llvmpipe renderers each spawning a thread per core only fight over the cores.
  os.environ.setdefault('LP_NUM_THREADS', '1')
  try:
    _WORKER_STATE['runner'] = _EpisodeRunner(image_size, seed, max_episode_steps)
  except Exception as e:  # pylint: disable=broad-exception-caught
    # A Pool restarts workers whose initializer raises, forever; report it from a task instead.
    _WORKER_STATE['error'] = e


def _worker_runner() -> _EpisodeRunner:
  if 'error' in _WORKER_STATE:
    raise RuntimeError(
        f'demo worker could not create the Lift env: {_WORKER_STATE["error"]!r}'
    ) from _WORKER_STATE['error']
  return _WORKER_STATE['runner']


def _run_in_worker(attempt: int) -> EpisodeRecord:
  return _worker_runner().run(attempt)


def _env_args_in_worker(_: int) -> dict[str, Any]:
  return _worker_runner().env_args()


@contextlib.contextmanager
def _episodes(image_size: int, seed: int, max_episode_steps: int, num_workers: int,
              max_attempts: int) -> Iterator[tuple[dict[str, Any], Iterator[EpisodeRecord]]]:
  """Yields (env_args, attempts 0, 1, ... in order); stops the workers on exit."""
  if num_workers == 1:
    runner = _EpisodeRunner(image_size, seed, max_episode_steps)
    try:
      yield runner.env_args(), (runner.run(i) for i in range(max_attempts))
    finally:
      runner.close()
    return
  from dpjax.envs import rendering  # pylint: disable=g-import-not-at-top
  # Chosen once here; the spawned workers inherit MUJOCO_GL through the environment.
  rendering.configure_headless_rendering()
  context = multiprocessing.get_context('spawn')
  pool = context.Pool(num_workers, initializer=_init_worker,
                      initargs=(image_size, seed, max_episode_steps))
  try:
    env_args = pool.apply(_env_args_in_worker, (0,))
    yield env_args, pool.imap(_run_in_worker, range(max_attempts))
  finally:
    pool.terminate()
    pool.join()


def _split_masks(names: list[str], seed: int) -> dict[str, list[str]]:
  """~10 % of demos to 'valid' (at least one, never all), chosen by `seed`."""
  n = len(names)
  n_valid = min(max(1, round(n * VALID_RATIO)), n - 1) if n > 1 else 0
  valid = set(np.random.default_rng(seed).permutation(n)[:n_valid].tolist())
  return {
      'train': [name for i, name in enumerate(names) if i not in valid],
      'valid': [name for i, name in enumerate(names) if i in valid],
  }


def _write_demo(data: h5py.Group, name: str, record: EpisodeRecord) -> None:
  group = data.create_group(name)
  group.attrs['num_samples'] = record.actions.shape[0]
  group.attrs['reset_seed'] = record.reset_seed
  group.attrs['attempt'] = record.attempt
  for key, array in record.obs.items():
    # Rendered frames compress several-fold; low-dim arrays are too small to bother.
    compression = 'gzip' if array.dtype == np.uint8 else None
    group.create_dataset(f'obs/{key}', data=array, compression=compression)
  group.create_dataset('actions', data=record.actions)
  group.create_dataset('executed_actions', data=record.executed_actions)
  group.create_dataset('rewards', data=record.rewards)
  group.create_dataset('dones', data=record.dones)
  group.create_dataset('states', data=record.states)


def generate_demos(path: str | os.PathLike[str], num_demos: int, seed: int,
                   num_workers: int = 0, image_size: int = 84, progress: bool = True,
                   max_attempts: int | None = None,
                   max_episode_steps: int = MAX_EPISODE_STEPS) -> dict[str, Any]:
  """Writes `num_demos` successful expert demos to `path` (robomimic hdf5); returns stats.

  Args:
    path: output file; replaced atomically, its directory is created if needed.
    num_demos: successful episodes to keep.
    seed: determines every episode (and the train/valid masks).
    num_workers: processes rendering episodes; 0 means one per CPU core, 1 runs in-process.
    image_size: side of the square camera images.
    progress: show a tqdm bar.
    max_attempts: give up after this many attempts (default 2 * num_demos + 10).
    max_episode_steps: an attempt not holding the cube up by then fails.

  Returns:
    dict with path, attempts, successes, expert_success_rate, mean_length, total_samples,
    num_workers, wall_s, episodes_per_min (attempts) and demos_per_min (kept).

  Raises:
    RuntimeError: the expert succeeded too rarely to reach num_demos within max_attempts.
  """
  if num_demos < 1:
    raise InputError(f'num_demos must be >= 1, got {num_demos}')
  if image_size < 8:
    raise InputError(f'image_size must be >= 8 pixels, got {image_size}')
  if num_workers < 0:
    raise InputError(f'num_workers must be >= 0 (0: one per CPU core), got {num_workers}')
  if seed < 0:
    raise InputError(f'seed must be >= 0 (it seeds numpy), got {seed}')
  path = os.fspath(path)
  num_workers = num_workers or len(os.sched_getaffinity(0))
  max_attempts = max_attempts or 2 * num_demos + 10
  start = time.monotonic()
  attempts = 0
  names, lengths = [], []
  bar = tqdm.tqdm(total=num_demos, desc='expert demos', unit='demo', disable=not progress)
  try:
    with atomic_path(path) as tmp_path, h5py.File(tmp_path, 'w') as f, _episodes(
        image_size, seed, max_episode_steps, num_workers, max_attempts) as (env_args, records):
      data = f.create_group('data')
      for record in records:
        attempts += 1
        if record.success:
          name = f'demo_{len(names)}'
          _write_demo(data, name, record)
          names.append(name)
          lengths.append(record.actions.shape[0])
          bar.update(1)
        bar.set_postfix(attempts=attempts, success=f'{len(names) / attempts:.0%}')
        if len(names) == num_demos:
          break
      if len(names) < num_demos:
        raise RuntimeError(
            f'scripted expert succeeded in only {len(names)} of {attempts} attempts '
            f'(seed {seed}); {num_demos} demos were requested. Raise max_attempts or check '
            'the environment.')
      data.attrs['total'] = int(sum(lengths))
      data.attrs['env_args'] = json.dumps(env_args)
      for key, subset in _split_masks(names, seed).items():
        f.create_dataset(f'mask/{key}', data=np.array(subset, dtype='S'))
  finally:
    bar.close()
  wall_s = time.monotonic() - start
  return {
      'path': path,
      'attempts': attempts,
      'successes': len(names),
      'expert_success_rate': len(names) / attempts,
      'mean_length': float(np.mean(lengths)),
      'total_samples': int(sum(lengths)),
      'num_workers': num_workers,
      'wall_s': round(wall_s, 2),
      'episodes_per_min': round(attempts / wall_s * 60.0, 2),
      'demos_per_min': round(len(names) / wall_s * 60.0, 2),
  }
