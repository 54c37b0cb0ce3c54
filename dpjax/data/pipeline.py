"""tf.data pipeline: RLDS episodes -> shuffled, cropped training windows as numpy batches.

Design (for speed on a 2-core host that also runs the training step):

1. `load_episodes` reads the RLDS dataset once and keeps it in memory as flat per-step arrays
   (episodes in numeric demo order; images decoded to uint8 once). Every frame is an
   observation frame of some window, so decoding each PNG exactly once is the least decoding
   work possible; per-window decoding would redo it about To times per epoch.
2. A window is a row of a precomputed (n_windows, horizon) table of flat step indices with the
   reference edge padding (`dpjax.data.windows`). Each host takes its share of the row ids with
   numpy; tf.data only moves those ids through shuffle -> (repeat) -> batch -> enumerate, and
   one vectorised map per batch gathers the actions
   (B, horizon, Da) and only the first To observation frames (B, To, ...), then crops images
   (random per frame and camera in train, centre in val), all in a few TF ops per batch.
3. Randomness is a pure function of (seed, process index, batch number): the shuffle is
   seeded and crops use stateless RNG keyed by the batch counter, so the same seed gives the
   same batches regardless of thread scheduling.

Batches: {'obs': {rgb key: (B, To, ch, cw, 3) uint8, low-dim key: (B, To, D) float32},
'action': (B, horizon, Da) float32}. Nothing is normalised here (that happens in-graph).
"""

import dataclasses
import os
import re
import time
from collections.abc import Iterator, Sequence
from typing import Any

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from dpjax.data import windows
from dpjax.data.normalizer import ACTION_KEY, Normalizer
from dpjax.data.rlds_dataset import TFDS_SPLIT
from dpjax.data.shape_meta import ShapeMeta
from dpjax.errors import InputError

SPLITS = ('train', 'val')
_NATURAL = re.compile(r'^(.*?)(\d+)$')


def _natural_key(name: str) -> tuple[str, int, str]:
  match = _NATURAL.match(name)
  return (name, -1, name) if match is None else (match.group(1), int(match.group(2)), name)


@dataclasses.dataclass(frozen=True)
class EpisodeStore:
  """All episodes of a dataset in memory, as flat per-step arrays in numeric demo order.

  Attributes:
    names: (E,) demo names, e.g. ('demo_0', 'demo_1', ...).
    lengths: (E,) int64 episode lengths.
    offsets: (E,) int64 index of each episode's first step in the flat arrays.
    obs: key -> tf.Tensor (N, ...): images (N, H, W, 3) uint8, low-dim (N, D) float32.
    actions: tf.Tensor (N, Da) float32.
    shape_meta: the keys held.
  """
  names: tuple[str, ...]
  lengths: np.ndarray
  offsets: np.ndarray
  obs: dict[str, tf.Tensor]
  actions: tf.Tensor
  shape_meta: ShapeMeta

  @property
  def num_episodes(self) -> int:
    return len(self.names)

  @property
  def num_steps(self) -> int:
    return int(self.lengths.sum())

  def episode(self, index: int) -> dict[str, np.ndarray]:
    """Numpy copies of one episode: {key: (L, ...), 'action': (L, Da)} (for checks, tools)."""
    lo, hi = int(self.offsets[index]), int(self.offsets[index] + self.lengths[index])
    out = {k: v[lo:hi].numpy() for k, v in self.obs.items()}
    out[ACTION_KEY] = self.actions[lo:hi].numpy()
    return out

  def step_rows(self, episode_indices: Sequence[int]) -> np.ndarray:
    """Flat step indices of the given episodes, concatenated."""
    parts = [np.arange(self.offsets[e], self.offsets[e] + self.lengths[e])
             for e in episode_indices]
    return np.concatenate(parts) if parts else np.zeros((0,), np.int64)


def _as_builder(source: Any) -> tfds.core.DatasetBuilder:
  if isinstance(source, tfds.core.DatasetBuilder):
    return source
  if isinstance(source, (str, os.PathLike)):
    path = os.fspath(source)
    if not os.path.isfile(os.path.join(path, 'dataset_info.json')):
      raise FileNotFoundError(
          f'{path!r} is not a prepared TFDS dataset directory (no dataset_info.json); expected '
          'e.g. <data_dir>/robomimic_rlds/<config>/1.0.0 from build_rlds_dataset')
    return tfds.builder_from_directory(path)
  raise TypeError(f'expected a TFDS builder, a prepared dataset directory or an EpisodeStore, '
                  f'got {type(source).__name__}')


def _check_shapes(where: str, observation_shapes: dict[str, tuple[int, ...]],
                  action_shape: tuple[int, ...], shape_meta: ShapeMeta) -> None:
  """A source's per-step shapes must be shape_meta's: crops and batches are built from it."""
  for spec in shape_meta.obs:
    if spec.key not in observation_shapes:
      raise ValueError(f'{where}: no observation {spec.key!r} '
                       f'(has {sorted(observation_shapes)})')
    if observation_shapes[spec.key] != spec.shape:
      raise ValueError(f'{where}: observation {spec.key!r} has shape '
                       f'{observation_shapes[spec.key]}, shape_meta expects {spec.shape}')
  if action_shape != (shape_meta.action_dim,):
    raise ValueError(f'{where}: action shape {action_shape}, shape_meta expects '
                     f'({shape_meta.action_dim},)')


def _check_features(builder: tfds.core.DatasetBuilder, shape_meta: ShapeMeta) -> None:
  steps = builder.info.features['steps'].feature
  _check_shapes(f'TFDS dataset {builder.info.full_name} ({builder.data_dir})',
                {k: tuple(f.shape) for k, f in steps['observation'].items()},
                tuple(steps['action'].shape), shape_meta)


def load_episodes(source: Any, shape_meta: ShapeMeta) -> EpisodeStore:
  """Reads every episode of a prepared RLDS dataset (builder or directory) into memory.

  Keeps the shape_meta observation keys and the actions; images of other cameras are not
  decoded.
  """
  if isinstance(source, EpisodeStore):
    _check_shapes('episode store', {k: tuple(v.shape[1:]) for k, v in source.obs.items()},
                  tuple(source.actions.shape[1:]), shape_meta)
    return source
  builder = _as_builder(source)
  _check_features(builder, shape_meta)
  # TFDS partial decoding cannot select inside a `Dataset` feature; skipping the PNG decode of
  # unused cameras is what matters.
  observation = builder.info.features['steps'].feature['observation']
  unused_images = {k: tfds.decode.SkipDecoding() for k, f in observation.items()
                   if k not in shape_meta.keys and isinstance(f, tfds.features.Image)}
  ds = builder.as_dataset(split=TFDS_SPLIT, shuffle_files=False,
                          decoders={'steps': {'observation': unused_images}})
  # One element per episode with all its steps stacked: (L, ...) per key.
  ds = ds.map(lambda ep: (ep['episode_metadata']['demo_name'],
                          ep['steps'].batch(1 << 30).get_single_element()),
              num_parallel_calls=tf.data.AUTOTUNE)
  # Stay in TF (eager tensors): a numpy round trip would copy the images twice more.
  try:
    episodes = [(name.numpy().decode('utf-8'), steps) for name, steps in ds]
  except (tf.errors.DataLossError, tf.errors.InvalidArgumentError, tf.errors.NotFoundError) as e:
    raise InputError(f'TFDS dataset {builder.data_dir}: a record is missing, corrupt or truncated '
                     f'({e.message.splitlines()[0]}); delete that folder and the next run '
                     'rebuilds it from the demos') from e
  if not episodes:
    raise InputError(f'TFDS dataset {builder.data_dir} holds no episodes')
  episodes.sort(key=lambda e: _natural_key(e[0]))
  names = tuple(e[0] for e in episodes)
  if len(set(names)) != len(names):
    raise InputError(f'TFDS dataset {builder.data_dir} has duplicate demo names')
  lengths = np.array([int(e[1]['action'].shape[0]) for e in episodes], np.int64)
  offsets = np.concatenate([[0], np.cumsum(lengths)[:-1]]).astype(np.int64)
  # Concatenate key by key, dropping the per-episode tensors as we go (peak: one key twice).
  obs = {}
  for key in shape_meta.keys:
    obs[key] = tf.concat([e[1]['observation'].pop(key) for e in episodes], axis=0)
  actions = tf.concat([e[1]['action'] for e in episodes], axis=0)
  return EpisodeStore(names=names, lengths=lengths, offsets=offsets, obs=obs, actions=actions,
                      shape_meta=shape_meta)


def _split_episodes(num_episodes: int, split: str, val_ratio: float,
                    split_seed: int) -> np.ndarray:
  if split not in SPLITS:
    raise ValueError(f'split must be one of {SPLITS}, got {split!r}')
  train_idx, val_idx = windows.split_episodes(num_episodes, val_ratio, split_seed)
  return train_idx if split == 'train' else val_idx


def _pads(horizon: int, n_obs_steps: int, n_action_steps: int) -> tuple[int, int]:
  if not 1 <= n_obs_steps <= horizon:
    raise ValueError(f'n_obs_steps={n_obs_steps} must be in [1, horizon={horizon}]')
  if not 1 <= n_action_steps <= horizon:
    raise ValueError(f'n_action_steps={n_action_steps} must be in [1, horizon={horizon}]')
  return n_obs_steps - 1, n_action_steps - 1


def window_table(lengths: Sequence[int], offsets: Sequence[int], episode_indices: Sequence[int],
                 horizon: int, n_obs_steps: int, n_action_steps: int) -> np.ndarray:
  """(n_windows, horizon) int64 flat step indices of every window of the given episodes."""
  pad_before, pad_after = _pads(horizon, n_obs_steps, n_action_steps)
  parts = [offsets[e] + windows.window_indices(int(lengths[e]), horizon, pad_before, pad_after)
           for e in episode_indices]
  if not parts:
    return np.zeros((0, horizon), np.int64)
  return np.concatenate(parts).astype(np.int64)


def _num_windows(lengths: Sequence[int], episode_indices: Sequence[int], horizon: int,
                 n_obs_steps: int, n_action_steps: int) -> int:
  pad_before, pad_after = _pads(horizon, n_obs_steps, n_action_steps)
  return sum(windows.num_windows(int(lengths[e]), horizon, pad_before, pad_after)
             for e in episode_indices)


def steps_per_epoch(episode_lengths: Sequence[int], *, split: str, horizon: int,
                    n_obs_steps: int, n_action_steps: int, batch_size: int, val_ratio: float,
                    split_seed: int, process_count: int = 1) -> int:
  """Full per-host batches in one pass over the split's windows (floor; may be 0)."""
  lengths = np.asarray(episode_lengths)
  episodes = _split_episodes(len(lengths), split, val_ratio, split_seed)
  per_host = _num_windows(lengths, episodes, horizon, n_obs_steps, n_action_steps) // process_count
  return per_host // batch_size


def dataset_summary(episode_lengths: Sequence[int], *, horizon: int, n_obs_steps: int,
                    n_action_steps: int, val_ratio: float, split_seed: int,
                    batch_size: int | None = None, process_count: int = 1) -> dict[str, Any]:
  """Episodes, steps and windows per split (and batches per epoch when `batch_size` given)."""
  lengths = np.asarray(episode_lengths)
  summary = {}
  for split in SPLITS:
    episodes = _split_episodes(len(lengths), split, val_ratio, split_seed)
    entry = {
        'episodes': int(len(episodes)),
        'steps': int(lengths[episodes].sum()) if len(episodes) else 0,
        'windows': _num_windows(lengths, episodes, horizon, n_obs_steps, n_action_steps),
    }
    if batch_size is not None:
      entry['batches_per_epoch'] = entry['windows'] // process_count // batch_size
    summary[split] = entry
  return summary


def format_summary(summary: dict[str, Any]) -> str:
  """One line per split, for logs."""
  lines = []
  for split in SPLITS:
    entry = summary[split]
    line = (f'{split:>5}: {entry["episodes"]} episodes, {entry["steps"]} steps, '
            f'{entry["windows"]} windows')
    if 'batches_per_epoch' in entry:
      line += f', {entry["batches_per_epoch"]} batches/epoch'
    lines.append(line)
  return '\n'.join(lines)


def fit_normalizer(store: EpisodeStore, *, val_ratio: float, split_seed: int) -> Normalizer:
  """Normaliser statistics from the train episodes only (SPEC §3)."""
  train_idx = _split_episodes(store.num_episodes, 'train', val_ratio, split_seed)
  rows = store.step_rows(train_idx)
  data = {k: store.obs[k].numpy()[rows] for k in store.shape_meta.low_dim_keys}
  data[ACTION_KEY] = store.actions.numpy()[rows]
  return Normalizer.fit(data, store.shape_meta)


def _seeds(seed: int, process_index: int) -> tuple[int, int]:
  """Independent (shuffle, crop) seeds per (seed, host): hosts see different crops."""
  state = np.random.SeedSequence([int(seed), int(process_index)]).generate_state(2)
  return int(state[0] & 0x7FFFFFFF), int(state[1] & 0x7FFFFFFF)


def _crop_fn(image_shape: tuple[int, ...], crop_shape: tuple[int, int] | None, train: bool,
             crop_seed: int):
  """Returns f(frames (B, To, H, W, C), batch_number) -> (B, To, ch, cw, C)."""
  height, width = image_shape[0], image_shape[1]
  if crop_shape is None or tuple(crop_shape) == (height, width):
    return lambda frames, batch_number: frames
  ch, cw = (int(c) for c in crop_shape)
  if ch > height or cw > width:
    raise ValueError(f'crop_shape {tuple(crop_shape)} is larger than the images '
                     f'{(height, width)}')
  if not train:
    top, left = (height - ch) // 2, (width - cw) // 2
    return lambda frames, batch_number: frames[:, :, top:top + ch, left:left + cw]

  def random_crop(frames, batch_number):
    # Stateless: offsets depend only on (crop_seed, batch number), never on thread timing.
    # Each frame of each window gets its own offsets, in robomimic's CropRandomizer range
    # [0, H − ch) (its `(max * rand).long()`; 0 where nothing is cropped), as `crop_images`.
    seeds = tf.random.experimental.stateless_split(
        tf.stack([tf.constant(crop_seed, tf.int64), batch_number]), num=2)
    shape = tf.shape(frames)[:2]
    top = tf.random.stateless_uniform(shape, seeds[0], 0, max(height - ch, 1), dtype=tf.int32)
    left = tf.random.stateless_uniform(shape, seeds[1], 0, max(width - cw, 1), dtype=tf.int32)
    rows = top[..., None] + tf.range(ch, dtype=tf.int32)  # (B, To, ch)
    cols = left[..., None] + tf.range(cw, dtype=tf.int32)  # (B, To, cw)
    frames = tf.gather(frames, rows, axis=2, batch_dims=2)  # (B, To, ch, W, C)
    return tf.gather(frames, cols, axis=3, batch_dims=2)  # (B, To, ch, cw, C)

  return random_crop


def make_tf_dataset(source: Any, shape_meta: ShapeMeta, *, split: str, horizon: int,
                    n_obs_steps: int, n_action_steps: int, batch_size: int,
                    crop_shape: tuple[int, int] | None, seed: int, val_ratio: float,
                    split_seed: int, shuffle_buffer: int = 0, process_index: int | None = None,
                    process_count: int | None = None, repeat: bool = True) -> tf.data.Dataset:
  """The window pipeline as a `tf.data.Dataset` of batches (see `make_dataset`)."""
  process_index = jax.process_index() if process_index is None else process_index
  process_count = jax.process_count() if process_count is None else process_count
  if not 0 <= process_index < process_count:
    raise ValueError(f'process_index {process_index} is not in [0, {process_count})')
  if batch_size < 1:
    raise ValueError(f'batch_size must be >= 1, got {batch_size}')
  store = load_episodes(source, shape_meta)
  train = split == 'train'
  episodes = _split_episodes(store.num_episodes, split, val_ratio, split_seed)
  if len(episodes) == 0:
    raise ValueError(f'split {split!r} has no episodes ({store.num_episodes} episodes, '
                     f'val_ratio={val_ratio}): a single-episode dataset has no validation set')
  table = window_table(store.lengths, store.offsets, episodes, horizon, n_obs_steps,
                       n_action_steps)
  per_host = len(table) // process_count
  if per_host == 0 or (not repeat and per_host < batch_size):
    raise ValueError(f'split {split!r} has {len(table)} windows ({per_host} per host), too '
                     f'few for one batch of {batch_size}')
  shuffle_seed, crop_seed = _seeds(seed, process_index)
  # Interleaved host shards: each host sees windows from every episode, none twice.
  rows = np.arange(per_host * process_count, dtype=np.int64)[process_index::process_count]
  # Validation too, once: full batches leave out the last windows, which in order would always
  # be the tail of the last episode; permuted, they are a random few, the same every epoch.
  rows = np.random.default_rng(shuffle_seed).permutation(rows)

  table_t = tf.constant(table, tf.int32)
  obs_t = {k: store.obs[k] for k in shape_meta.keys}
  actions_t = store.actions
  crops = {k: _crop_fn(shape_meta.spec(k).shape, crop_shape, train, crop_seed + i)
           for i, k in enumerate(shape_meta.rgb_keys)}

  def fetch(batch_number, row_ids):
    steps = tf.gather(table_t, row_ids)  # (B, horizon) flat step indices
    obs_steps = steps[:, :n_obs_steps]  # (B, To): only these observation frames are read
    obs = {}
    for k in shape_meta.keys:
      frames = tf.gather(obs_t[k], obs_steps)
      obs[k] = crops[k](frames, batch_number) if k in crops else frames
    return {'obs': obs, 'action': tf.gather(actions_t, steps)}

  ds = tf.data.Dataset.from_tensor_slices(rows)
  if train:
    buffer = len(rows) if shuffle_buffer <= 0 else min(shuffle_buffer, len(rows))
    ds = ds.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=True)
  if repeat:
    ds = ds.repeat()
  ds = ds.batch(batch_size, drop_remainder=True).enumerate()
  ds = ds.map(fetch, num_parallel_calls=tf.data.AUTOTUNE, deterministic=True)
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  return ds.prefetch(tf.data.AUTOTUNE).with_options(options)


def make_dataset(source: Any, shape_meta: ShapeMeta, *, split: str, horizon: int,
                 n_obs_steps: int, n_action_steps: int, batch_size: int,
                 crop_shape: tuple[int, int] | None, seed: int, val_ratio: float,
                 split_seed: int, shuffle_buffer: int = 0, process_index: int | None = None,
                 process_count: int | None = None,
                 repeat: bool = True) -> Iterator[dict[str, Any]]:
  """Iterator of numpy batches of training windows.

  Args:
    source: an `EpisodeStore` (fastest: load once, share between splits), a TFDS builder
      from `build_rlds_dataset`, or a prepared dataset directory.
    shape_meta: observation keys to yield (a subset of the dataset's keys is fine).
    split: 'train' (shuffled every epoch, random crops) or 'val' (one fixed permutation,
      centre crops).
    horizon, n_obs_steps, n_action_steps: window length T, observation frames To, executed
      actions; pad_before = To - 1, pad_after = n_action_steps - 1 (SPEC §2).
    batch_size: per-host batch size B.
    crop_shape: (ch, cw) image crop, or None for full images.
    seed: shuffle and crop seed; the same seed yields the same batches.
    val_ratio, split_seed: the episode-level train/val split (SPEC §2).
    shuffle_buffer: window shuffle buffer; <= 0 shuffles the whole split (cheap: elements are
      window ids). Windows are also permuted once up front, so a partial buffer still mixes
      episodes.
    process_index, process_count: this host's shard (default: jax.process_index/count());
      hosts get disjoint windows and equally many.
    repeat: loop forever, or stop after one pass (the trainer reads one pass per epoch, each
      with its own seed).

  Yields:
    {'obs': {rgb key: (B, To, ch, cw, 3) uint8, low-dim key: (B, To, D) float32},
     'action': (B, horizon, Da) float32}.
  """
  return make_tf_dataset(
      source, shape_meta, split=split, horizon=horizon, n_obs_steps=n_obs_steps,
      n_action_steps=n_action_steps, batch_size=batch_size, crop_shape=crop_shape, seed=seed,
      val_ratio=val_ratio, split_seed=split_seed, shuffle_buffer=shuffle_buffer,
      process_index=process_index, process_count=process_count,
      repeat=repeat).as_numpy_iterator()


def pipeline_kwargs(config, split: str) -> dict[str, Any]:
  """`make_dataset` keyword arguments from `config.data` (and `config.seed`)."""
  data = config.data
  return dict(split=split, horizon=data.horizon, n_obs_steps=data.n_obs_steps,
              n_action_steps=data.n_action_steps, batch_size=data.batch_size,
              crop_shape=None if data.crop_shape is None else tuple(data.crop_shape),
              seed=config.seed, val_ratio=data.val_ratio, split_seed=data.split_seed,
              shuffle_buffer=data.shuffle_buffer)


def measure_throughput(source: Any, shape_meta: ShapeMeta, *, batch_size: int = 64,
                       num_batches: int = 100, warmup_batches: int = 10,
                       repeats: int = 3, **kwargs: Any) -> dict[str, Any]:
  """Train-mode batches per second pulled as numpy (median of `repeats` timed runs).

  `kwargs` are the remaining `make_dataset` arguments (horizon, crop_shape, ...); defaults
  follow the Lift config (10/2/8, crop 76x76).
  """
  store = load_episodes(source, shape_meta)
  settings = dict(split='train', horizon=10, n_obs_steps=2, n_action_steps=8,
                  crop_shape=(76, 76), seed=0, val_ratio=0.02, split_seed=42,
                  process_index=0, process_count=1)
  settings.update(kwargs)
  iterator = make_dataset(store, shape_meta, batch_size=batch_size, **settings)
  for _ in range(warmup_batches):
    next(iterator)
  rates, cpu_ms = [], []
  for _ in range(repeats):
    start, start_cpu = time.perf_counter(), time.process_time()
    for _ in range(num_batches):
      next(iterator)
    rates.append(num_batches / (time.perf_counter() - start))
    cpu_ms.append((time.process_time() - start_cpu) / num_batches * 1e3)
  rate = float(np.median(rates))
  # CPU time per batch (all threads) is what the pipeline takes from a training step sharing
  # the host; wall-clock rate alone hides it.
  return {'batches_per_s': rate, 'samples_per_s': rate * batch_size,
          'cpu_ms_per_batch': float(np.median(cpu_ms)), 'batch_size': batch_size,
          'num_batches': num_batches, 'repeats': repeats, 'episodes': store.num_episodes,
          'steps': store.num_steps}

