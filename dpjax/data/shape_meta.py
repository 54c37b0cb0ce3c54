"""Which observations a policy sees, in which order, with which shapes (SPEC §1, §4)."""

import dataclasses

OBS_KINDS = ('rgb', 'low_dim')


@dataclasses.dataclass(frozen=True)
class ObsSpec:
  key: str
  kind: str  # 'rgb' (H, W, 3) uint8, or 'low_dim' (D,) float.
  shape: tuple[int, ...]


@dataclasses.dataclass(frozen=True)
class ShapeMeta:
  """Observation specs in encoder-concatenation order, and the action dimension."""
  obs: tuple[ObsSpec, ...]
  action_dim: int

  @classmethod
  def from_config(cls, shape_meta) -> 'ShapeMeta':
    """Builds from `config.task.shape_meta`: `obs` is a sequence of (key, kind, shape)."""
    specs = []
    for entry in shape_meta.obs:
      if len(entry) != 3:
        raise ValueError(f'shape_meta.obs entry {entry!r}: expected (key, kind, shape)')
      key, kind, shape = entry
      if kind not in OBS_KINDS:
        raise ValueError(f'shape_meta.obs[{key!r}]: kind {kind!r} is not one of {OBS_KINDS}')
      shape = tuple(int(s) for s in shape)
      if kind == 'rgb' and (len(shape) != 3 or shape[2] != 3):
        raise ValueError(f'shape_meta.obs[{key!r}]: rgb shape must be (H, W, 3), got {shape}')
      if kind == 'low_dim' and len(shape) != 1:
        raise ValueError(f'shape_meta.obs[{key!r}]: low_dim shape must be (D,), got {shape}')
      specs.append(ObsSpec(key, kind, shape))
    keys = [s.key for s in specs]
    if len(set(keys)) != len(keys):
      raise ValueError(f'shape_meta.obs has duplicate keys: {keys}')
    return cls(obs=tuple(specs), action_dim=int(shape_meta.action_dim))

  @property
  def keys(self) -> tuple[str, ...]:
    return tuple(s.key for s in self.obs)

  @property
  def rgb_keys(self) -> tuple[str, ...]:
    return tuple(s.key for s in self.obs if s.kind == 'rgb')

  @property
  def low_dim_keys(self) -> tuple[str, ...]:
    return tuple(s.key for s in self.obs if s.kind == 'low_dim')

  def spec(self, key: str) -> ObsSpec:
    for s in self.obs:
      if s.key == key:
        return s
    raise KeyError(f'{key!r} is not an observation key of this shape_meta: {self.keys}')
