"""A scripted Lift expert: a proportional controller on privileged state with varied style.

Phases: hover above the cube → descend → close the gripper for a few steps → lift. A grasp that
holds nothing (the fingers close to less than the cube's width) or that the cube does not follow
is a miss: the expert reopens and starts over from above the cube. Each episode draws its own
gains, speeds, heights and noise; some get a short random shove on the way to the cube, and some
a *fumble*: the first grasp is executed beside or above the cube, closes on air and lifts, so the
demos show the states of a missed grasp and the way back from them.

Actions are (7,) float32 in [-1, 1]: OSC_POSE deltas (1 ↔ 5 cm or 0.5 rad per step) and the
gripper (-1 open, +1 close). The gripper is held pointing straight down (a proportional
controller on the orientation error, so tilt and yaw from the injected noise are undone); the
top-down grasp fits the 4 cm cube at any yaw.

Each step gives two actions (DART-style noise injection): the *executed* one, with this
episode's noise, shove or fumble, which moves the robot, and the *label*, the controller's own
answer to the state it is in, which the demos teach. The perturbations put the robot in states
off the clean path and the labels say how to get back, without teaching the policy to reproduce
them: a policy trained on the noisy actions themselves lifted the cube in only 45 % of its own
training episodes. During a fumble the label is the recovery (open, back above the cube).
"""

import dataclasses
from typing import NamedTuple

import numpy as np

_METRES_PER_UNIT = 0.05  # OSC_POSE delta scaling: an action of 1 asks for 5 cm...
_RADIANS_PER_UNIT = 0.5  # ...or a 0.5 rad rotation (axis-angle, base frame).
# robosuite's (x, y, z, w) quaternion of the gripper pointing straight down, fingers along y.
TOP_DOWN_QUAT = np.array([1.0, 0.0, 0.0, 0.0])
_ROTATION_GAIN = 0.5  # Fraction of the orientation error corrected per step.
# Finger gap (sum of the two finger joints, metres) below which the gripper holds nothing: the
# cube is at least 4 cm wide, a closed empty gripper reads ~0.
_EMPTY_GRIP_GAP = 0.03
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
  fumble: np.ndarray | None  # (3,) metres from the grasp point where the first grasp closes.
  fumble_lift_steps: int  # Steps the fumbled grasp lifts before the expert notices.


def orientation_error(target_xyzw: np.ndarray, current_xyzw: np.ndarray) -> np.ndarray:
  """(3,) axis-angle (radians, world frame) of the rotation taking `current` to `target`."""
  def multiply(a, b):
    (ax, ay, az, aw), (bx, by, bz, bw) = a, b
    return np.array([aw * bx + ax * bw + ay * bz - az * by,
                     aw * by - ax * bz + ay * bw + az * bx,
                     aw * bz + ax * by - ay * bx + az * bw,
                     aw * bw - ax * bx - ay * by - az * bz])

  current = np.asarray(current_xyzw, dtype=np.float64)
  inverse = np.array([-current[0], -current[1], -current[2], current[3]]) / np.dot(current,
                                                                                   current)
  x, y, z, w = multiply(np.asarray(target_xyzw, dtype=np.float64), inverse)
  if w < 0:  # q and -q are the same rotation; take the short way round.
    x, y, z, w = -x, -y, -z, -w
  sin_half = np.linalg.norm([x, y, z])
  if sin_half < 1e-12:
    return np.zeros(3)
  return 2.0 * np.arctan2(sin_half, w) * np.array([x, y, z]) / sin_half


class ExpertAction(NamedTuple):
  executed: np.ndarray  # (7,) float32: label + noise (+ shove); what the env is stepped with.
  label: np.ndarray  # (7,) float32: the noise-free action for the current state.


class LiftExpert:
  """`reset()` at the start of each episode, then `act(obs)` every step."""

  def __init__(self, rng: np.random.Generator, shove_probability: float = 0.3,
               fumble_probability: float = 0.3):
    self._rng = rng
    self._shove_probability = shove_probability
    self._fumble_probability = fumble_probability
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
        fumble=self._draw_fumble() if rng.random() < self._fumble_probability else None,
        fumble_lift_steps=int(rng.integers(3, 10)),
    )
    self._set_phase('hover')
    self._step = 0
    self._grasp_z = None
    self._fumble_pending = self._style.fumble is not None
    self.num_regrasps = 0

  def _draw_fumble(self) -> np.ndarray:
    """A grasp point that misses: beside the cube across the fingers' closing line (y), or
    above it."""
    rng = self._rng
    if rng.random() < 0.5:
      return np.array([rng.choice([-1.0, 1.0]) * rng.uniform(0.035, 0.05),
                       rng.uniform(-0.01, 0.01), 0.0])
    return np.array([*rng.uniform(-0.005, 0.005, size=2), rng.uniform(0.045, 0.07)])

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
    self._fumble_stage, self._fumble_stage_steps = 'reach', 0

  def act(self, obs: dict[str, np.ndarray]) -> ExpertAction:
    """The executed and label actions for `cube_pos` (3,), `robot0_eef_pos` (3,),
    `robot0_eef_quat` (4,) and `robot0_gripper_qpos` (2,)."""
    style = self._style
    cube = np.asarray(obs['cube_pos'], dtype=np.float64)
    eef = np.asarray(obs['robot0_eef_pos'], dtype=np.float64)
    grip_gap = float(obs['robot0_gripper_qpos'][0] - obs['robot0_gripper_qpos'][1])
    turn = _ROTATION_GAIN * orientation_error(TOP_DOWN_QUAT, obs['robot0_eef_quat'])
    grasp_point = cube + np.array([0.0, 0.0, style.grasp_offset])
    hover_point = cube + np.array([0.0, 0.0, style.hover_height])
    gripper = _OPEN
    fumble = None  # (4,) move and gripper a fumble executes instead of the label's.

    if self._phase == 'hover':
      move = self._goto(hover_point, eef)
      if np.linalg.norm((hover_point - eef)[:2]) < 0.01 and abs(hover_point[2] - eef[2]) < 0.02:
        self._set_phase('fumble' if self._fumble_pending else 'descend')
    elif self._phase == 'fumble':
      # Labelled as the recovery from wherever the fumble has taken the gripper.
      move = self._goto(hover_point, eef)
      fumble = self._fumble_action(grasp_point + style.fumble, eef)
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
    # Missed: the fingers closed on nothing, or the cube lags far behind the rising fingers.
    if self._phase in ('close', 'lift') and (
        (self._phase_steps > 2 and grip_gap < _EMPTY_GRIP_GAP) or
        (self._phase == 'lift' and eef[2] - cube[2] > 0.04)):
      self.num_regrasps += 1
      self._set_phase('hover')
      move = self._goto(hover_point, eef)
      gripper = _OPEN

    label = np.concatenate([move, turn / _RADIANS_PER_UNIT, [gripper]])
    executed = label.copy()
    if fumble is not None:
      executed[:3], executed[6] = fumble[:3], fumble[3]
    if (style.shove_step is not None and self._phase == 'hover' and
        style.shove_step <= self._step < style.shove_step + style.shove_steps):
      executed[:3] += style.shove
    executed[:3] += self._rng.normal(scale=style.noise_std, size=3)
    executed[3:6] += self._rng.normal(scale=style.rot_noise_std, size=3)
    self._step += 1
    self._phase_steps += 1
    clip = lambda action: np.clip(action, -1.0, 1.0).astype(np.float32)
    return ExpertAction(executed=clip(executed), label=clip(label))

  def _fumble_action(self, fumble_point: np.ndarray, eef: np.ndarray) -> np.ndarray:
    """(4,) executed move and gripper of the fumble: reach the fumble point, close there, lift;
    then hand back to the hover phase."""
    style = self._style
    if self._fumble_stage == 'reach':
      move, gripper = self._goto(fumble_point, eef), _OPEN
      if np.linalg.norm(fumble_point - eef) < 0.008 or self._phase_steps >= 25:
        self._fumble_stage, self._fumble_stage_steps = 'close', 0
    elif self._fumble_stage == 'close':
      move, gripper = self._goto(fumble_point, eef), _CLOSE
      if self._fumble_stage_steps >= style.close_steps:
        self._fumble_stage, self._fumble_stage_steps = 'lift', 0
    else:
      move, gripper = np.array([0.0, 0.0, style.max_speed]), _CLOSE
      if self._fumble_stage_steps >= style.fumble_lift_steps:
        self._fumble_pending = False
        self.num_regrasps += 1
        self._set_phase('hover')
    self._fumble_stage_steps += 1
    return np.concatenate([move, [gripper]])
