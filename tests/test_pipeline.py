"""robomimic hdf5 -> TFDS/RLDS -> tf.data windows, on data whose content names its own origin.

The synthetic file encodes (episode, step) into every value: actions[:, 0] = episode / 100,
actions[:, 1] = step / 100; eef_pos = (episode, step, 0); image channel 0 = episode,
channel 1 = step (+100 on the second camera), channel 2 = the pixel's row * 16 + column. So a
batch tells exactly which steps (padding included) and which crop it was built from.
"""

import fcntl
import json
import os
import re
import shutil
import socket
import threading
import time

import h5py
import numpy as np
import pytest

from configs import lift
from dpjax.data import pipeline, prepare, windows
from dpjax.data.normalizer import Normalizer
from dpjax.data.rlds_dataset import build_rlds_dataset
from dpjax.data.robomimic import RobomimicFile
from dpjax.data.shape_meta import ObsSpec, ShapeMeta

SIZE, CROP = 16, (12, 12)
LENGTHS = (1, 3, 12, 7, 9, 20, 5, 15)  # Windows with 10/2/8: L - 1 each, 64 in all.
HORIZON, TO, N_ACTION = 10, 2, 8
SHAPE_META = ShapeMeta(obs=(
    ObsSpec('agentview_image', 'rgb', (SIZE, SIZE, 3)),
    ObsSpec('robot0_eye_in_hand_image', 'rgb', (SIZE, SIZE, 3)),
    ObsSpec('robot0_eef_pos', 'low_dim', (3,)),
    ObsSpec('robot0_eef_quat', 'low_dim', (4,)),
    ObsSpec('robot0_gripper_qpos', 'low_dim', (2,)),
), action_dim=7)
PIXEL_ID = np.arange(SIZE * SIZE).reshape(SIZE, SIZE)


def write_synthetic(path, lengths):
  with h5py.File(path, 'w') as f:
    data = f.create_group('data')
    data.attrs['env_args'] = json.dumps({'env_name': 'Lift', 'type': 1, 'env_kwargs': {}})
    data.attrs['total'] = sum(lengths)
    for ep, length in enumerate(lengths):
      g = data.create_group(f'demo_{ep}')
      g.attrs['num_samples'] = length
      step = np.arange(length)
      actions = np.zeros((length, 7), np.float32)
      actions[:, 0], actions[:, 1] = ep / 100, step / 100
      g['actions'] = actions
      g['rewards'] = (step == length - 1).astype(np.float64)
      g['dones'] = (step == length - 1).astype(np.int64)
      g['states'] = np.zeros((length, 4))
      images = np.empty((length, SIZE, SIZE, 3), np.uint8)
      images[..., 0], images[..., 1] = ep, step[:, None, None]
      images[..., 2] = PIXEL_ID
      g['obs/agentview_image'] = images
      images = images.copy()
      images[..., 1] += 100
      g['obs/robot0_eye_in_hand_image'] = images
      g['obs/robot0_eef_pos'] = np.stack([np.full(length, ep), step, np.zeros(length)], -1)
      g['obs/robot0_eef_quat'] = np.tile([0.0, 0.0, 0.0, 1.0], (length, 1))
      g['obs/robot0_gripper_qpos'] = np.stack([step * 0.01, np.full(length, ep * 0.01)], -1)


def _no_network(*args, **kwargs):
  raise AssertionError(f'network access attempted: {args} {kwargs}')


@pytest.fixture(scope='module')
def dataset(tmp_path_factory):
  root = tmp_path_factory.mktemp('pipeline')
  hdf5 = root / 'synthetic.hdf5'
  write_synthetic(hdf5, LENGTHS)
  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(socket.socket, 'connect', _no_network)
    mp.setattr(socket, 'create_connection', _no_network)
    builder = build_rlds_dataset(hdf5, root / 'tfds', SHAPE_META)
  return hdf5, root, builder, pipeline.load_episodes(builder, SHAPE_META)


def _kwargs(**overrides):
  kwargs = dict(split='train', horizon=HORIZON, n_obs_steps=TO, n_action_steps=N_ACTION,
                batch_size=8, crop_shape=CROP, seed=0, val_ratio=0.0, split_seed=42,
                process_index=0, process_count=1, repeat=False)
  kwargs.update(overrides)
  return kwargs


def _windows_of(batches):
  """(episode, steps tuple) of every window in the batches, checking obs against actions."""
  out = []
  for batch in batches:
    action = batch['action']
    for b in range(action.shape[0]):
      ep = int(round(action[b, 0, 0] * 100))
      steps = np.rint(action[b, :, 1] * 100).astype(int)
      np.testing.assert_allclose(action[b, :, 0], ep / 100)
      obs_steps = steps[:TO]  # Observation frames are the window's first To steps.
      np.testing.assert_array_equal(batch['obs']['robot0_eef_pos'][b],
                                    np.stack([np.full(TO, ep), obs_steps, np.zeros(TO)], -1))
      np.testing.assert_array_equal(batch['obs']['robot0_eef_quat'][b], [[0, 0, 0, 1]] * TO)
      for key, step_shift in (('agentview_image', 0), ('robot0_eye_in_hand_image', 100)):
        image = batch['obs'][key][b]
        assert (image[..., 0] == ep).all()
        np.testing.assert_array_equal(image[..., 1], (obs_steps + step_shift)[:, None, None]
                                      * np.ones(CROP, int))
      out.append((ep, tuple(steps.tolist())))
  return out


def _crop_offsets(batches, key):
  """(row, col) of each frame's crop in the full image, checking the crop is a solid block."""
  offsets = []
  for batch in batches:
    ids = batch['obs'][key][..., 2].astype(int)  # (B, To, ch, cw) pixel ids
    for frame in ids.reshape(-1, *CROP):
      top, left = divmod(int(frame[0, 0]), SIZE)
      np.testing.assert_array_equal(frame, PIXEL_ID[top:top + CROP[0], left:left + CROP[1]])
      offsets.append((top, left))
  return offsets


def test_batches_have_documented_shapes_and_dtypes(dataset):
  *_, store = dataset
  batch = next(pipeline.make_dataset(store, SHAPE_META, **_kwargs(repeat=True)))
  assert batch['action'].shape == (8, HORIZON, 7) and batch['action'].dtype == np.float32
  for spec in SHAPE_META.obs:
    value = batch['obs'][spec.key]
    if spec.kind == 'rgb':
      assert value.shape == (8, TO) + CROP + (3,) and value.dtype == np.uint8
    else:
      assert value.shape == (8, TO) + spec.shape and value.dtype == np.float32


def test_one_epoch_yields_every_window_once_with_edge_padding(dataset):
  *_, store = dataset
  seen = _windows_of(pipeline.make_dataset(store, SHAPE_META, **_kwargs()))
  assert len(seen) == 64 == len(set(seen))
  # Hand-known windows: episode 1 (L = 3) pads one step before and repeats its last frame.
  assert (1, (0, 0, 1, 2, 2, 2, 2, 2, 2, 2)) in seen
  assert (1, (0, 1, 2, 2, 2, 2, 2, 2, 2, 2)) in seen
  assert sorted(s for e, s in seen if e == 1) == [(0, 0, 1, 2, 2, 2, 2, 2, 2, 2),
                                                  (0, 1, 2, 2, 2, 2, 2, 2, 2, 2)]
  assert (2, (9, 10, 11, 11, 11, 11, 11, 11, 11, 11)) in seen
  assert not [s for e, s in seen if e == 0]  # L = 1 has no window.
  expected = {(ep, tuple(row)) for ep, length in enumerate(LENGTHS)
              for row in windows.window_indices(length, HORIZON, TO - 1, N_ACTION - 1).tolist()}
  assert set(seen) == expected


def test_train_crops_are_random_per_frame_and_val_crops_centred(dataset):
  *_, store = dataset
  train = list(pipeline.make_dataset(store, SHAPE_META, **_kwargs()))
  agent = _crop_offsets(train, 'agentview_image')
  hand = _crop_offsets(train, 'robot0_eye_in_hand_image')
  # Corners in robomimic's range [0, SIZE − CROP), as the in-graph `crop_images` draws them:
  # every one of them, and none beyond.
  rows, cols = zip(*(agent + hand))
  assert set(rows) == set(range(SIZE - CROP[0])) and set(cols) == set(range(SIZE - CROP[1]))
  assert len(set(agent)) > 10 and agent != hand
  first, second = np.array(agent).reshape(-1, TO, 2).transpose(1, 0, 2)
  # Frames of one window crop independently, in rows and in columns.
  assert (first[:, 0] != second[:, 0]).mean() > 0.5 and (first[:, 1] != second[:, 1]).mean() > 0.5
  val = list(pipeline.make_dataset(store, SHAPE_META, **_kwargs(split='val', val_ratio=0.25,
                                                                batch_size=2)))
  assert set(_crop_offsets(val, 'agentview_image')) == {(2, 2)}
  _windows_of(val)


def test_validation_leaves_out_a_fixed_random_few_windows_not_the_last_episode_tail(dataset):
  *_, store = dataset
  kwargs = _kwargs(split='val', val_ratio=0.5, batch_size=8)
  passes = [_windows_of(pipeline.make_dataset(store, SHAPE_META, **kwargs)) for _ in range(2)]
  assert passes[0] == passes[1]  # The same windows, in the same order, every epoch.
  _, val_episodes = windows.split_episodes(len(LENGTHS), 0.5, 42)
  in_order = [(int(ep), tuple(row)) for ep in val_episodes
              for row in windows.window_indices(LENGTHS[ep], HORIZON, TO - 1,
                                                N_ACTION - 1).tolist()]
  assert len(in_order) % 8 and set(passes[0]) < set(in_order)
  assert passes[0] != in_order[:len(passes[0])]  # Not the first ones in order...
  assert set(in_order[len(passes[0]):]) - set(passes[0]) != set(in_order[len(passes[0]):])


def test_same_seed_same_batches(dataset):
  *_, store = dataset

  def first_batches(seed):
    it = pipeline.make_dataset(store, SHAPE_META, **_kwargs(seed=seed, repeat=True))
    return [next(it) for _ in range(10)]  # Crosses an epoch boundary (8 batches per epoch).

  a, b, c = first_batches(3), first_batches(3), first_batches(4)
  for x, y in zip(a, b):
    np.testing.assert_array_equal(x['action'], y['action'])
    for key in x['obs']:
      np.testing.assert_array_equal(x['obs'][key], y['obs'][key])
  assert not all(np.array_equal(x['action'], z['action']) for x, z in zip(a, c))
  # Each epoch is a new permutation.
  epoch1 = [w for batch in a[:8] for w in _windows_of([batch])]
  epoch2 = _windows_of(a[8:10])
  assert epoch2 != epoch1[:16]


def test_train_and_val_are_disjoint_by_episode(dataset):
  *_, store = dataset
  kwargs = _kwargs(val_ratio=0.25, split_seed=7, batch_size=1)
  train = {e for e, _ in _windows_of(pipeline.make_dataset(store, SHAPE_META, **kwargs))}
  kwargs['split'] = 'val'
  val = {e for e, _ in _windows_of(pipeline.make_dataset(store, SHAPE_META, **kwargs))}
  train_idx, val_idx = windows.split_episodes(len(LENGTHS), 0.25, 7)
  assert len(val_idx) == 2 and not train & val
  assert val == {e for e in val_idx if LENGTHS[e] > 1}
  assert train == {e for e in train_idx if LENGTHS[e] > 1}


def test_hosts_get_disjoint_equal_shards(dataset):
  *_, store = dataset
  shards = [_windows_of(pipeline.make_dataset(
      store, SHAPE_META, **_kwargs(batch_size=4, process_index=i, process_count=2)))
            for i in range(2)]
  assert len(shards[0]) == len(shards[1]) == 32
  assert not set(shards[0]) & set(shards[1])
  assert len(set(shards[0]) | set(shards[1])) == 64


def test_epoch_sizes_and_summary(dataset):
  *_, store = dataset
  for split in ('train', 'val'):
    kwargs = _kwargs(split=split, val_ratio=0.25, batch_size=3)
    batches = list(pipeline.make_dataset(store, SHAPE_META, **kwargs))
    del kwargs['seed'], kwargs['crop_shape'], kwargs['process_index'], kwargs['repeat']
    assert pipeline.steps_per_epoch(store.lengths, **kwargs) == len(batches) > 0
  summary = pipeline.dataset_summary(LENGTHS, horizon=HORIZON, n_obs_steps=TO,
                                     n_action_steps=N_ACTION, val_ratio=0.0, split_seed=0,
                                     batch_size=8)
  assert summary['train'] == {'episodes': 8, 'steps': sum(LENGTHS), 'windows': 64,
                              'batches_per_epoch': 8}
  assert summary['val'] == {'episodes': 0, 'steps': 0, 'windows': 0, 'batches_per_epoch': 0}
  assert 'train: 8 episodes' in pipeline.format_summary(summary)


def test_rlds_episodes_match_the_source_exactly(dataset):
  hdf5, _, builder, store = dataset
  assert store.names == tuple(f'demo_{i}' for i in range(len(LENGTHS)))
  assert store.lengths.tolist() == list(LENGTHS)
  source = RobomimicFile(hdf5)
  for i, episode in enumerate(source.iter_episodes(SHAPE_META)):
    stored = store.episode(i)
    for key in SHAPE_META.keys:
      np.testing.assert_array_equal(stored[key], episode.obs[key])  # PNG is lossless.
    np.testing.assert_array_equal(stored['action'], episode.actions)
  # RLDS step flags and metadata.
  raw = next(iter(builder.as_dataset(split='train').filter(
      lambda ep: ep['episode_metadata']['demo_name'] == 'demo_1')))
  steps = list(raw['steps'].as_numpy_iterator())
  assert [s['is_first'] for s in steps] == [True, False, False]
  assert [s['is_last'] for s in steps] == [False, False, True]
  assert [s['is_terminal'] for s in steps] == [False, False, True]
  assert [float(s['reward']) for s in steps] == [0.0, 0.0, 1.0]
  assert builder.info.metadata['env_args']['env_name'] == 'Lift'


def test_normalizer_is_fitted_on_train_episodes_only(dataset):
  hdf5, _, _, store = dataset
  fitted = pipeline.fit_normalizer(store, val_ratio=0.25, split_seed=7)
  train_idx, _ = windows.split_episodes(len(LENGTHS), 0.25, 7)
  train_names = {f'demo_{i}' for i in train_idx}
  episodes = [e for e in RobomimicFile(hdf5).iter_episodes(SHAPE_META) if e.name in train_names]
  expected = Normalizer.fit(episodes, SHAPE_META)
  for key in expected.keys:
    np.testing.assert_allclose(fitted.scale[key], expected.scale[key], rtol=1e-6)
    np.testing.assert_allclose(fitted.offset[key], expected.offset[key], rtol=1e-6)
  # eef_pos dim 0 is the episode id: its limits come from the train episodes alone.
  lo, hi = min(train_idx), max(train_idx)
  np.testing.assert_allclose(fitted.scale['robot0_eef_pos'][0], 2 / (hi - lo))


def test_building_twice_does_not_rebuild_and_sources_do_not_collide(dataset):
  hdf5, root, builder, _ = dataset
  files = sorted(p for p in (root / 'tfds').rglob('*') if p.is_file())
  before = {p: os.stat(p).st_mtime_ns for p in files}
  again = build_rlds_dataset(hdf5, root / 'tfds', SHAPE_META)
  assert again.data_dir == builder.data_dir
  assert {p: os.stat(p).st_mtime_ns for p in files} == before
  assert sorted(p for p in (root / 'tfds').rglob('*') if p.is_file()) == files
  other = root / 'other.hdf5'
  write_synthetic(other, (4, 5))
  assert build_rlds_dataset(other, root / 'tfds', SHAPE_META).data_dir != builder.data_dir
  # A prepared directory is a source on its own.
  reread = pipeline.load_episodes(builder.data_dir, SHAPE_META)
  assert reread.lengths.tolist() == list(LENGTHS)


def test_bad_requests_fail_clearly(dataset, tmp_path):
  *_, store = dataset
  with pytest.raises(ValueError, match="split 'val' has no episodes"):
    pipeline.make_dataset(store, SHAPE_META, **_kwargs(split='val'))
  with pytest.raises(ValueError, match='crop_shape'):
    pipeline.make_dataset(store, SHAPE_META, **_kwargs(crop_shape=(20, 20)))
  with pytest.raises(ValueError, match='too few for one batch'):
    pipeline.make_dataset(store, SHAPE_META, **_kwargs(batch_size=65))
  with pytest.raises(FileNotFoundError, match='not a prepared TFDS dataset'):
    pipeline.load_episodes(tmp_path, SHAPE_META)
  with pytest.raises(FileNotFoundError, match='missing.hdf5'):
    build_rlds_dataset(tmp_path / 'missing.hdf5', tmp_path / 'tfds', SHAPE_META)
  wrong = ShapeMeta(obs=(ObsSpec('agentview_image', 'rgb', (32, 32, 3)),), action_dim=7)
  with pytest.raises(ValueError, match="'agentview_image' has shape \\(16, 16, 3\\)"):
    pipeline.load_episodes(dataset[2], wrong)
  # An episode store in memory is held to shape_meta too: crops are cut by its sizes.
  with pytest.raises(ValueError, match="episode store: observation 'agentview_image' has shape "
                     "\\(16, 16, 3\\), shape_meta expects \\(32, 32, 3\\)"):
    pipeline.make_dataset(store, wrong, **_kwargs())


@pytest.mark.parametrize('damage', [
    lambda record: os.truncate(record, os.path.getsize(record) // 2), os.remove])
def test_a_damaged_record_names_the_dataset_and_the_fix(dataset, tmp_path, damage):
  copy = tmp_path / 'tfds'
  shutil.copytree(dataset[2].data_dir, copy)
  damage(max((p for p in copy.iterdir() if '.tfrecord' in p.name), key=os.path.getsize))
  with pytest.raises(ValueError, match=rf'TFDS dataset {copy}: a record is missing, corrupt or '
                     r'truncated \(.+\); delete that folder and the next run rebuilds it'):
    pipeline.load_episodes(copy, SHAPE_META)


def _config(data_dir, image_size, **data):
  config = lift.get_config('smoke')
  config.task.shape_meta.obs = tuple(
      (key, kind, (image_size, image_size, 3) if kind == 'rgb' else shape)
      for key, kind, shape in config.task.shape_meta.obs)
  config.data.data_dir = str(data_dir)
  config.data.image_size = image_size
  for name, value in data.items():
    setattr(config.data, name, value)
  return config


def test_prepare_dataset_is_cached(tmp_path):
  config = _config(tmp_path, SIZE, num_demos=len(LENGTHS), val_ratio=0.25, batch_size=4)
  write_synthetic(prepare.demo_path(config), LENGTHS)  # Present: nothing is generated.
  logs = []
  first = prepare.prepare_dataset(config, log=logs.append)
  assert first.generation_stats is None and first.episode_lengths == LENGTHS
  assert first.summary['train']['windows'] + first.summary['val']['windows'] == 64
  assert any('fit normaliser' in line for line in logs)
  files = {p: os.stat(p).st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()}
  logs.clear()
  second = prepare.prepare_dataset(config, log=logs.append)
  assert not any('fit normaliser' in line or 'Generating' in line for line in logs)
  assert {p: os.stat(p).st_mtime_ns for p in tmp_path.rglob('*') if p.is_file()} == files
  assert second.normalizer.to_json() == first.normalizer.to_json()
  assert second.summary == first.summary and second.tfds_dir == first.tfds_dir


def test_an_unreadable_cached_normaliser_is_fitted_again(tmp_path):
  config = _config(tmp_path, SIZE, num_demos=len(LENGTHS), val_ratio=0.25, batch_size=4)
  write_synthetic(prepare.demo_path(config), LENGTHS)
  first = prepare.prepare_dataset(config, log=lambda line: None)
  with open(first.normalizer_path, 'r+', encoding='utf-8') as f:
    f.truncate(40)
  logs = []
  second = prepare.prepare_dataset(config, log=logs.append)
  assert any(line.startswith('Cached normaliser unreadable, fitting it again: '
                             f'{first.normalizer_path}') for line in logs)
  assert second.normalizer.to_json() == first.normalizer.to_json()
  assert Normalizer.load(first.normalizer_path, SHAPE_META).to_json() == first.normalizer.to_json()


def test_a_dataset_of_ones_own_with_a_filter_key(tmp_path):
  own = tmp_path / 'mine' / 'low_dim_image.hdf5'
  own.parent.mkdir()
  write_synthetic(own, LENGTHS)
  with h5py.File(own, 'a') as f:
    f['mask/long'] = np.array(['demo_2', 'demo_5', 'demo_7', 'demo_4'], dtype='S')
  config = _config(tmp_path / 'data', SIZE, dataset_path=str(own), filter_key='long',
                   val_ratio=0.0, batch_size=4)
  logs = []
  prepared = prepare.prepare_dataset(config, log=logs.append)
  assert not any('Generating' in line for line in logs)
  assert prepared.hdf5_path == str(own) and prepared.generation_stats is None
  assert prepared.demo_names == ('demo_2', 'demo_4', 'demo_5', 'demo_7')
  assert prepared.episode_lengths == (12, 9, 20, 15)
  assert not list((tmp_path / 'data').glob('*.hdf5'))
  # Another filter key is another conversion of the same file.
  config.data.filter_key = None
  everything = prepare.prepare_dataset(config, log=lambda line: None)
  assert everything.episode_lengths == LENGTHS
  assert everything.dataset_digest != prepared.dataset_digest
  assert everything.tfds_dir != prepared.tfds_dir


def test_a_demo_file_of_other_settings_under_the_generated_name_is_refused(tmp_path):
  config = _config(tmp_path, SIZE, num_demos=5)
  write_synthetic(prepare.demo_path(config), LENGTHS)
  with pytest.raises(ValueError, match=re.escape(prepare.demo_path(config)) +
                     r' holds 8 demos, config\.data\.num_demos=5: it is not the scripted '
                     r"expert's file for these settings"):
    prepare.prepare_dataset(config, log=lambda line: None)


def test_what_killed_runs_left_is_removed(tmp_path):
  config = _config(tmp_path, SIZE, num_demos=len(LENGTHS), val_ratio=0.25, batch_size=4)
  hdf5 = prepare.demo_path(config)
  write_synthetic(hdf5, LENGTHS)
  leftovers = [tmp_path / f'.{os.path.basename(hdf5)}.k1ll3d.tmp',
               tmp_path / 'stats' / '.demos.episodes.json.x7y.tmp',
               tmp_path / 'tfds' / 'robomimic_rlds' / 'lift_abc' / 'incomplete.QKFJDX_1.0.0']
  leftovers[0].write_bytes(b'half a file')
  leftovers[1].parent.mkdir()
  leftovers[1].write_text('{"demo')
  leftovers[2].mkdir(parents=True)
  (leftovers[2] / 'robomimic_rlds-train.tfrecord-00000-of-00001').write_bytes(b'partial')
  logs = []
  prepare.prepare_dataset(config, log=logs.append)
  assert not any(path.exists() for path in leftovers)
  assert sum(line.startswith('Removing ') for line in logs) == 3


def test_processes_preparing_the_same_data_dir_take_turns(tmp_path):
  config = _config(tmp_path, SIZE, num_demos=len(LENGTHS), val_ratio=0.25, batch_size=4)
  write_synthetic(prepare.demo_path(config), LENGTHS)
  logs, prepared = [], []
  with open(tmp_path / prepare.LOCK_FILE, 'a', encoding='utf-8') as other_process:
    fcntl.flock(other_process, fcntl.LOCK_EX)
    waiting = threading.Thread(
        target=lambda: prepared.append(prepare.prepare_dataset(config, log=logs.append)))
    waiting.start()
    deadline = time.time() + 60
    while not logs and time.time() < deadline:
      time.sleep(0.05)
    assert logs == [f'Waiting for another process preparing data in {tmp_path}']
    assert not (tmp_path / 'tfds').exists()
    fcntl.flock(other_process, fcntl.LOCK_UN)
  waiting.join(timeout=120)
  assert prepared[0].episode_lengths == LENGTHS


def test_real_robosuite_demos_round_trip_upright(tmp_path):
  size = 32
  config = _config(tmp_path, size, num_demos=2, num_gen_workers=1, val_ratio=0.5)
  meta = ShapeMeta.from_config(config.task.shape_meta)
  # Generates 2 demos with robosuite (in a fresh interpreter), converts, fits.
  prepared = prepare.prepare_dataset(config, log=lambda line: None)
  assert prepared.generation_stats['successes'] == 2
  store = pipeline.load_episodes(prepared.builder, meta)
  source = list(RobomimicFile(prepared.hdf5_path).iter_episodes(meta))
  for i, episode in enumerate(source):
    for key in meta.keys:
      np.testing.assert_array_equal(store.episode(i)[key], episode.obs[key])
  # Upright agentview: the robot and the back wall (darker) above, the bright table below.
  for episode in source:
    first = episode.obs['agentview_image'][0].astype(float)
    assert first[:size // 4].mean() + 20 < first[-size // 4:].mean()
  # The pipeline's uncropped val frames are the source frames of the window's steps.
  batches = pipeline.make_dataset(store, meta, **_kwargs(split='val', val_ratio=0.5,
                                                         crop_shape=None, batch_size=4))
  _, val_idx = windows.split_episodes(2, 0.5, 42)
  val_episode = source[int(val_idx[0])]
  rows = windows.window_indices(val_episode.length, HORIZON, TO - 1, N_ACTION - 1)
  batch = next(batches)
  for b in range(4):  # Validation windows come in one fixed permutation: find each by actions.
    window = [r for r in rows if np.array_equal(batch['action'][b], val_episode.actions[r])]
    assert window, f'batch row {b} is no window of the val episode'
    np.testing.assert_array_equal(batch['obs']['agentview_image'][b],
                                  val_episode.obs['agentview_image'][window[0][:TO]])
