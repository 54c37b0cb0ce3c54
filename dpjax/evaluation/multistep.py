"""Reference `MultiStepWrapper` semantics around one environment (SPEC §8).

The policy sees the last To observations and answers with a chunk of n_action_steps actions:

* `reset` starts the history with the first observation repeated To times.
* `step(actions (n_action_steps, Da))` executes the chunk action by action, stopping early when
  the episode ends inside it: at `max_steps` env steps, or at the first success when
  `terminate_on_success` (the episode score is the max reward, which success fixes at 1, so the
  remaining steps could not change it).
* The reward reported is the max over the whole episode so far.

The wrapped env needs `reset(seed=None) -> obs`, `step(action) -> (obs, reward, done, info)`
and `is_success() -> bool`; `reset_to_state(state) -> obs` for episodes started from a saved
simulator state. `obs` is a dict of arrays.

Rendering is most of the cost of a step, and the policy only ever sees the last To frames of a
chunk. An env with `set_camera_rendering(enabled)` (camera keys absent from obs while off;
physics unaffected) is asked to render only the steps whose frames can reach the policy: the
reset and the last To steps of each chunk (every step while recording a video). A step that was
not rendered repeats the previous image in the history; such frames are returned only when the
episode ends inside a chunk, where no policy reads them.
"""

import collections
from collections.abc import Sequence
from typing import Any

import numpy as np


def _batchable(value: Any) -> np.ndarray:
  """float32 for every float so that stacked batches keep one dtype (a jitted policy would
  otherwise retrace when robosuite's float64 and a float32 source mix)."""
  array = np.asarray(value)
  if np.issubdtype(array.dtype, np.floating):
    return array.astype(np.float32, copy=False)
  return array


class MultiStepWrapper:
  """Observation history of To frames + execution of action chunks for one env.

  Attributes:
    steps: env steps executed in the current episode.
    success: whether the task succeeded at any step of the current episode.
    max_reward: max reward over the current episode (0 before the first step).
    done: whether the current episode is over.
    recorded: when `reset(record_keys=...)` was given keys, one {key: array} per observation
      of the episode (the reset observation included), for videos.
  """

  def __init__(self, env, n_obs_steps: int, n_action_steps: int, max_steps: int,
               terminate_on_success: bool = True, obs_keys: Sequence[str] | None = None,
               skip_unused_renders: bool = True):
    """Wraps `env`.

    Args:
      env: the environment (see the module docstring for the interface).
      n_obs_steps: To, frames of history returned.
      n_action_steps: actions per `step` call.
      max_steps: the episode ends after this many env steps (400 for Lift).
      terminate_on_success: end the episode at the first successful step.
      obs_keys: observation keys to stack and return; None returns every key of the reset obs.
      skip_unused_renders: render only the frames the policy can see, if the env supports it.
    """
    if n_obs_steps < 1 or n_action_steps < 1 or max_steps < 1:
      raise ValueError(f'MultiStepWrapper: n_obs_steps ({n_obs_steps}), n_action_steps '
                       f'({n_action_steps}) and max_steps ({max_steps}) must all be >= 1')
    self.env = env
    self.n_obs_steps = n_obs_steps
    self.n_action_steps = n_action_steps
    self.max_steps = max_steps
    self.terminate_on_success = terminate_on_success
    self.obs_keys = None if obs_keys is None else tuple(obs_keys)
    self._can_skip_renders = skip_unused_renders and hasattr(env, 'set_camera_rendering')
    self._rendering = True
    self._keys: tuple[str, ...] = ()
    self._history: collections.deque[dict[str, np.ndarray]] = collections.deque(
        maxlen=n_obs_steps)
    self._record_keys: tuple[str, ...] = ()
    self.recorded: list[dict[str, np.ndarray]] = []
    self.steps = 0
    self.success = False
    self.max_reward = 0.0
    self.done = True

  def reset(self, seed: int | None = None,
            record_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Resets the env from `seed`; returns stacked obs {key: (To, ...)}."""
    self._set_rendering(True)
    return self._start(self.env.reset(seed=seed), record_keys)

  def reset_to_state(self, state: np.ndarray,
                     record_keys: Sequence[str] = ()) -> dict[str, np.ndarray]:
    """Resets the env to a flattened simulator state; returns stacked obs {key: (To, ...)}."""
    self._set_rendering(True)
    return self._start(self.env.reset_to_state(state), record_keys)

  def step(self, actions: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict[str, Any]]:
    """Executes a chunk of actions (n_action_steps, Da) until it ends or the episode does.

    Returns:
      (stacked obs {key: (To, ...)}, max reward of the episode so far, done,
       info {'success': bool, 'steps': int}).
    """
    if self.done:
      raise RuntimeError('MultiStepWrapper.step: the episode is over; call reset first')
    actions = np.asarray(actions)
    if actions.ndim != 2 or actions.shape[0] != self.n_action_steps:
      raise ValueError(f'MultiStepWrapper.step: actions must have shape (n_action_steps='
                       f'{self.n_action_steps}, Da), got {actions.shape}')
    first_seen = self.n_action_steps - self.n_obs_steps  # First index the policy can see.
    for index, action in enumerate(actions):
      self._set_rendering(bool(self._record_keys) or index >= first_seen)
      obs, reward, env_done, _ = self.env.step(action)
      self.steps += 1
      self.max_reward = max(self.max_reward, float(reward))
      self.success = self.success or bool(self.env.is_success())
      self._push(obs)
      self.done = (bool(env_done) or self.steps >= self.max_steps or
                   (self.terminate_on_success and self.success))
      if self.done:
        break
    return self._stacked(), self.max_reward, self.done, {'success': self.success,
                                                          'steps': self.steps}

  def _set_rendering(self, enabled: bool) -> None:
    if self._can_skip_renders and enabled != self._rendering:
      self.env.set_camera_rendering(enabled)
      self._rendering = enabled

  def _start(self, obs: dict[str, Any], record_keys: Sequence[str]) -> dict[str, np.ndarray]:
    self._keys = tuple(obs) if self.obs_keys is None else self.obs_keys
    self.steps = 0
    self.success = False
    self.max_reward = 0.0
    self.done = False
    self._record_keys = tuple(record_keys)
    self.recorded = []
    self._history.clear()
    self._push(obs)
    return self._stacked()

  def _push(self, obs: dict[str, Any]) -> None:
    frame = {}
    for key in self._keys:
      if key in obs:
        frame[key] = _batchable(obs[key])
      elif not self._rendering and self._history:
        frame[key] = self._history[-1][key]  # Not rendered: see the module docstring.
      else:
        raise KeyError(f'MultiStepWrapper: the env observation lacks key {key!r}; it has '
                       f'{sorted(obs)}')
    self._history.append(frame)
    if self._record_keys:
      self.recorded.append({k: np.array(obs[k]) for k in self._record_keys})

  def _stacked(self) -> dict[str, np.ndarray]:
    """Last To observations, oldest first; the oldest available one fills a short history."""
    frames = list(self._history)
    frames = [frames[0]] * (self.n_obs_steps - len(frames)) + frames
    return {k: np.stack([f[k] for f in frames]) for k in frames[0]}
