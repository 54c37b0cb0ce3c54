"""Real robosuite Lift: upright images, seeded resets, delta control, state restore, expert."""

import numpy as np
import pytest

from dpjax.envs import rendering
from dpjax.envs.lift import make_lift_env
from dpjax.envs.scripted_expert import LiftExpert

OPEN_GRIPPER = -1.0


@pytest.fixture(scope='module')
def env():
  lift = make_lift_env(image_size=84)
  yield lift
  lift.close()


@pytest.fixture(scope='module')
def physics_env():
  lift = make_lift_env(use_cameras=False)
  yield lift
  lift.close()


def _red_rows(image):
  """Row indices of the red cube's pixels."""
  rgb = image.astype(np.int32)
  return np.nonzero(rgb[..., 0] - rgb[..., 1:].max(axis=-1) > 40)[0]


def test_images_are_upright_uint8_flips_of_the_opengl_frames(env):
  obs = env.reset(seed=0)
  for key in ('agentview_image', 'robot0_eye_in_hand_image'):
    assert obs[key].shape == (84, 84, 3) and obs[key].dtype == np.uint8
  agentview = obs['agentview_image']
  # The front camera looks down at the white table, which fills the bottom of an upright
  # image; the robot and the grey backdrop fill the top.
  assert agentview[-20:].mean() > agentview[:20].mean() + 50
  # Raising the cube 10 cm in the world must move its pixels up (to smaller rows).
  state = env.get_state()
  qpos_start, _ = env.env.sim.model.get_joint_qpos_addr(env.env.cube.joints[0])
  state[1 + qpos_start + 2] += 0.10  # Flattened state = [time, qpos, qvel]; +2 is z.
  raised = env.reset_to_state(state)['agentview_image']
  rows, raised_rows = _red_rows(agentview), _red_rows(raised)
  assert rows.size > 10 and raised_rows.size > 10
  assert raised_rows.mean() < rows.mean() - 5
  raw = env.env._get_observations(force_update=True)  # pylint: disable=protected-access
  np.testing.assert_array_equal(raised, raw['agentview_image'][::-1])
  eye = env.reset_to_state(state)['robot0_eye_in_hand_image']
  np.testing.assert_array_equal(eye, raw['robot0_eye_in_hand_image'][::-1])


def test_seeded_reset_is_reproducible_and_leaves_global_rng_alone(env):
  global_state = np.random.get_state()
  first = env.reset(seed=5)
  for _ in range(5):
    env.step(np.array([0.5, -0.5, 0.3, 0.1, 0.0, 0.0, 1.0]))
  again = env.reset(seed=5)
  for key in first:
    np.testing.assert_array_equal(first[key], again[key], err_msg=key)
  other = env.reset(seed=6)
  assert np.abs(other['cube_pos'] - first['cube_pos']).max() > 1e-3
  after = np.random.get_state()
  assert after[0] == global_state[0] and np.array_equal(after[1], global_state[1])


def test_delta_actions_move_the_end_effector_along_the_commanded_axis(physics_env):
  for axis in (0, 2):
    start = physics_env.reset(seed=1)['robot0_eef_pos']
    action = np.zeros(7)
    action[axis] = 1.0
    action[6] = OPEN_GRIPPER
    for _ in range(5):
      obs, _, _, _ = physics_env.step(action)
    moved = obs['robot0_eef_pos'] - start
    # Five steps of a full +1 delta ask for 5 x 5 cm; the OSC, ramping up, gets ~5 cm there.
    assert moved[axis] > 0.03, moved
    assert np.abs(np.delete(moved, axis)).max() < 0.3 * moved[axis], moved


def test_reset_to_state_restores_the_simulation(physics_env):
  physics_env.reset(seed=2)
  for _ in range(4):
    physics_env.step(np.array([0.3, 0.2, -0.2, 0.0, 0.0, 0.1, -1.0]))
  state = physics_env.get_state()
  # robosuite's step observations lag the state by one physics substep; refresh them.
  physics_env.env.sim.forward()
  # pylint: disable-next=protected-access
  expected = physics_env.env._get_observations(force_update=True)
  np.testing.assert_array_equal(physics_env.get_state(), state)
  physics_env.reset(seed=3)
  restored = physics_env.reset_to_state(state)
  np.testing.assert_array_equal(physics_env.get_state(), state)
  for key in ('robot0_eef_pos', 'cube_pos', 'robot0_gripper_qpos'):
    np.testing.assert_allclose(restored[key], expected[key], atol=1e-12, err_msg=key)
  with pytest.raises(ValueError, match=r'state has shape \(3,\), expected \('):
    physics_env.reset_to_state(np.zeros(3))


def test_step_rejects_bad_actions(physics_env):
  physics_env.reset(seed=0)
  with pytest.raises(ValueError, match=r'action has shape \(6,\), expected \(7,\)'):
    physics_env.step(np.zeros(6))
  with pytest.raises(ValueError, match='action is not finite'):
    physics_env.step(np.array([np.nan, 0, 0, 0, 0, 0, 0]))


def test_expert_lifts_the_cube_with_valid_actions(physics_env):
  lengths = []
  for seed in range(4):
    obs = physics_env.reset(seed=seed)
    expert = LiftExpert(np.random.default_rng(seed))
    assert not physics_env.is_success()
    for step in range(150):
      action = expert.act(obs).executed
      assert action.shape == (7,) and action.dtype == np.float32
      assert np.abs(action).max() <= 1.0
      obs, _, _, _ = physics_env.step(action)
      if physics_env.is_success():
        break
    assert physics_env.is_success(), f'seed {seed}: expert stuck in phase {expert.phase}'
    lengths.append(step + 1)
  assert len(set(lengths)) > 1  # Per-episode styles make the demos differ.


def test_rendering_respects_existing_choice_and_names_missing_libraries(monkeypatch):
  monkeypatch.setenv('MUJOCO_GL', 'osmesa')
  assert rendering.configure_headless_rendering() == 'osmesa'
  monkeypatch.delenv('MUJOCO_GL')
  monkeypatch.delenv('PYOPENGL_PLATFORM', raising=False)
  chosen = rendering.configure_headless_rendering()  # Probes a real GL context.
  assert chosen in ('egl', 'osmesa') and rendering.os.environ['MUJOCO_GL'] == chosen
  monkeypatch.delenv('MUJOCO_GL')
  monkeypatch.delenv('PYOPENGL_PLATFORM')
  monkeypatch.setattr(rendering.ctypes.util, 'find_library', lambda name: None)
  with pytest.raises(RuntimeError, match=r'libEGL not found.*libegl1(.|\n)*libosmesa6'):
    rendering.configure_headless_rendering()
