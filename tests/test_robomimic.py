"""The robomimic hdf5 reader on tiny synthetic files: contents, order, filter keys, bad input."""

import hashlib
import json
import re

import h5py
import numpy as np
import pytest

from dpjax.data.robomimic import RobomimicFile, RobomimicFormatError
from dpjax.data.shape_meta import ObsSpec, ShapeMeta

IMAGE = (8, 8, 3)
SHAPE_META = ShapeMeta(obs=(
    ObsSpec('agentview_image', 'rgb', IMAGE),
    ObsSpec('robot0_eef_pos', 'low_dim', (3,)),
    ObsSpec('robot0_gripper_qpos', 'low_dim', (2,)),
), action_dim=7)


def _demo(length, seed):
  rng = np.random.default_rng(seed)
  return {
      'obs/agentview_image': rng.integers(0, 256, (length,) + IMAGE, dtype=np.uint8),
      'obs/robot0_eef_pos': rng.normal(size=(length, 3)),
      'obs/robot0_gripper_qpos': rng.normal(size=(length, 2)),
      # Keys a real robomimic file has but the shape_meta does not use.
      'obs/object': rng.normal(size=(length, 10)),
      'next_obs/robot0_eef_pos': rng.normal(size=(length, 3)),
      'states': rng.normal(size=(length, 32)),
      'actions': rng.uniform(-1, 1, (length, 7)),
      'rewards': np.zeros(length),
      'dones': np.eye(1, length, length - 1, dtype=np.int64)[0],
  }


def _write(path, demos, masks=None):
  with h5py.File(path, 'w') as f:
    data = f.create_group('data')
    data.attrs['total'] = sum(len(d['actions']) for d in demos.values())
    data.attrs['env_args'] = json.dumps({'env_name': 'Lift', 'type': 1, 'env_kwargs': {}})
    for name, datasets in demos.items():
      group = data.create_group(name)
      group.attrs['num_samples'] = len(datasets['actions'])
      for key, value in datasets.items():
        group.create_dataset(key, data=value)
    for key, names in (masks or {}).items():
      f.create_dataset(f'mask/{key}', data=np.array(names, dtype='S'))
  return path


def _sha256(path):
  return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.fixture
def demos():
  return {'demo_10': _demo(4, 10), 'demo_2': _demo(3, 2), 'demo_1': _demo(5, 1)}


def test_reads_demos_in_numeric_order_with_values_and_dtypes(tmp_path, demos):
  path = _write(tmp_path / 'ok.hdf5', demos, {'train': ['demo_10', 'demo_1'],
                                              'valid': ['demo_2']})
  reader = RobomimicFile(path)
  assert reader.demo_names() == ['demo_1', 'demo_2', 'demo_10']
  assert reader.demo_names('train') == ['demo_1', 'demo_10']
  assert reader.demo_names('valid') == ['demo_2']
  assert reader.filter_keys() == ['train', 'valid']
  assert reader.env_args() == {'env_name': 'Lift', 'type': 1, 'env_kwargs': {}}

  episode = reader.read_episode('demo_10', SHAPE_META)
  source = demos['demo_10']
  assert episode.name == 'demo_10' and episode.length == 4
  assert set(episode.obs) == {'agentview_image', 'robot0_eef_pos', 'robot0_gripper_qpos'}
  np.testing.assert_array_equal(episode.obs['agentview_image'], source['obs/agentview_image'])
  assert episode.obs['agentview_image'].dtype == np.uint8
  np.testing.assert_allclose(episode.obs['robot0_eef_pos'], source['obs/robot0_eef_pos'],
                             rtol=1e-6)
  assert episode.obs['robot0_eef_pos'].dtype == np.float32
  np.testing.assert_allclose(episode.actions, source['actions'], rtol=1e-6)
  assert episode.actions.dtype == np.float32
  np.testing.assert_array_equal(episode.dones, [False, False, False, True])

  only_pos = reader.read_episode('demo_1', SHAPE_META, obs_keys=['robot0_eef_pos'])
  assert list(only_pos.obs) == ['robot0_eef_pos']
  assert [e.name for e in reader.iter_episodes(SHAPE_META, 'train')] == ['demo_1', 'demo_10']


def test_unknown_filter_key_and_demo_are_named(tmp_path, demos):
  reader = RobomimicFile(_write(tmp_path / 'ok.hdf5', demos, {'train': ['demo_1']}))
  with pytest.raises(RobomimicFormatError, match=r"filter key 'valid' not found.*\['train'\]"):
    reader.demo_names('valid')
  with pytest.raises(RobomimicFormatError, match="no demo named 'demo_7'"):
    reader.read_episode('demo_7', SHAPE_META)


def _corrupt(demos, name, key, value):
  demos[name][key] = value
  return demos


@pytest.mark.parametrize('mutate, pattern', [
    (lambda d: d['demo_2'].pop('obs/robot0_eef_pos'),
     r"demo 'demo_2': missing obs key 'robot0_eef_pos'"),
    (lambda d: _corrupt(d, 'demo_2', 'obs/agentview_image', np.zeros((3, 6, 8, 3), np.uint8)),
     r"demo 'demo_2' obs 'agentview_image' has per-step shape \(6, 8, 3\), expected \(8, 8, 3\)"),
    (lambda d: _corrupt(d, 'demo_2', 'obs/agentview_image', np.zeros((3,) + IMAGE, np.float32)),
     r"demo 'demo_2' obs 'agentview_image' has dtype float32, expected uint8"),
    (lambda d: _corrupt(d, 'demo_1', 'actions', np.where(np.arange(35).reshape(5, 7) == 9,
                                                         np.nan, 0.0)),
     r"demo 'demo_1': actions contain non-finite values \(first at step 1, dim 2"),
    (lambda d: _corrupt(d, 'demo_1', 'actions', np.full((5, 7), 1.5)),
     r"demo 'demo_1': actions outside \[-1, 1\]"),
    (lambda d: _corrupt(d, 'demo_1', 'actions', np.zeros((5, 6))),
     r"demo 'demo_1': actions have shape \(5, 6\), expected \(L, 7\)"),
    (lambda d: _corrupt(d, 'demo_1', 'obs/robot0_eef_pos', np.zeros((4, 3))),
     r"demo 'demo_1' obs 'robot0_eef_pos' has 4 steps but actions have 5"),
    (lambda d: _corrupt(d, 'demo_1', 'obs/robot0_gripper_qpos', np.full((5, 2), np.inf)),
     r"demo 'demo_1' obs 'robot0_gripper_qpos' contains non-finite values"),
    (lambda d: d.__setitem__('demo_2', {k: v[:0] for k, v in d['demo_2'].items()}),
     r"demo 'demo_2' is empty \(0 steps\)"),
])
def test_bad_demo_contents_name_file_demo_and_key(tmp_path, demos, mutate, pattern):
  mutate(demos)
  path = _write(tmp_path / 'bad.hdf5', demos)
  before = _sha256(path)
  reader = RobomimicFile(path)
  with pytest.raises(RobomimicFormatError, match=re.escape(str(path)) + '.*' + pattern):
    for name in reader.demo_names():
      reader.read_episode(name, SHAPE_META)
  assert _sha256(path) == before


def _replace_with_group(f, name):
  del f[name]
  f.create_group(name)


@pytest.mark.parametrize('restructure, pattern', [
    (lambda f: _replace_with_group(f, 'data/demo_2/actions'),
     r"demo 'demo_2': 'actions' is a group, expected an array"),
    (lambda f: _replace_with_group(f, 'data/demo_2/obs/robot0_eef_pos'),
     r"demo 'demo_2' obs: 'robot0_eef_pos' is a group, expected an array"),
    (lambda f: (f.__delitem__('data/demo_2/obs'), f.create_dataset('data/demo_2/obs', data=[0])),
     r"demo 'demo_2': \"obs\" is an array, expected a group"),
])
def test_groups_and_arrays_in_each_others_place_are_named(tmp_path, demos, restructure, pattern):
  path = _write(tmp_path / 'bad.hdf5', demos)
  with h5py.File(path, 'a') as f:
    restructure(f)
  reader = RobomimicFile(path)
  with pytest.raises(RobomimicFormatError, match=re.escape(str(path)) + '.*' + pattern):
    reader.read_episode('demo_2', SHAPE_META)


def test_a_damaged_compressed_array_is_named(tmp_path, demos):
  path = tmp_path / 'damaged.hdf5'
  with h5py.File(_write(path, demos), 'a') as f:
    del f['data/demo_1/obs/agentview_image']
    images = f.create_dataset('data/demo_1/obs/agentview_image', compression='gzip',
                              data=demos['demo_1']['obs/agentview_image'])
    chunk = images.id.get_chunk_info(0)
  with open(path, 'r+b') as f:  # The chunk's compressed bytes no longer inflate.
    f.seek(chunk.byte_offset)
    f.write(b'\xff' * chunk.size)
  reader = RobomimicFile(path)
  reader.read_episode('demo_2', SHAPE_META)  # Other demos still read.
  with pytest.raises(RobomimicFormatError,
                     match=re.escape(str(path)) + r": demo 'demo_1' obs: 'agentview_image' "
                     r'cannot be read, the file is damaged'):
    reader.read_episode('demo_1', SHAPE_META)


def test_bad_files_are_named(tmp_path):
  missing = tmp_path / 'nope.hdf5'
  with pytest.raises(FileNotFoundError, match=re.escape(str(missing)) + ' does not exist'):
    RobomimicFile(missing)

  empty = tmp_path / 'empty.hdf5'
  empty.write_bytes(b'')
  with pytest.raises(RobomimicFormatError,
                     match=re.escape(str(empty)) + r': not a readable hdf5 file \(0 bytes\)'):
    RobomimicFile(empty)

  text = tmp_path / 'notes.hdf5'
  text.write_text('not hdf5 at all')
  with pytest.raises(RobomimicFormatError, match=re.escape(str(text)) + ': not a readable hdf5'):
    RobomimicFile(text)

  no_data = tmp_path / 'no_data.hdf5'
  with h5py.File(no_data, 'w') as f:
    f.create_group('something_else')
  with pytest.raises(RobomimicFormatError,
                     match=re.escape(str(no_data)) + r': no "data" group.*something_else'):
    RobomimicFile(no_data)

  no_demos = tmp_path / 'no_demos.hdf5'
  with h5py.File(no_demos, 'w') as f:
    f.create_group('data')
  with pytest.raises(RobomimicFormatError,
                     match=re.escape(str(no_demos)) + ': the "data" group contains no demos'):
    RobomimicFile(no_demos)


def test_reading_never_modifies_the_source(tmp_path, demos):
  path = _write(tmp_path / 'ok.hdf5', demos, {'train': ['demo_1', 'demo_2', 'demo_10']})
  before, mtime = _sha256(path), path.stat().st_mtime_ns
  reader = RobomimicFile(path)
  list(reader.iter_episodes(SHAPE_META, 'train'))
  reader.env_args()
  with pytest.raises(RobomimicFormatError):
    reader.read_episode('demo_1', ShapeMeta(obs=(ObsSpec('absent', 'low_dim', (1,)),),
                                            action_dim=7))
  assert _sha256(path) == before and path.stat().st_mtime_ns == mtime
