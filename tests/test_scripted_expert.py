"""The scripted expert's maths and labels, without a simulator (the rollouts are in
tests/rendering/test_envs.py)."""

import numpy as np
import pytest
from scipy.spatial.transform import Rotation

from dpjax.envs.scripted_expert import TOP_DOWN_QUAT, LiftExpert, orientation_error


@pytest.mark.parametrize('seed', range(5))
def test_orientation_error_matches_scipy(seed):
  rng = np.random.default_rng(seed)
  target, current = Rotation.random(2, random_state=seed)
  expected = (target * current.inv()).as_rotvec()
  # Either sign of a quaternion is the same rotation.
  sign = rng.choice([-1.0, 1.0])
  np.testing.assert_allclose(
      orientation_error(target.as_quat(), sign * current.as_quat()), expected, atol=1e-9)
  np.testing.assert_allclose(orientation_error(current.as_quat(), current.as_quat()), 0.0,
                             atol=1e-9)


def test_labels_are_the_executed_actions_without_the_noise():
  expert = LiftExpert(np.random.default_rng(3), shove_probability=1.0)
  tilted = (Rotation.from_quat(TOP_DOWN_QUAT) * Rotation.from_rotvec([0.1, 0.0, 0.0])).as_quat()
  obs = {'cube_pos': np.array([0.0, 0.0, 0.82]), 'robot0_eef_pos': np.array([-0.1, 0.0, 1.0]),
         'robot0_eef_quat': tilted, 'robot0_gripper_qpos': np.array([0.04, -0.04])}
  differences = []
  for _ in range(12):
    action = expert.act(obs)
    assert action.executed.dtype == action.label.dtype == np.float32
    assert np.abs(action.executed).max() <= 1.0 and np.abs(action.label).max() <= 1.0
    differences.append(np.abs(action.executed - action.label)[:6].max())
    # The label turns back towards top-down: half the error per step, in units of 0.5 rad.
    np.testing.assert_allclose(action.label[3:6], orientation_error(TOP_DOWN_QUAT, tilted),
                               rtol=1e-5)
    assert action.label[6] == action.executed[6] == -1.0  # Gripper open while approaching.
  assert max(differences) > 0.1  # The shove and the noise are in the executed actions only.


def _obs(eef, gap, cube=(0.0, 0.0, 0.82)):
  return {'cube_pos': np.array(cube), 'robot0_eef_pos': np.array(eef),
          'robot0_eef_quat': TOP_DOWN_QUAT, 'robot0_gripper_qpos': np.array([gap / 2, -gap / 2])}


def test_a_fumble_closes_beside_the_cube_while_the_labels_recover():
  expert = LiftExpert(np.random.default_rng(0), shove_probability=0.0, fumble_probability=1.0)
  hover = np.array([0.0, 0.0, 0.82 + expert._style.hover_height])
  fumble = np.array([0.0, 0.0, 0.82 + expert._style.grasp_offset]) + expert._style.fumble
  expert.act(_obs(hover, 0.08))  # Lined up above the cube: the fumble starts.
  assert expert.phase == 'fumble'
  action = expert.act(_obs(fumble, 0.08))  # At the fumble point: close there...
  action = expert.act(_obs(fumble, 0.08))
  assert action.executed[6] == 1.0
  # ...while the label opens and heads back above the cube.
  assert action.label[6] == -1.0
  toward_hover = (hover - fumble) / np.linalg.norm(hover - fumble)
  assert np.dot(action.label[:3], toward_hover) > 0.9 * np.linalg.norm(action.label[:3])
  for _ in range(40):
    expert.act(_obs(fumble + [0.0, 0.0, 0.05], 0.0))
  assert expert.phase == 'hover' and expert.num_regrasps == 1


def test_an_empty_grip_is_a_miss():
  expert = LiftExpert(np.random.default_rng(1), shove_probability=0.0, fumble_probability=0.0)
  grasp = np.array([0.0, 0.0, 0.82 + expert._style.grasp_offset])
  expert.act(_obs(grasp + [0.0, 0.0, expert._style.hover_height], 0.08))
  expert.act(_obs(grasp, 0.08))
  assert expert.phase == 'close'
  for _ in range(3):
    assert expert.act(_obs(grasp, 0.05)).label[6] == 1.0  # Closing on the cube: keep closing.
  action = expert.act(_obs(grasp, 0.004))  # Fingers met: nothing between them.
  assert expert.phase == 'hover' and action.label[6] == -1.0 and expert.num_regrasps == 1
