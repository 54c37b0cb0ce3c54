"""A scripted Lift expert: a proportional controller on privileged state with varied style.

Phases: hover above the cube → descend → close the gripper for a few steps → lift; if the cube
does not follow the lift (missed or slipped), reopen and start over, which the demos then show
as a recovery. Each episode draws its own gains, speeds, heights and noise, and some episodes
get a short random shove on the way to the cube, so the demonstrations vary.

Actions are (7,) float32 in [-1, 1]: OSC_POSE deltas (1 ↔ 5 cm or 0.5 rad per step) and the
gripper (-1 open, +1 close). Orientation is only jittered: the Panda's default top-down grasp
fits the 4 cm cube at any yaw.
"""

import dataclasses

import numpy as np

_METRES_PER_UNIT = 0.05  # OSC_POSE delta scaling: an action of 1 asks for 5 cm.
_OPEN, _CLOSE = -1.0, 1.0


@dataclasses.dataclass(frozen=True)
class _Style:
  """Per-episode parameters of the motion."""
  gain: float  # Proportional gain on the position error (in action units per action unit).
  max_speed: float  # Largest translation action component.
  hover_height: float  # Metres above the cube centre before descending.
  grasp_offset: float  # Metres relative to the cube centre at which to close.
  close_steps: int
  lift_height: float  # Metres above the grasp point to lift to.
  noise_std: float  # Translation action noise.
  rot_noise_std: float
  shove_step: int | None  # Step of the approach at which a random shove starts (or none).
  shove: np.ndarray  # (3,) translation action added during the shove.
  shove_steps: int


class LiftExpert:
  """`reset()` at the start of each episode, then `act(obs)` every step."""

  def __init__(self, rng: np.random.Generator, shove_probability: float = 0.3):
    self._rng = rng
    self._shove_probability = shove_probability
    self.reset()

  def reset(self) -> None:
    """Draws a new style and restarts from the approach phase."""
    rng = self._rng
    shove = rng.normal(size=3)
    shove[2] = abs(shove[2])  # Shoves go sideways or up, never into the table.
    self._style = _Style(
        gain=rng.uniform(0.6, 1.2),
        max_speed=rng.uniform(0.5, 1.0),
        hover_height=rng.uniform(0.03, 0.08),
        grasp_offset=rng.uniform(-0.008, 0.002),
        close_steps=int(rng.integers(8, 13)),
        lift_height=rng.uniform(0.10, 0.16),
        noise_std=rng.uniform(0.0, 0.1),
        rot_noise_std=rng.uniform(0.0, 0.03),
        shove_step=int(rng.integers(2, 12)) if rng.random() < self._shove_probability else None,
        shove=rng.uniform(0.5, 1.0) * shove / np.linalg.norm(shove),
        shove_steps=int(rng.integers(3, 7)),
    )
    self._phase = 'hover'
    self._phase_steps = 0
    self._step = 0
    self._grasp_z = None
    self.num_regrasps = 0

  @property
  def phase(self) -> str:
    return self._phase

  def _goto(self, target: np.ndarray, eef: np.ndarray) -> np.ndarray:
    style = self._style
    move = style.gain * (target - eef) / _METRES_PER_UNIT
    return np.clip(move, -style.max_speed, style.max_speed)

  def _set_phase(self, phase: str) -> None:
    self._phase = phase
    self._phase_steps = 0

  def act(self, obs: dict[str, np.ndarray]) -> np.ndarray:
    """(7,) float32 action from `cube_pos` (3,) and `robot0_eef_pos` (3,)."""
    style = self._style
    cube = np.asarray(obs['cube_pos'], dtype=np.float64)
    eef = np.asarray(obs['robot0_eef_pos'], dtype=np.float64)
    grasp_point = cube + np.array([0.0, 0.0, style.grasp_offset])
    gripper = _OPEN

    if self._phase == 'hover':
      target = cube + np.array([0.0, 0.0, style.hover_height])
      move = self._goto(target, eef)
      if np.linalg.norm((target - eef)[:2]) < 0.01 and abs(target[2] - eef[2]) < 0.02:
        self._set_phase('descend')
    elif self._phase == 'descend':
      move = self._goto(grasp_point, eef)
      if np.linalg.norm((grasp_point - eef)[:2]) > 0.02:
        self._set_phase('hover')  # Drifted off the cube: line up again from above.
      elif abs(grasp_point[2] - eef[2]) < 0.008:
        self._set_phase('close')
    elif self._phase == 'close':
      move = self._goto(grasp_point, eef)
      gripper = _CLOSE
      if self._phase_steps >= style.close_steps:
        self._grasp_z = eef[2]
        self._set_phase('lift')
    else:  # lift
      gripper = _CLOSE
      target = np.array([eef[0], eef[1], self._grasp_z + style.lift_height])
      move = self._goto(target, eef)
      move[:2] = 0.0
      # The cube should rise with the fingers; if it lags far behind, the grasp failed.
      if eef[2] - cube[2] > 0.04:
        self.num_regrasps += 1
        self._set_phase('hover')
        gripper = _OPEN

    if (style.shove_step is not None and self._phase == 'hover' and
        style.shove_step <= self._step < style.shove_step + style.shove_steps):
      move = move + style.shove
    move = move + self._rng.normal(scale=style.noise_std, size=3)
    rotation = self._rng.normal(scale=style.rot_noise_std, size=3)
    self._step += 1
    self._phase_steps += 1
    action = np.concatenate([move, rotation, [gripper]])
    return np.clip(action, -1.0, 1.0).astype(np.float32)
