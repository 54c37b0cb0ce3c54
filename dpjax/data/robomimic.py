"""Reads robomimic-format hdf5 demonstration files (SPEC §1) into validated numpy episodes.

Layout: `data` group (attrs `total`, `env_args` JSON) holding `demo_<i>` groups, each with
`actions (L, Da)`, `rewards (L,)`, `dones (L,)`, `obs/<key> (L, ...)` and optionally `states`,
`next_obs`; `mask/<filter_key>` holds arrays of demo names as bytes. Real robomimic files carry
more observation keys than a policy uses: only the keys of the given shape_meta are read.

The file is only ever opened read-only, so reading can never modify the source.
"""

import dataclasses
import json
import os
import re
from collections.abc import Iterator, Sequence
from typing import Any

import h5py
import numpy as np

from dpjax.data.shape_meta import ShapeMeta
from dpjax.errors import InputError

# Recorded actions may overshoot the controller's [-1, 1] range by float round-off.
ACTION_RANGE_TOLERANCE = 1e-3

_DEMO_NAME = re.compile(r'^(.*?)(\d+)$')


class RobomimicFormatError(InputError):
  """The file is not a readable robomimic dataset, or its contents break the contract."""


@dataclasses.dataclass(frozen=True)
class Episode:
  """One demonstration.

  Attributes:
    name: demo group name, e.g. 'demo_3'.
    obs: key -> (L, ...) array; images (L, H, W, 3) uint8, low-dim (L, D) float32.
    actions: (L, Da) float32 in [-1, 1].
    rewards: (L,) float32.
    dones: (L,) bool.
  """
  name: str
  obs: dict[str, np.ndarray]
  actions: np.ndarray
  rewards: np.ndarray
  dones: np.ndarray

  @property
  def length(self) -> int:
    return int(self.actions.shape[0])


def _demo_sort_key(name: str) -> tuple[str, int, str]:
  """Numeric order: 'demo_2' before 'demo_10'."""
  match = _DEMO_NAME.match(name)
  if match is None:
    return (name, -1, name)
  return (match.group(1), int(match.group(2)), name)


def _attr_str(value: Any) -> str:
  if isinstance(value, bytes):
    return value.decode('utf-8')
  if isinstance(value, np.ndarray) and value.shape == ():
    return _attr_str(value.item())
  return str(value)


def _read_array(group: h5py.Group, key: str, where: str) -> np.ndarray:
  """`group[key]` read whole; a group in its place, or a damaged dataset (a compressed chunk
  that does not decompress), is a RobomimicFormatError naming it."""
  node = group[key]
  if not isinstance(node, h5py.Dataset):
    raise RobomimicFormatError(f'{where}: {key!r} is a group, expected an array')
  try:
    return node[()]
  except OSError as e:
    raise RobomimicFormatError(f'{where}: {key!r} cannot be read, the file is damaged '
                               f'({e})') from e


class RobomimicFile:
  """A robomimic hdf5 file, opened read-only for each operation (no handle is held)."""

  def __init__(self, path: str | os.PathLike[str]):
    self.path = os.fspath(path)
    if not os.path.exists(self.path):
      raise FileNotFoundError(f'robomimic dataset {self.path} does not exist')
    if not os.path.isfile(self.path):
      raise RobomimicFormatError(f'robomimic dataset {self.path} is not a file')
    with self._open() as f:
      data = self._data_group(f)
      if not any(isinstance(v, h5py.Group) for v in data.values()):
        raise RobomimicFormatError(f'{self.path}: the "data" group contains no demos')

  def _open(self) -> h5py.File:
    try:
      return h5py.File(self.path, 'r')
    except OSError as e:
      size = os.path.getsize(self.path)
      raise RobomimicFormatError(
          f'{self.path}: not a readable hdf5 file ({size} bytes): {e}') from e

  def _data_group(self, f: h5py.File) -> h5py.Group:
    data = f.get('data')
    if not isinstance(data, h5py.Group):
      raise RobomimicFormatError(
          f'{self.path}: no "data" group (top-level keys: {sorted(f.keys())}); '
          'expected a robomimic dataset')
    return data

  def demo_names(self, filter_key: str | None = None) -> list[str]:
    """Demo names in numeric order, restricted to `mask/<filter_key>` when given."""
    with self._open() as f:
      data = self._data_group(f)
      names = [k for k, v in data.items() if isinstance(v, h5py.Group)]
      if filter_key is None:
        return sorted(names, key=_demo_sort_key)
      mask = f.get('mask')
      available = sorted(mask.keys()) if isinstance(mask, h5py.Group) else []
      if filter_key not in available:
        raise RobomimicFormatError(
            f'{self.path}: filter key {filter_key!r} not found under "mask" '
            f'(available: {available})')
      selected = [_attr_str(n) for n in
                  np.asarray(_read_array(mask, filter_key, self.path)).reshape(-1)]
      unknown = sorted(set(selected) - set(names), key=_demo_sort_key)
      if unknown:
        raise RobomimicFormatError(
            f'{self.path}: mask/{filter_key} names demos that do not exist: {unknown}')
      return sorted(set(selected), key=_demo_sort_key)

  def filter_keys(self) -> list[str]:
    """Names of the `mask/<key>` subsets, e.g. ['train', 'valid']."""
    with self._open() as f:
      mask = f.get('mask')
      return sorted(mask.keys()) if isinstance(mask, h5py.Group) else []

  def env_args(self) -> dict[str, Any]:
    """The `data.attrs['env_args']` JSON (env_name, type, env_kwargs) as a dict."""
    with self._open() as f:
      data = self._data_group(f)
      if 'env_args' not in data.attrs:
        raise RobomimicFormatError(f'{self.path}: data has no "env_args" attribute')
      raw = _attr_str(data.attrs['env_args'])
    try:
      return json.loads(raw)
    except json.JSONDecodeError as e:
      raise RobomimicFormatError(f'{self.path}: data.attrs["env_args"] is not JSON: {e}') from e

  def read_episode(self, name: str, shape_meta: ShapeMeta,
                   obs_keys: Sequence[str] | None = None) -> Episode:
    """Reads and validates demo `name`; `obs_keys` (default: all of shape_meta) picks keys."""
    with self._open() as f:
      return self._read(self._data_group(f), name, shape_meta, obs_keys)

  def iter_episodes(self, shape_meta: ShapeMeta,
                    filter_key: str | None = None) -> Iterator[Episode]:
    """Yields every (filtered) episode in numeric demo order, all shape_meta keys."""
    names = self.demo_names(filter_key)
    with self._open() as f:
      data = self._data_group(f)
      for name in names:
        yield self._read(data, name, shape_meta, None)

  def _read(self, data: h5py.Group, name: str, shape_meta: ShapeMeta,
            obs_keys: Sequence[str] | None) -> Episode:
    where = f'{self.path}: demo {name!r}'
    demo = data.get(name)
    if not isinstance(demo, h5py.Group):
      raise RobomimicFormatError(f'{self.path}: no demo named {name!r} in "data"')
    for required in ('actions', 'rewards', 'dones', 'obs'):
      if required not in demo:
        raise RobomimicFormatError(f'{where} has no {required!r} (keys: {sorted(demo.keys())})')
    if not isinstance(demo['obs'], h5py.Group):
      raise RobomimicFormatError(f'{where}: "obs" is an array, expected a group of observation '
                                 'arrays')

    actions = self._read_actions(demo, where, shape_meta.action_dim)
    length = actions.shape[0]
    rewards = self._read_per_step(demo, 'rewards', where, length).astype(np.float32)
    dones = self._read_per_step(demo, 'dones', where, length).astype(bool)
    if 'num_samples' in demo.attrs and int(demo.attrs['num_samples']) != length:
      raise RobomimicFormatError(
          f'{where}: attr num_samples={int(demo.attrs["num_samples"])} but actions have '
          f'{length} steps')

    keys = shape_meta.keys if obs_keys is None else tuple(obs_keys)
    obs = {}
    for key in keys:
      spec = shape_meta.spec(key)
      if key not in demo['obs']:
        raise RobomimicFormatError(
            f'{where}: missing obs key {key!r} (present: {sorted(demo["obs"].keys())})')
      array = _read_array(demo['obs'], key, f'{where} obs')
      obs[key] = self._check_obs(array, spec.kind, spec.shape, f'{where} obs {key!r}', length)
    return Episode(name=name, obs=obs, actions=actions, rewards=rewards, dones=dones)

  def _read_actions(self, demo: h5py.Group, where: str, action_dim: int) -> np.ndarray:
    actions = _read_array(demo, 'actions', where)
    if actions.ndim != 2 or actions.shape[1] != action_dim:
      raise RobomimicFormatError(
          f'{where}: actions have shape {actions.shape}, expected (L, {action_dim})')
    if actions.shape[0] == 0:
      raise RobomimicFormatError(f'{where} is empty (0 steps)')
    if not np.issubdtype(actions.dtype, np.number):
      raise RobomimicFormatError(f'{where}: actions have dtype {actions.dtype}, expected float')
    actions = actions.astype(np.float32)
    bad = ~np.isfinite(actions)
    if bad.any():
      step, dim = np.argwhere(bad)[0]
      raise RobomimicFormatError(
          f'{where}: actions contain non-finite values (first at step {step}, dim {dim}: '
          f'{actions[step, dim]})')
    worst = float(np.abs(actions).max())
    if worst > 1.0 + ACTION_RANGE_TOLERANCE:
      step, dim = np.unravel_index(np.abs(actions).argmax(), actions.shape)
      raise RobomimicFormatError(
          f'{where}: actions outside [-1, 1] (step {step}, dim {dim}: {actions[step, dim]}); '
          'expected normalised delta OSC_POSE actions')
    return actions

  def _read_per_step(self, demo: h5py.Group, key: str, where: str, length: int) -> np.ndarray:
    array = _read_array(demo, key, where)
    if array.shape not in ((length,), (length, 1)):
      raise RobomimicFormatError(
          f'{where}: {key!r} has shape {array.shape}, expected ({length},) like the actions')
    return array.reshape(length)

  def _check_obs(self, array: np.ndarray, kind: str, shape: tuple[int, ...], where: str,
                 length: int) -> np.ndarray:
    if array.shape[:1] != (length,):
      raise RobomimicFormatError(
          f'{where} has {array.shape[0] if array.ndim else 0} steps but actions have {length}')
    if array.shape[1:] != shape:
      layout = ' (uint8 HWC)' if kind == 'rgb' else ''
      raise RobomimicFormatError(
          f'{where} has per-step shape {array.shape[1:]}, expected {shape}{layout}')
    if kind == 'rgb':
      if array.dtype != np.uint8:
        raise RobomimicFormatError(f'{where} has dtype {array.dtype}, expected uint8 images')
      return array
    if not np.issubdtype(array.dtype, np.number):
      raise RobomimicFormatError(f'{where} has dtype {array.dtype}, expected a number type')
    array = array.astype(np.float32)
    if not np.isfinite(array).all():
      step = int(np.argwhere(~np.isfinite(array))[0][0])
      raise RobomimicFormatError(f'{where} contains non-finite values (first at step {step})')
    return array
