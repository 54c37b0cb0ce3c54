"""Per-key affine maps into [-1, 1] (SPEC §3), fitted on train episodes, applied in-graph.

Every key maps as y = x * scale + offset, with `scale` / `offset` per last-axis channel:

* images (rgb keys): uint8 [0, 255] -> [-1, 1]: scale 2/255, offset -1 (no ImageNet statistics);
* low-dim keys ending in `quat`: identity;
* other low-dim keys (`*pos`, `*qpos`, ...): limits, scale = 2 / (max - min),
  offset = -1 - scale * min; a dimension whose range is below 1e-4 gets scale 1 and offset
  -min, so it maps to 0;
* 'action' (OSC_POSE deltas, already in [-1, 1]): identity.

`Normalizer` is a pytree (arrays are leaves, the key -> mode table is static), so it can be
closed over or passed into jitted functions; `normalize` / `unnormalize` broadcast over any
leading dimensions. Statistics are stored as JSON beside every checkpoint.
"""

import json
import os
from collections.abc import Iterable, Mapping
from typing import Any

import jax.numpy as jnp
import numpy as np
from flax import struct

from dpjax.atomic_write import write_text_atomic
from dpjax.data.shape_meta import ShapeMeta

ACTION_KEY = 'action'
MODES = ('limits', 'identity', 'image')
RANGE_EPS = 1e-4
JSON_FORMAT = 'dpjax.normalizer'
JSON_VERSION = 1


def _mode_for(key: str, kind: str) -> str:
  if kind == 'rgb':
    return 'image'
  if key.endswith('quat'):
    return 'identity'
  return 'limits'


def _limits(values: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """scale, offset mapping per-dimension [min, max] of `values` (N, D) onto [-1, 1]."""
  lo = values.min(axis=0).astype(np.float64)
  hi = values.max(axis=0).astype(np.float64)
  flat = (hi - lo) < RANGE_EPS
  scale = np.where(flat, 1.0, 2.0 / np.where(flat, 1.0, hi - lo))
  offset = np.where(flat, -lo, -1.0 - scale * lo)
  return scale.astype(np.float32), offset.astype(np.float32)


def _collect(data: Any, keys: Iterable[str]) -> dict[str, np.ndarray]:
  """Concatenates (N, D) arrays per key from a mapping or from episodes (`.obs`, `.actions`)."""
  keys = list(keys)
  if isinstance(data, Mapping):
    missing = [k for k in keys if k not in data]
    if missing:
      raise KeyError(f'Normalizer.fit: data has no arrays for keys {missing} '
                     f'(present: {sorted(data.keys())})')
    return {k: np.asarray(data[k]) for k in keys}
  parts: dict[str, list[np.ndarray]] = {k: [] for k in keys}
  for episode in data:
    for k in keys:
      parts[k].append(np.asarray(episode.actions if k == ACTION_KEY else episode.obs[k]))
  if not parts[keys[0]]:
    raise ValueError('Normalizer.fit: no episodes to fit statistics on')
  return {k: np.concatenate(v, axis=0) for k, v in parts.items()}


@struct.dataclass
class Normalizer:
  """Affine per-key normalisation; `scale[key]` and `offset[key]` have shape (C,)."""
  scale: dict[str, np.ndarray]
  offset: dict[str, np.ndarray]
  modes: tuple[tuple[str, str], ...] = struct.field(pytree_node=False)

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(k for k, _ in self.modes)

  def mode(self, key: str) -> str:
    return dict(self.modes)[self._check_key(key)]

  @classmethod
  def fit(cls, data: Any, shape_meta: ShapeMeta) -> 'Normalizer':
    """Fits on training data.

    Args:
      data: either a mapping key -> (N, D) array for every low-dim key (images need no
        statistics and may be absent), or an iterable of episodes with `.obs[key]` (L, ...) and
        `.actions` (L, Da).
      shape_meta: the observation keys and action dim; the result covers every obs key plus
        'action'.
    """
    modes = [(s.key, _mode_for(s.key, s.kind)) for s in shape_meta.obs]
    modes.append((ACTION_KEY, 'identity'))
    limits_keys = [k for k, m in modes if m == 'limits']
    values = _collect(data, limits_keys) if limits_keys else {}
    scale, offset = {}, {}
    for key, mode in modes:
      if key == ACTION_KEY:
        channels = shape_meta.action_dim
      else:
        channels = shape_meta.spec(key).shape[-1]
      if mode == 'limits':
        array = values[key]
        if array.ndim != 2 or array.shape[1] != channels or array.shape[0] == 0:
          raise ValueError(f'Normalizer.fit: {key!r} values have shape {array.shape}, '
                           f'expected (N > 0, {channels})')
        if not np.isfinite(array).all():
          raise ValueError(f'Normalizer.fit: {key!r} values contain non-finite numbers')
        scale[key], offset[key] = _limits(array)
      elif mode == 'image':
        scale[key] = np.full((channels,), 2.0 / 255.0, np.float32)
        offset[key] = np.full((channels,), -1.0, np.float32)
      else:
        scale[key] = np.ones((channels,), np.float32)
        offset[key] = np.zeros((channels,), np.float32)
    return cls(scale=scale, offset=offset, modes=tuple(modes))

  def _check_key(self, key: str) -> str:
    if key not in self.scale:
      raise KeyError(f'Normalizer has no statistics for {key!r}; it covers {self.keys}')
    return key

  def _params(self, key: str, x: Any):
    scale = self.scale[self._check_key(key)]
    offset = self.offset[key]
    x = jnp.asarray(x)
    if x.ndim < 1 or x.shape[-1] != scale.shape[-1]:
      raise ValueError(f'Normalizer[{key!r}]: input shape {x.shape} must end in '
                       f'{scale.shape[-1]} channels')
    return x.astype(jnp.float32), jnp.asarray(scale), jnp.asarray(offset)

  def normalize(self, key: str, x: Any) -> jnp.ndarray:
    """(..., C) raw values (uint8 images or floats) -> (..., C) float32 in about [-1, 1]."""
    x, scale, offset = self._params(key, x)
    return x * scale + offset

  def unnormalize(self, key: str, x: Any) -> jnp.ndarray:
    """Inverse of `normalize`: (..., C) float32 model space -> raw units."""
    x, scale, offset = self._params(key, x)
    return (x - offset) / scale

  def to_json(self) -> str:
    entries = {
        key: {
            'mode': mode,
            'scale': [float(v) for v in np.asarray(self.scale[key]).reshape(-1)],
            'offset': [float(v) for v in np.asarray(self.offset[key]).reshape(-1)],
        } for key, mode in self.modes
    }
    return json.dumps({'format': JSON_FORMAT, 'version': JSON_VERSION, 'keys': entries},
                      indent=1)

  @classmethod
  def from_json(cls, text: str, shape_meta: ShapeMeta | None = None,
                source: str = '<string>') -> 'Normalizer':
    """Parses `to_json` output; with `shape_meta`, checks every obs key and 'action' exist
    with the right number of channels."""
    try:
      doc = json.loads(text)
    except json.JSONDecodeError as e:
      raise ValueError(f'{source}: normaliser statistics are not valid JSON: {e}') from e
    if (not isinstance(doc, dict) or doc.get('format') != JSON_FORMAT
        or not isinstance(doc.get('keys'), dict)):
      raise ValueError(f'{source}: not a dpjax normaliser file (expected an object with '
                       f'"format": "{JSON_FORMAT}" and "keys")')
    if doc.get('version') != JSON_VERSION:
      raise ValueError(f'{source}: normaliser format version {doc.get("version")!r}, '
                       f'this code reads version {JSON_VERSION}')
    scale, offset, modes = {}, {}, []
    for key, entry in doc['keys'].items():
      where = f'{source}: key {key!r}'
      if not isinstance(entry, dict) or entry.get('mode') not in MODES:
        raise ValueError(f'{where}: expected {{"mode": one of {MODES}, "scale", "offset"}}, '
                         f'got {entry!r}')
      try:
        s = np.asarray(entry['scale'], np.float32)
        o = np.asarray(entry['offset'], np.float32)
      except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f'{where}: "scale" and "offset" must be lists of numbers ({e})') from e
      if s.ndim != 1 or s.shape != o.shape or s.size == 0:
        raise ValueError(f'{where}: scale {s.shape} and offset {o.shape} must be equal, '
                         'non-empty 1-D lists')
      if not (np.isfinite(s).all() and np.isfinite(o).all()) or (s == 0).any():
        raise ValueError(f'{where}: scale must be finite and non-zero, offset finite')
      scale[key], offset[key] = s, o
      modes.append((key, entry['mode']))
    normalizer = cls(scale=scale, offset=offset, modes=tuple(modes))
    if shape_meta is not None:
      normalizer.check_covers(shape_meta, source)
    return normalizer

  def check_covers(self, shape_meta: ShapeMeta, source: str = 'normaliser') -> None:
    """Raises unless every obs key of `shape_meta` and 'action' has the right channel count."""
    expected = {s.key: s.shape[-1] for s in shape_meta.obs}
    expected[ACTION_KEY] = shape_meta.action_dim
    missing = [k for k in expected if k not in self.scale]
    if missing:
      raise ValueError(f'{source}: no statistics for keys {missing} (has {list(self.keys)})')
    for key, channels in expected.items():
      if self.scale[key].shape[-1] != channels:
        raise ValueError(f'{source}: key {key!r} has {self.scale[key].shape[-1]} channels, '
                         f'expected {channels}')
    modes = dict(self.modes)
    for key in shape_meta.rgb_keys:
      if modes[key] != 'image':
        raise ValueError(f'{source}: camera {key!r} has mode {modes[key]!r}, expected \'image\' '
                         '(uint8 [0, 255] to [-1, 1]); other modes would feed raw pixels')

  def save(self, path: str | os.PathLike[str]) -> None:
    """Writes JSON atomically (temp file + rename): a crash never leaves a partial file."""
    write_text_atomic(path, self.to_json())

  @classmethod
  def load(cls, path: str | os.PathLike[str],
           shape_meta: ShapeMeta | None = None) -> 'Normalizer':
    path = os.fspath(path)
    if not os.path.isfile(path):
      raise FileNotFoundError(f'normaliser statistics {path!r} do not exist')
    with open(path) as f:
      return cls.from_json(f.read(), shape_meta=shape_meta, source=path)

