"""The robosuite Lift task exactly as SPEC §1 fixes it, with upright images and seeded resets.

Every observation robosuite returns is passed on; camera images `<camera>_image` are
(image_size, image_size, 3) uint8, flipped from OpenGL's bottom-up rows to upright, the same way
for demo generation and evaluation (robomimic does the same).
"""

import contextlib
import copy
import logging
from collections.abc import Iterator
from typing import Any

import numpy as np

from dpjax.envs import rendering

CAMERAS = ('agentview', 'robot0_eye_in_hand')
ACTION_DIM = 7

# robosuite logs these at import/creation on every process; they are advice, not problems.
_NOISE_PREFIXES = (
    'No private macro file found',
    'It is recommended to use a private macro file',
    'To setup, run:',
    'Could not import robosuite_models',
    'Could not load the mink-based whole-body IK',
    'Loading controller configuration from',
    'The config has defined for the controller',
)


class _DropRobosuiteNoise(logging.Filter):
  """Drops robosuite's known advisory messages below ERROR; everything else passes."""

  def filter(self, record: logging.LogRecord) -> bool:
    if record.levelno >= logging.ERROR:
      return True
    return not str(record.msg).startswith(_NOISE_PREFIXES)


def _quiet_robosuite_logging() -> None:
  # The filter must sit on robosuite's logger before `import robosuite` emits the first notices.
  logger = logging.getLogger('robosuite_logs')
  if not any(isinstance(f, _DropRobosuiteNoise) for f in logger.filters):
    logger.addFilter(_DropRobosuiteNoise())


rendering.configure_headless_rendering()
_quiet_robosuite_logging()

# pylint: disable=g-import-not-at-top,wrong-import-position
import robosuite
from robosuite import macros as robosuite_macros
from robosuite.controllers import load_composite_controller_config
# pylint: enable=g-import-not-at-top,wrong-import-position


_MODEL_SEED = 0


@contextlib.contextmanager
def _numpy_global_seed(seed: int) -> Iterator[None]:
  """Seeds numpy's global RNG for robosuite's draws, then gives the caller's state back."""
  saved = np.random.get_state()
  np.random.seed(seed)
  try:
    yield
  finally:
    np.random.set_state(saved)


def controller_config() -> dict[str, Any]:
  """BASIC composite controller: the Panda's one arm ('right') runs OSC_POSE on delta inputs."""
  config = load_composite_controller_config(controller='BASIC')
  arm = copy.deepcopy(config['body_parts']['right'])
  # Set explicitly: some robot defaults use absolute poses, and the data assume deltas.
  arm['type'] = 'OSC_POSE'
  arm['input_type'] = 'delta'
  # Only the parts a Panda has: robosuite warns about (and drops) torso/head/legs/base/left.
  config['body_parts'] = {'right': arm}
  return config


def lift_env_kwargs(image_size: int = 84, horizon: int = 400,
                    use_cameras: bool = True) -> dict[str, Any]:
  """Keyword arguments of `robosuite.make('Lift', ...)`; also stored as robomimic env_kwargs."""
  return {
      'robots': 'Panda',
      'controller_configs': controller_config(),
      'control_freq': 20,
      'camera_names': list(CAMERAS),
      'camera_heights': image_size,
      'camera_widths': image_size,
      'reward_shaping': False,
      'ignore_done': True,
      'horizon': horizon,
      'has_renderer': False,
      'has_offscreen_renderer': use_cameras,
      'use_camera_obs': use_cameras,
      'use_object_obs': True,
      # A soft reset (sim.reset + re-sampled placement) is equivalent and keeps one GL context.
      'hard_reset': False,
  }


def _skipped_sensor(camera_sensor, image_size: int):
  """A sensor with the camera's modality that renders nothing (see `set_camera_rendering`)."""
  blank = np.zeros((image_size, image_size, 3), np.uint8)

  def skipped(obs_cache):
    del obs_cache
    return blank

  skipped.__modality__ = camera_sensor.__modality__
  return skipped


class LiftEnv:
  """robosuite Lift with upright images, seeded resets and robomimic-style state access."""

  def __init__(self, image_size: int = 84, horizon: int = 400, use_cameras: bool = True):
    self.image_size = image_size
    self.use_cameras = use_cameras
    self._env_kwargs = lift_env_kwargs(image_size, horizon, use_cameras)
    # Building the model draws the cube's size (2.0-2.2 cm) from numpy's global RNG; a fixed
    # seed makes it the same in every process, so a reset seed alone fixes the scene and
    # `reset_to_state` (which restores poses, not geometry) is exact.
    with _numpy_global_seed(_MODEL_SEED):
      self.env = robosuite.make('Lift', **self._env_kwargs)
    self._image_keys = tuple(f'{c}_image' for c in CAMERAS) if use_cameras else ()
    self._render_cameras = True
    observables = self.env._observables  # pylint: disable=protected-access
    self._camera_sensors = {k: observables[k]._sensor for k in self._image_keys}  # pylint: disable=protected-access
    self._skipped_sensors = {k: _skipped_sensor(self._camera_sensors[k], image_size)
                             for k in self._image_keys}
    # robosuite renders bottom-up ('opengl') unless a private macro file changed the convention.
    self._flip_images = robosuite_macros.IMAGE_CONVENTION == 'opengl'
    self._state_size = self.env.sim.get_state().flatten().shape[0]

  def _observation(self, raw: dict[str, Any]) -> dict[str, np.ndarray]:
    obs = {}
    for key, value in raw.items():
      if key in self._image_keys and not self._render_cameras:
        continue
      value = np.asarray(value)
      if key in self._image_keys and self._flip_images:
        value = np.ascontiguousarray(value[::-1])
      obs[key] = value
    return obs

  def reset(self, seed: int | None = None) -> dict[str, np.ndarray]:
    """Resets; with a seed the initial robot and cube poses are a function of the seed alone."""
    if seed is None:
      return self._observation(self.env.reset())
    # robosuite samples the cube placement and the joint noise from numpy's global RNG (its
    # own env.rng is unused there).
    with _numpy_global_seed(seed):
      return self._observation(self.env.reset())

  def reset_to_state(self, state: np.ndarray) -> dict[str, np.ndarray]:
    """Resets, then restores a flattened MuJoCo state (robomimic `states[i]`)."""
    state = np.asarray(state, dtype=np.float64)
    if state.shape != (self._state_size,):
      raise ValueError(f'Lift state has shape {state.shape}, expected ({self._state_size},) '
                       '(a flattened MuJoCo state, as in robomimic "states")')
    self.reset(seed=0)
    self.env.sim.set_state_from_flattened(state)
    self.env.sim.forward()
    # A reset builds the controllers at the pose it sampled (OSC's nullspace target, goals,
    # gripper command); rebuild them at the restored pose, as `Robot.reset` does, so replaying
    # a demo's actions from its first state retraces it (every state within 1e-4, the demo
    # tests' bound: the solver's warm start is not in the flattened state) instead of drifting.
    for robot in self.env.robots:
      robot._load_controller()  # pylint: disable=protected-access
      for arm in robot.arms:
        if robot.has_gripper[arm]:
          robot.gripper[arm].current_action = np.zeros(robot.gripper[arm].dof)
      robot.composite_controller.update_state()
      robot.composite_controller.reset()
    raw = self.env._get_observations(force_update=True)  # pylint: disable=protected-access
    return self._observation(raw)

  def step(self, action: np.ndarray) -> tuple[dict[str, np.ndarray], float, bool, dict]:
    """One 20 Hz control step with a (7,) delta OSC_POSE + gripper action in [-1, 1]."""
    action = np.asarray(action, dtype=np.float64)
    if action.shape != (ACTION_DIM,):
      raise ValueError(f'Lift action has shape {action.shape}, expected ({ACTION_DIM},)')
    if not np.isfinite(action).all():
      raise ValueError(f'Lift action is not finite: {action}')
    raw, reward, done, info = self.env.step(action)
    return self._observation(raw), float(reward), bool(done), info

  def is_success(self) -> bool:
    """Cube lifted more than 4 cm above the table."""
    return bool(self.env._check_success())  # pylint: disable=protected-access

  def get_state(self) -> np.ndarray:
    """(S,) float64 flattened MuJoCo state (time, qpos, qvel), as robomimic stores it."""
    return np.asarray(self.env.sim.get_state().flatten(), dtype=np.float64)

  def env_args(self) -> dict[str, Any]:
    """robomimic `env_args`: type 1 is robosuite; env_kwargs recreate this environment."""
    return {
        'env_name': 'Lift',
        'type': 1,
        'env_version': robosuite.__version__,
        'env_kwargs': copy.deepcopy(self._env_kwargs),
    }

  def set_camera_rendering(self, enabled: bool) -> None:
    """Renders the cameras on the next steps or not; physics is unaffected.

    While off, the `<camera>_image` keys are absent from observations. Rendering is ~90 % of a
    step's cost, and a policy only sees the last n_obs_steps frames of each action chunk.
    The camera observables stay enabled with a no-op sensor while off: disabling them would
    stop their sampling clock, and the first frame after re-enabling would be sampled at
    another physics substep than an always-on camera's.
    """
    if enabled == self._render_cameras:
      return
    self._render_cameras = enabled
    for key in self._image_keys:
      observable = self.env._observables[key]  # pylint: disable=protected-access
      # Set directly: `modify_observable(..., 'sensor', ...)` probes the sensor, i.e. renders.
      observable._sensor = (self._camera_sensors[key] if enabled  # pylint: disable=protected-access
                            else self._skipped_sensors[key])

  def close(self) -> None:
    self.env.close()


def make_lift_env(image_size: int = 84, horizon: int = 400, use_cameras: bool = True) -> LiftEnv:
  """Lift with Panda, BASIC/OSC_POSE delta control at 20 Hz, cameras agentview + eye-in-hand."""
  return LiftEnv(image_size=image_size, horizon=horizon, use_cameras=use_cameras)
