"""Policy evaluation in robosuite Lift: protocol, batched policy calls, aggregates (SPEC §8).

Protocol: test episodes reset from seeds seed_start + i; optional train episodes reset to the
initial simulator states of the dataset's first demos. Each env runs the reference multi-step
semantics (`multistep.py`) in a worker process (`vector_env.py`). Per chunk the policy is ONE
call for all envs: a batch {key: (num_envs, To, ...)} -> actions (num_envs, n_action_steps, Da).
Rows of envs without an episode (the tail of the evaluation, crashed workers) are filled with a
copy of an active row, so the batch shape never changes and the jitted policy compiles once.

The episode score is its max reward (1 on success); the headline metric is the mean success over
test episodes, reported with a 95 % Wilson interval. A non-finite action is an error
(`NonFiniteActionError`, naming the episode's seed and env step); a crashed worker only fails
its own episode, which is marked `crashed`.
"""

import collections
import dataclasses
import logging
import os
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

import h5py
import jax
import numpy as np
import tqdm

from dpjax.atomic_write import write_json_atomic
from dpjax.data.robomimic import RobomimicFile
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.errors import InputError, UserFacingError
from dpjax.evaluation import stats
from dpjax.evaluation.vector_env import (MAX_CONSECUTIVE_CRASHES, LiftEnvFactory, VectorEnv,
                                         WorkerCrash, WrapperSpec, default_num_envs)
from dpjax.evaluation.video import (DEFAULT_VIEW_KEYS, episode_video_name, prepare_video_dir,
                                    write_episode_video)

# A test episode resets numpy's global RNG from its seed (the placement of the cube).
_MAX_SEED = 2**32 - 1


class NonFiniteActionError(UserFacingError, ValueError):
  """The policy produced NaN or inf for an active env."""


class BatchedPolicy(Protocol):
  """What `run_episodes` drives: obs {key: (num_envs, To, ...)}, PRNG key -> actions
  (num_envs, n_action_steps, Da). A policy with per-env state (the scripted expert) may also
  have `reset_slot(slot, episode)`, called when `slot` starts `episode`."""

  def __call__(self, obs: dict[str, np.ndarray], rng: jax.Array) -> Any:
    ...


@dataclasses.dataclass(frozen=True)
class EpisodeSpec:
  """One episode of the protocol.

  Attributes:
    kind: 'test' (reset from `seed`) or 'train' (reset to `init_state` of demo `demo`).
    seed: reset seed for test episodes; for train episodes the demo's index, used only to seed
      stochastic policies such as the scripted expert.
    demo: demo name for train episodes.
    init_state: flattened MuJoCo state for train episodes.
    record: keep the episode's camera frames for a video.
  """
  kind: str
  seed: int
  demo: str | None = None
  init_state: np.ndarray | None = None
  record: bool = False

  @property
  def label(self) -> str:
    if self.kind == 'train':
      return f'train episode from demo {self.demo!r}'
    return f'test episode with seed {self.seed}'


class ExpertPolicy:
  """The scripted `LiftExpert` behind the batched policy interface.

  One expert per env slot, made fresh for each episode from the episode's seed (so an episode's
  actions do not depend on which slot ran it). It acts step by step on privileged observations:
  use it with n_action_steps = 1, n_obs_steps = 1 and all observation keys (obs_keys None).
  """
  n_obs_steps = 1
  n_action_steps = 1
  obs_keys = None

  def __init__(self, num_envs: int, action_dim: int, seed: int = 0):
    self._seed = seed
    self._action_dim = action_dim
    self._experts: list[Any] = [None] * num_envs

  def reset_slot(self, slot: int, episode: EpisodeSpec) -> None:
    # Imported on use: the expert is optional and the trainer never needs it.
    from dpjax.envs.scripted_expert import LiftExpert  # pylint: disable=g-import-not-at-top
    rng = np.random.default_rng([self._seed, episode.seed, episode.kind == 'train'])
    self._experts[slot] = LiftExpert(rng)

  def __call__(self, obs: dict[str, np.ndarray], rng: jax.Array) -> np.ndarray:
    del rng  # The experts carry their own generators.
    actions = np.zeros((len(self._experts), 1, self._action_dim), np.float32)
    for row, expert in enumerate(self._experts):
      if expert is not None:
        actions[row, 0] = expert.act({k: v[row, -1] for k, v in obs.items()}).executed
    return actions


class DiffusionPolicyFn:
  """`DiffusionPolicy.predict_action` with fixed variables behind the batched interface.

  `predict_action` is one jitted program, cached on the policy object: it compiles at the first
  call and, since the runner keeps the batch shape and dtypes fixed, never again (also across
  the trainer's repeated rollouts with the same policy). The variables' parameter-only work
  (packed kernels, timestep table) is done once here (`sampling_variables`), not every call.
  """

  def __init__(self, policy, variables):
    self.n_obs_steps = policy.n_obs_steps
    self.n_action_steps = policy.n_action_steps
    self.obs_keys = policy.shape_meta.keys
    self._policy = policy
    self._variables = policy.sampling_variables(variables)

  def __call__(self, obs: dict[str, np.ndarray], rng: jax.Array) -> np.ndarray:
    return np.asarray(self._policy.predict_action(self._variables, obs, rng)['action'])


def _run_policy(policy_fn, obs: dict[str, np.ndarray], rng, num_envs: int,
                n_action_steps: int) -> np.ndarray:
  actions = np.asarray(policy_fn(obs, rng))
  if actions.ndim != 3 or actions.shape[:2] != (num_envs, n_action_steps):
    raise ValueError(f'policy returned actions of shape {actions.shape}; expected '
                     f'(num_envs={num_envs}, n_action_steps={n_action_steps}, Da)')
  return actions


def _check_finite(actions: np.ndarray, episode: EpisodeSpec, steps_done: int) -> None:
  finite = np.isfinite(actions).all(axis=-1)
  if not finite.all():
    bad = int(np.argmin(finite))
    raise NonFiniteActionError(
        f'the policy produced a non-finite action for the {episode.label} at env step '
        f'{steps_done + bad} (0-based): {actions[bad].tolist()}')


def run_episodes(policy_fn: BatchedPolicy, env_factory: Callable[[], Any],
                 episodes: Sequence[EpisodeSpec], *, rng: jax.Array, num_envs: int,
                 n_obs_steps: int, n_action_steps: int, max_steps: int,
                 terminate_on_success: bool = True, obs_keys: Sequence[str] | None = None,
                 video_dir: str | None = None,
                 view_keys: Sequence[str] = DEFAULT_VIEW_KEYS,
                 headless_rendering: bool = True, progress: bool = False,
                 step_timeout_s: float = 600.0) -> dict[str, Any]:
  """Runs `episodes` on `num_envs` parallel envs with one batched policy call per chunk.

  Args:
    policy_fn: obs {key: (num_envs, To, ...)}, rng -> actions (num_envs, n_action_steps, Da);
      optional `reset_slot(slot, episode)` is called when a slot starts an episode.
    env_factory: picklable callable building one env in a worker.
    episodes: what to run; results come back in this order.
    rng: PRNG key; split once per policy call.
    num_envs: worker processes, and the policy's fixed batch size.
    n_obs_steps, n_action_steps, max_steps, terminate_on_success: multi-step semantics.
    obs_keys: observation keys the policy gets (None: all the env returns).
    video_dir: where the episodes with `record` set are written as mp4 (videos of an earlier
      evaluation there are removed first).
    view_keys: camera keys put side by side in videos.
    headless_rendering: configure MuJoCo's GL backend in the workers (off for fake envs).
    progress: show a progress bar advancing per finished episode.
    step_timeout_s: a worker silent this long on one command counts as crashed.

  Returns:
    {'episodes': [per-episode dict], 'timing': {...}}; each episode has kind, seed, demo,
    success, steps, max_reward, wall_s, crashed, crash_reason, video.

  Raises:
    NonFiniteActionError: the policy produced NaN/inf for an active env.
    RuntimeError: every env worker was retired after repeated crashes.
  """
  spec = WrapperSpec(n_obs_steps, n_action_steps, max_steps, terminate_on_success,
                     None if obs_keys is None else tuple(obs_keys))
  record_keys = tuple(view_keys) if video_dir else ()
  if video_dir:
    prepare_video_dir(video_dir)
  reset_slot = getattr(policy_fn, 'reset_slot', None)
  results: list[dict[str, Any] | None] = [None] * len(episodes)
  queue = collections.deque(range(len(episodes)))
  running: dict[int, int] = {}  # slot -> episode index
  started: dict[int, float] = {}
  steps_done: dict[int, int] = {}
  latest_obs: dict[int, dict[str, np.ndarray]] = {}
  timing = {'startup_s': 0.0, 'policy_s': 0.0, 'sim_s': 0.0, 'video_s': 0.0,
            'policy_calls': 0}
  bar = tqdm.tqdm(total=len(episodes), unit='episode', disable=not progress,
                  dynamic_ncols=True)
  successes = 0

  def finish(index: int, *, success=False, steps=0, max_reward=0.0, crash=None,
             recorded=None) -> None:
    nonlocal successes
    episode = episodes[index]
    video = None
    if recorded and video_dir:
      t0 = time.perf_counter()
      video = write_episode_video(
          os.path.join(video_dir, episode_video_name(episode.kind, episode.seed, success)),
          recorded, view_keys)
      timing['video_s'] += time.perf_counter() - t0
    if crash is not None:
      logging.warning('evaluation: env worker crashed during the %s; the episode counts as '
                      'failed and the evaluation goes on. %s', episode.label, crash.reason)
    results[index] = {
        'kind': episode.kind, 'seed': episode.seed, 'demo': episode.demo,
        'success': bool(success), 'steps': int(steps), 'max_reward': float(max_reward),
        'wall_s': time.perf_counter() - started.pop(index),
        'crashed': crash is not None,
        'crash_reason': None if crash is None else crash.reason, 'video': video,
    }
    successes += bool(success)
    bar.update(1)
    bar.set_postfix(success=f'{successes}/{bar.n}')

  def fill(vec: VectorEnv) -> None:
    """Starts queued episodes on every idle live slot (crashed resets retry other episodes)."""
    while queue:
      idle = [s for s in vec.live_slots if s not in running][:len(queue)]
      if not idle:
        return
      commands = {}
      for slot in idle:
        index = queue.popleft()
        episode = episodes[index]
        running[slot] = index
        steps_done[slot] = 0
        started[index] = time.perf_counter()
        commands[slot] = ('reset', (episode.seed, episode.init_state,
                                    record_keys if episode.record else ()))
        if reset_slot is not None:
          reset_slot(slot, episode)
      t0 = time.perf_counter()
      replies = vec.run(commands)
      timing['sim_s'] += time.perf_counter() - t0
      for slot, reply in replies.items():
        if isinstance(reply, WorkerCrash):
          finish(running.pop(slot), crash=reply)
        else:
          latest_obs[slot] = reply

  wall_start = time.perf_counter()
  try:
    with VectorEnv(env_factory, num_envs, spec, headless_rendering=headless_rendering,
                   timeout_s=step_timeout_s) as vec:
      timing['startup_s'] = time.perf_counter() - wall_start
      fill(vec)
      while running:
        active = sorted(running)
        rows = [s if s in running else active[0] for s in range(num_envs)]
        obs = {k: np.stack([latest_obs[s][k] for s in rows]) for k in latest_obs[active[0]]}
        rng, key = jax.random.split(rng)
        t0 = time.perf_counter()
        actions = _run_policy(policy_fn, obs, key, num_envs, n_action_steps)
        timing['policy_s'] += time.perf_counter() - t0
        timing['policy_calls'] += 1
        for slot in active:
          _check_finite(actions[slot], episodes[running[slot]], steps_done[slot])
        t0 = time.perf_counter()
        replies = vec.run({slot: ('step', actions[slot]) for slot in active})
        timing['sim_s'] += time.perf_counter() - t0
        for slot, reply in replies.items():
          if isinstance(reply, WorkerCrash):
            finish(running.pop(slot), steps=steps_done[slot], crash=reply)
            continue
          latest_obs[slot] = reply.obs
          steps_done[slot] = reply.steps
          if reply.done:
            finish(running.pop(slot), success=reply.success, steps=reply.steps,
                   max_reward=reply.reward, recorded=reply.recorded)
        fill(vec)
      if queue:
        last_crash = next(r for r in reversed(results) if r and r['crashed'])
        raise RuntimeError(
            f'evaluation: every env worker crashed {MAX_CONSECUTIVE_CRASHES} times in a row; '
            f'{len(queue)} episodes could not run. Last crash:\n{last_crash["crash_reason"]}')
  finally:
    bar.close()
  timing['wall_s'] = time.perf_counter() - wall_start
  total_steps = sum(r['steps'] for r in results)
  timing['env_steps'] = total_steps
  # Over the rollouts only: worker start-up (importing robosuite, building the envs) is apart.
  timing['env_steps_per_s'] = total_steps / max(timing['wall_s'] - timing['startup_s'], 1e-9)
  busy = timing['policy_s'] + timing['sim_s']
  timing['policy_share'] = timing['policy_s'] / busy if busy > 0 else 0.0
  return {'episodes': results, 'timing': timing}


def aggregate(episodes: Sequence[dict[str, Any]]) -> dict[str, Any] | None:
  """Success rate with its 95 % Wilson interval, mean score and length; None if empty."""
  if not episodes:
    return None
  n = len(episodes)
  successes = sum(e['success'] for e in episodes)
  low, high = stats.wilson_interval(successes, n)
  finished = [e for e in episodes if not e['crashed']]
  return {
      'num_episodes': n,
      'num_success': successes,
      'success_rate': successes / n,
      'success_ci95': [low, high],
      'mean_score': float(np.mean([e['max_reward'] for e in episodes])),
      'mean_steps': float(np.mean([e['steps'] for e in finished])) if finished else 0.0,
      'num_crashed': n - len(finished),
  }


@dataclasses.dataclass(frozen=True)
class EvalSettings:
  """Resolved evaluation settings (config defaults + overrides)."""
  num_episodes: int
  num_train_episodes: int
  num_envs: int
  seed_start: int
  max_steps: int
  terminate_on_success: bool
  video_episodes: int
  image_size: int


def resolve_settings(config, *, num_episodes=None, num_envs=None, seed_start=None,
                     num_train_episodes=None, video_episodes=None) -> EvalSettings:
  """Fills unset arguments from `config.eval`; num_envs 0 means one per CPU core, capped at the
  number of episodes."""
  num_episodes = config.eval.num_episodes if num_episodes is None else num_episodes
  num_train = config.eval.num_train_episodes if num_train_episodes is None else num_train_episodes
  num_envs = config.eval.num_envs if num_envs is None else num_envs
  if num_episodes < 0 or num_train < 0 or num_episodes + num_train == 0:
    raise InputError(f'evaluation: need at least one episode (num_episodes={num_episodes}, '
                     f'num_train_episodes={num_train})')
  if num_envs < 0:
    raise InputError(f'evaluation: num_envs must be >= 0 (0: one per core), got {num_envs}')
  num_envs = min(num_envs or default_num_envs(), num_episodes + num_train)
  seed_start = config.eval.seed_start if seed_start is None else seed_start
  if not 0 <= seed_start <= _MAX_SEED + 1 - num_episodes:
    raise InputError(f'evaluation: seed_start={seed_start} is out of range: the {num_episodes} '
                     f'test episodes use seeds seed_start, seed_start + 1, …, which must lie in '
                     f'[0, 2**32 − 1]')
  return EvalSettings(
      num_episodes=num_episodes,
      num_train_episodes=num_train,
      num_envs=num_envs,
      seed_start=seed_start,
      max_steps=config.eval.max_steps,
      terminate_on_success=config.eval.terminate_on_success,
      video_episodes=config.eval.video_episodes if video_episodes is None else video_episodes,
      image_size=config.data.image_size,
  )


def train_initial_states(dataset_path: str, count: int) -> list[tuple[str, np.ndarray]]:
  """(demo name, states[0]) of the first `count` demos (numeric order) of a robomimic file."""
  names = RobomimicFile(dataset_path).demo_names()
  if count > len(names):
    raise InputError(f'{dataset_path}: {count} train episodes asked for, the file has '
                     f'{len(names)} demos')
  states = []
  with h5py.File(dataset_path, 'r') as f:
    for name in names[:count]:
      demo = f['data'][name]
      if 'states' not in demo:
        raise InputError(f'{dataset_path}: demo {name!r} has no "states" dataset, needed to '
                         'reset train episodes to its initial state')
      states.append((name, np.asarray(demo['states'][0], dtype=np.float64)))
  return states


def make_episodes(settings: EvalSettings, dataset_path: str | None,
                  record: bool) -> list[EpisodeSpec]:
  """Test episodes (seeds seed_start + i), then train episodes; the first `video_episodes`
  test episodes (and train episodes after them, if any are left) are recorded when `record`."""
  episodes = [EpisodeSpec('test', settings.seed_start + i)
              for i in range(settings.num_episodes)]
  if settings.num_train_episodes:
    if dataset_path is None:
      raise InputError('evaluation: num_train_episodes > 0 needs dataset_path (the robomimic '
                       'hdf5 whose first demos give the initial states)')
    episodes += [EpisodeSpec('train', i, demo=name, init_state=state)
                 for i, (name, state) in enumerate(
                     train_initial_states(dataset_path, settings.num_train_episodes))]
  if record:
    episodes = [dataclasses.replace(e, record=i < settings.video_episodes)
                for i, e in enumerate(episodes)]
  return episodes


def evaluate(policy_fn: BatchedPolicy, config, *, rng: jax.Array, n_obs_steps: int,
             n_action_steps: int, obs_keys: Sequence[str] | None,
             settings: EvalSettings, dataset_path: str | None = None,
             video_dir: str | None = None, progress: bool = True,
             env_factory: Callable[[], Any] | None = None,
             extra: dict[str, Any] | None = None) -> dict[str, Any]:
  """Runs the protocol with any batched policy and aggregates; see `evaluate_policy`."""
  episodes = make_episodes(settings, dataset_path, record=bool(video_dir))
  if env_factory is None:
    env_factory = LiftEnvFactory(image_size=settings.image_size, horizon=settings.max_steps)
  run = run_episodes(policy_fn, env_factory, episodes, rng=rng, num_envs=settings.num_envs,
                     n_obs_steps=n_obs_steps, n_action_steps=n_action_steps,
                     max_steps=settings.max_steps,
                     terminate_on_success=settings.terminate_on_success, obs_keys=obs_keys,
                     video_dir=video_dir, progress=progress)
  results = run['episodes']
  test = aggregate([e for e in results if e['kind'] == 'test'])
  train = aggregate([e for e in results if e['kind'] == 'train'])
  timing = run['timing']
  scalars = {}
  for kind, agg in (('test', test), ('train', train)):
    if agg is not None:
      scalars.update({
          f'{kind}/success_rate': agg['success_rate'],
          f'{kind}/success_ci95_low': agg['success_ci95'][0],
          f'{kind}/success_ci95_high': agg['success_ci95'][1],
          f'{kind}/mean_score': agg['mean_score'],
          f'{kind}/mean_steps': agg['mean_steps'],
      })
  scalars.update({
      'eval/env_steps_per_s': timing['env_steps_per_s'],
      'eval/policy_share': timing['policy_share'],
      'eval/wall_s': timing['wall_s'],
      'eval/num_crashed': sum(e['crashed'] for e in results),
  })
  settings_dict = dataclasses.asdict(settings)
  settings_dict.update(n_obs_steps=n_obs_steps, n_action_steps=n_action_steps)
  settings_dict.update(extra or {})
  return {
      'config_name': config.name,
      'settings': settings_dict,
      'test': test,
      'train': train,
      'timing': timing,
      'scalars': scalars,
      'episodes': results,
  }


def evaluate_policy(policy, variables, config, *, rng: jax.Array,
                    num_episodes: int | None = None, num_envs: int | None = None,
                    seed_start: int | None = None, num_train_episodes: int | None = None,
                    dataset_path: str | None = None, video_dir: str | None = None,
                    video_episodes: int | None = None, sampler: str | None = None,
                    num_inference_steps: int | None = None,
                    n_action_steps: int | None = None,
                    progress: bool = True) -> dict[str, Any]:
  """Evaluates a `DiffusionPolicy` with `variables` (use the EMA parameters) in Lift.

  Unset arguments come from `config.eval`, and the sampler's and `n_action_steps` (actions
  executed per prediction) from the policy.

  Returns:
    {'config_name', 'settings', 'test': aggregate, 'train': aggregate | None, 'timing',
     'scalars': {name: float} for TensorBoard, 'episodes': [per-episode dict]}.
    Aggregates: num_episodes, num_success, success_rate, success_ci95 [low, high], mean_score
    (mean max reward), mean_steps, num_crashed. Timing: wall_s, policy_s, sim_s, video_s,
    policy_calls, env_steps, env_steps_per_s, policy_share (policy / (policy + simulation)).
  """
  settings = resolve_settings(config, num_episodes=num_episodes, num_envs=num_envs,
                              seed_start=seed_start, num_train_episodes=num_train_episodes,
                              video_episodes=video_episodes)
  policy = with_sampling(policy, config, sampler, num_inference_steps, n_action_steps)
  policy_fn = DiffusionPolicyFn(policy, variables)
  return evaluate(policy_fn, config, rng=rng, n_obs_steps=policy_fn.n_obs_steps,
                  n_action_steps=policy_fn.n_action_steps, obs_keys=policy_fn.obs_keys,
                  settings=settings, dataset_path=dataset_path, video_dir=video_dir,
                  progress=progress,
                  extra={'policy': 'diffusion', 'sampler': policy.sampler,
                         'num_inference_steps': policy.num_inference_steps})


def evaluate_expert(config, *, seed: int = 0, num_episodes: int | None = None,
                    num_envs: int | None = None, seed_start: int | None = None,
                    num_train_episodes: int | None = None, dataset_path: str | None = None,
                    video_dir: str | None = None, video_episodes: int | None = None,
                    use_cameras: bool = True, progress: bool = True) -> dict[str, Any]:
  """Evaluates the scripted expert through the same runner (a check of the runner and env,
  and a yardstick for simulation speed). Same return value as `evaluate_policy`.

  The expert reads privileged state only, so `use_cameras=False` gives the same episodes
  without rendering (much faster; no videos then).
  """
  if video_dir and not use_cameras:
    raise InputError('evaluate_expert: videos need the cameras; pass use_cameras=True or no '
                     'video_dir')
  settings = resolve_settings(config, num_episodes=num_episodes, num_envs=num_envs,
                              seed_start=seed_start, num_train_episodes=num_train_episodes,
                              video_episodes=video_episodes)
  expert = ExpertPolicy(settings.num_envs, config.task.shape_meta.action_dim, seed)
  env_factory = LiftEnvFactory(image_size=settings.image_size, horizon=settings.max_steps,
                               use_cameras=use_cameras)
  return evaluate(expert, config, rng=jax.random.key(seed),
                  n_obs_steps=expert.n_obs_steps, n_action_steps=expert.n_action_steps,
                  obs_keys=expert.obs_keys, settings=settings, dataset_path=dataset_path,
                  video_dir=video_dir, progress=progress, env_factory=env_factory,
                  extra={'policy': 'expert', 'use_cameras': use_cameras})


def with_sampling(policy, config, sampler: str | None = None,
                  num_inference_steps: int | None = None, n_action_steps: int | None = None):
  """`policy` itself when it already samples and executes this way (None: as it does), else an
  equivalent policy (same network and parameters) that does. A step count the policy cannot
  take is an `InputError` (a command-line override, typically)."""
  sampler = policy.sampler if sampler is None else sampler
  num_inference_steps = (policy.num_inference_steps if num_inference_steps is None
                         else num_inference_steps)
  n_action_steps = policy.n_action_steps if n_action_steps is None else n_action_steps
  num_train_timesteps = policy.schedule.num_train_timesteps
  if not 1 <= num_inference_steps <= num_train_timesteps:
    raise InputError(f'evaluation: num_inference_steps={num_inference_steps}: must be in [1, '
                     f'{num_train_timesteps}], the policy\'s diffusion.num_train_timesteps')
  most_actions = policy.horizon - policy.n_obs_steps + 1
  if not 1 <= n_action_steps <= most_actions:
    raise InputError(f'evaluation: n_action_steps={n_action_steps}: must be in [1, '
                     f'{most_actions}]: the executed actions start at step n_obs_steps - 1 = '
                     f'{policy.n_obs_steps - 1} of the policy\'s horizon of {policy.horizon}')
  if (sampler, num_inference_steps, n_action_steps) == (
      policy.sampler, policy.num_inference_steps, policy.n_action_steps):
    return policy
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.diffusion.sampler = sampler
    config.diffusion.num_inference_steps = num_inference_steps
    config.task.n_action_steps = n_action_steps
  return DiffusionPolicy(config, policy.shape_meta, policy.normalizer)


def write_eval_json(path: str, result: dict[str, Any], *, checkpoint_step: int | None,
                    config_name: str | None = None) -> str:
  """Writes `result` + checkpoint step + config name as JSON, atomically; returns the path."""
  payload = dict(result, checkpoint_step=checkpoint_step,
                 config_name=config_name or result.get('config_name'))
  write_json_atomic(path, payload)
  return path


def format_summary(result: dict[str, Any]) -> str:
  """A one-screen text summary of an evaluation."""
  timing = result['timing']
  lines = [f'evaluation of {result["config_name"]} '
           f'({result["settings"].get("policy", "policy")}, '
           f'{result["settings"]["num_envs"]} envs)']
  for kind in ('test', 'train'):
    agg = result[kind]
    if agg is None:
      continue
    low, high = agg['success_ci95']
    lines.append(f'  {kind:5s}: success {agg["num_success"]}/{agg["num_episodes"]} = '
                 f'{agg["success_rate"]:.3f} (95% CI {low:.3f}-{high:.3f}), mean score '
                 f'{agg["mean_score"]:.3f}, mean length {agg["mean_steps"]:.1f} steps'
                 + (f', {agg["num_crashed"]} crashed' if agg['num_crashed'] else ''))
  lines.append(f'  time : {timing["wall_s"]:.1f} s wall, {timing["env_steps"]} env steps '
               f'({timing["env_steps_per_s"]:.1f}/s), policy {timing["policy_s"]:.1f} s vs '
               f'simulation {timing["sim_s"]:.1f} s (policy share '
               f'{100 * timing["policy_share"]:.0f} %), {timing["policy_calls"]} policy calls')
  failed = [e for e in result['episodes'] if not e['success']]
  if failed:
    shown = ', '.join(f'{e["kind"]}:{e["seed"]}' + ('(crashed)' if e['crashed'] else '')
                      for e in failed[:10])
    lines.append(f'  failed: {shown}' + (' ...' if len(failed) > 10 else ''))
  return '\n'.join(lines)
