"""Demo generation with real robosuite: robomimic format, reproducibility, atomic writes."""

import os

import h5py
import numpy as np
import pytest

from dpjax.data import demo_generation
from dpjax.data.robomimic import RobomimicFile
from dpjax.data.shape_meta import ObsSpec, ShapeMeta

IMAGE_SIZE = 32
SHAPE_META = ShapeMeta(obs=(
    ObsSpec('agentview_image', 'rgb', (IMAGE_SIZE, IMAGE_SIZE, 3)),
    ObsSpec('robot0_eye_in_hand_image', 'rgb', (IMAGE_SIZE, IMAGE_SIZE, 3)),
    ObsSpec('robot0_eef_pos', 'low_dim', (3,)),
    ObsSpec('robot0_eef_quat', 'low_dim', (4,)),
    ObsSpec('robot0_gripper_qpos', 'low_dim', (2,)),
    ObsSpec('cube_pos', 'low_dim', (3,)),
), action_dim=7)


def _datasets(path):
  out = {}
  with h5py.File(path, 'r') as f:
    f.visititems(lambda name, obj: out.__setitem__(name, obj[()])
                 if isinstance(obj, h5py.Dataset) else None)
  return out


@pytest.fixture(scope='module')
def generated(tmp_path_factory):
  """The same seed written by two spawned workers and (a shorter run) in-process."""
  directory = tmp_path_factory.mktemp('demos')
  two = demo_generation.generate_demos(directory / 'two.hdf5', num_demos=2, seed=7,
                                       num_workers=2, image_size=IMAGE_SIZE, progress=False)
  one = demo_generation.generate_demos(directory / 'one.hdf5', num_demos=1, seed=7,
                                       num_workers=1, image_size=IMAGE_SIZE, progress=False)
  return directory, two, one


def test_writes_robomimic_format_the_reader_accepts(generated):
  directory, stats, _ = generated
  path = directory / 'two.hdf5'
  assert stats['successes'] == 2 and stats['attempts'] >= 2
  assert stats['expert_success_rate'] == 2 / stats['attempts']
  assert stats['episodes_per_min'] > 0
  # Only the finished file is left: the temporary one was renamed.
  assert sorted(p.name for p in directory.iterdir()) == ['one.hdf5', 'two.hdf5']

  reader = RobomimicFile(path)
  assert reader.demo_names() == ['demo_0', 'demo_1']
  train, valid = reader.demo_names('train'), reader.demo_names('valid')
  assert len(valid) == 1 and sorted(train + valid) == ['demo_0', 'demo_1']
  env_args = reader.env_args()
  assert env_args['env_name'] == 'Lift' and env_args['type'] == 1
  kwargs = env_args['env_kwargs']
  assert kwargs['camera_heights'] == IMAGE_SIZE and kwargs['control_freq'] == 20
  assert kwargs['controller_configs']['body_parts']['right']['input_type'] == 'delta'
  assert kwargs['controller_configs']['body_parts']['right']['type'] == 'OSC_POSE'

  lengths = []
  for episode in reader.iter_episodes(SHAPE_META):
    lengths.append(episode.length)
    assert 20 < episode.length <= demo_generation.MAX_EPISODE_STEPS
    assert np.abs(episode.actions).max() <= 1.0
    assert episode.rewards[-1] == 1.0 and episode.rewards[0] == 0.0
    np.testing.assert_array_equal(episode.dones, np.arange(episode.length) == episode.length - 1)
    # The demo ends holding the cube well above where it started.
    assert episode.obs['cube_pos'][-1, 2] > episode.obs['cube_pos'][0, 2] + 0.04
    assert episode.actions[-1, 6] == 1.0  # Gripper still closed.
    # Rotation labels are small corrections back to top-down, not the executed noise.
    assert np.abs(episode.actions[:, 3:6]).max() < 0.5
  with h5py.File(path, 'r') as f:
    assert f['data'].attrs['total'] == sum(lengths)
    for name, length in zip(['demo_0', 'demo_1'], lengths):
      demo = f['data'][name]
      assert demo.attrs['num_samples'] == length
      assert demo['states'].shape[0] == length and demo['states'].ndim == 2
      assert {'object', 'robot0_joint_pos', 'robot0_eef_quat'} <= set(demo['obs'])
    assert f['mask/train'].dtype.kind == 'S'


def test_same_seed_gives_the_same_demos_for_any_worker_count(generated):
  directory, two, one = generated
  assert two['num_workers'] == 2 and one['num_workers'] == 1
  parallel, serial = _datasets(directory / 'two.hdf5'), _datasets(directory / 'one.hdf5')
  demo_0 = [key for key in serial if key.startswith('data/demo_0/')]
  assert len(demo_0) > 10
  for key in demo_0:
    np.testing.assert_array_equal(parallel[key], serial[key], err_msg=key)
  assert not np.array_equal(parallel['data/demo_0/actions'], parallel['data/demo_1/actions'])


def test_recorded_states_and_actions_replay_in_the_env(generated):
  from dpjax.envs.lift import make_lift_env  # pylint: disable=g-import-not-at-top
  directory, _, _ = generated
  env = make_lift_env(use_cameras=False)
  try:
    with h5py.File(directory / 'two.hdf5', 'r') as f:
      demo = f['data/demo_0']
      states, actions = demo['states'][()], demo['executed_actions'][()]
      assert not np.array_equal(actions, demo['actions'][()])  # The expert's noise was executed.
      env.reset(seed=int(demo.attrs['reset_seed']))
      np.testing.assert_array_equal(env.get_state(), states[0])
      env.reset_to_state(states[0])
      for t, action in enumerate(actions):
        np.testing.assert_allclose(env.get_state(), states[t], atol=1e-4, err_msg=f'step {t}')
        env.step(action)
      assert env.is_success()
  finally:
    env.close()


def test_too_rare_success_raises_and_leaves_existing_file_alone(tmp_path):
  path = tmp_path / 'demos.hdf5'
  path.write_bytes(b'previous contents')
  # Five steps are too few to lift the cube: every attempt fails.
  with pytest.raises(RuntimeError, match=r'succeeded in only 0 of 2 attempts.*1 demos'):
    demo_generation.generate_demos(path, num_demos=1, seed=0, num_workers=1,
                                   image_size=IMAGE_SIZE, progress=False, max_attempts=2,
                                   max_episode_steps=5)
  assert path.read_bytes() == b'previous contents'
  assert os.listdir(tmp_path) == ['demos.hdf5']


def test_an_output_path_that_is_a_folder_fails_before_any_episode(tmp_path, monkeypatch):
  monkeypatch.setattr(demo_generation, '_episodes', None)  # Reaching it would be a TypeError.
  with pytest.raises(IsADirectoryError, match=rf'{tmp_path}: is a folder'):
    demo_generation.generate_demos(tmp_path, num_demos=1, seed=0, num_workers=1,
                                   image_size=IMAGE_SIZE, progress=False)
  assert os.listdir(tmp_path) == []


def test_split_masks_hold_out_about_a_tenth():
  names = [f'demo_{i}' for i in range(20)]
  masks = demo_generation._split_masks(names, seed=0)  # pylint: disable=protected-access
  assert len(masks['valid']) == 2 and len(masks['train']) == 18
  assert sorted(masks['train'] + masks['valid'], key=lambda n: int(n[5:])) == names
  assert demo_generation._split_masks(['demo_0'], seed=0) == {  # pylint: disable=protected-access
      'train': ['demo_0'], 'valid': []}
  assert masks == demo_generation._split_masks(names, seed=0)  # pylint: disable=protected-access
  assert masks != demo_generation._split_masks(names, seed=1)  # pylint: disable=protected-access
