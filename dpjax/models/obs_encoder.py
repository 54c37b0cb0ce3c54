"""Observation encoder: robomimic `ObservationEncoder` with one ResNet-18 per camera (SPEC §4).

Per camera: crop (`CropRandomizer`: random in training, centre in evaluation) → ResNet-18
trunk (GroupNorm) → SpatialSoftmax keypoints → Linear(2K → feature_dim) → ReLU. Low-dim keys
pass through unchanged. Features are concatenated in shape_meta order: for Lift
64 + 64 + 3 + 4 + 2 = 137.

Layers that the reference builds with PyTorch defaults (the keypoint 1×1 conv and the
projection Linear) use PyTorch's default initialisation: weights and biases uniform in
±1/sqrt(fan_in).
"""

from typing import Any, Mapping, Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.data.shape_meta import ShapeMeta
from dpjax.models.resnet import ResNet18

# torch.nn.Linear / Conv2d default: kaiming_uniform(a=√5) ⇒ U(±1/sqrt(fan_in)).
torch_default_kernel_init = nn.initializers.variance_scaling(1.0 / 3.0, 'fan_in', 'uniform')


def torch_default_bias_init(fan_in: int):
  bound = 1.0 / np.sqrt(fan_in)
  return lambda key, shape, dtype=jnp.float32: jax.random.uniform(key, shape, dtype, -bound,
                                                                   bound)


def crop_images(images: jax.Array, crop_shape: tuple[int, int],
                rng: Optional[jax.Array] = None) -> jax.Array:
  """Crops (N, H, W, C) images to (N, ch, cw, C): random per image with `rng`, else centre.

  Matches robomimic's CropRandomizer: the random top-left corner is uniform in
  [0, H − ch) × [0, W − cw) (robomimic's `(max * rand).long()`), drawn independently for every
  image; the centre crop starts at ((H − ch) // 2, (W − cw) // 2). Images already of
  crop_shape are returned unchanged.
  """
  if images.ndim != 4:
    raise ValueError(f'crop_images: expected images (N, H, W, C), got shape {images.shape}')
  n, h, w, c = images.shape
  ch, cw = (int(s) for s in crop_shape)
  if (h, w) == (ch, cw):
    return images
  if h < ch or w < cw:
    raise ValueError(f'crop_images: images of {h}×{w} are smaller than crop_shape {ch}×{cw}')
  if rng is None:
    top, left = (h - ch) // 2, (w - cw) // 2
    return images[:, top:top + ch, left:left + cw, :]
  rng_top, rng_left = jax.random.split(rng)
  # max(…, 1): a dimension that is not cropped keeps offset 0, like robomimic's 0·rand.
  tops = jax.random.randint(rng_top, (n,), 0, max(h - ch, 1))
  lefts = jax.random.randint(rng_left, (n,), 0, max(w - cw, 1))
  crop_one = lambda image, top, left: jax.lax.dynamic_slice(image, (top, left, 0), (ch, cw, c))
  return jax.vmap(crop_one)(images, tops, lefts)


class SpatialSoftmax(nn.Module):
  """robomimic SpatialSoftmax: (N, H, W, C) → (N, 2K) expected keypoint coordinates.

  A 1×1 conv maps C channels to K keypoint maps; each map is softmaxed over its H·W pixels
  (temperature 1, fixed) and gives the expected x and y on linspace(−1, 1) grids (x along
  width, y along height). Output order is robomimic's flattened (K, 2): [x0, y0, x1, y1, …].
  Softmax and expectations run in float32.
  """
  num_keypoints: int = 32
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, features: jax.Array) -> jax.Array:
    n, h, w, c = features.shape
    if h < 2 or w < 2:
      raise ValueError(f'SpatialSoftmax: a {h}x{w} feature map gives keypoints that do not depend '
                       'on the image; ResNet-18 downsamples 32x, so crops need >= 33 pixels a side')
    k = self.num_keypoints
    logits = nn.Conv(k, (1, 1), dtype=self.dtype, kernel_init=torch_default_kernel_init,
                     bias_init=torch_default_bias_init(c), name='keypoints')(features)
    attention = jax.nn.softmax(logits.astype(jnp.float32).reshape(n, h * w, k), axis=1)
    # np.meshgrid(linspace_w, linspace_h) ('xy' indexing) flattened row-major over (h, w).
    pos_x, pos_y = np.meshgrid(np.linspace(-1.0, 1.0, w), np.linspace(-1.0, 1.0, h))
    pos_x = jnp.asarray(pos_x.reshape(1, h * w, 1), jnp.float32)
    pos_y = jnp.asarray(pos_y.reshape(1, h * w, 1), jnp.float32)
    expected_x = jnp.sum(attention * pos_x, axis=1)
    expected_y = jnp.sum(attention * pos_y, axis=1)
    return jnp.stack([expected_x, expected_y], axis=-1).reshape(n, 2 * k)


class ImageEncoder(nn.Module):
  """One camera: ResNet-18 trunk → SpatialSoftmax → Linear(2K → feature_dim) → ReLU."""
  resnet_width: int = 64
  num_keypoints: int = 32
  feature_dim: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    x = ResNet18(self.resnet_width, dtype=self.dtype, name='backbone')(images)
    x = SpatialSoftmax(self.num_keypoints, dtype=self.dtype, name='pool')(x)
    x = nn.Dense(self.feature_dim, dtype=self.dtype, kernel_init=torch_default_kernel_init,
                 bias_init=torch_default_bias_init(2 * self.num_keypoints), name='linear')(x)
    return nn.relu(x).astype(jnp.float32)


def output_dim(shape_meta: ShapeMeta, feature_dim: int) -> int:
  """D_obs: feature_dim per camera plus every low-dim size (137 for Lift)."""
  return sum(feature_dim if s.kind == 'rgb' else s.shape[0] for s in shape_meta.obs)


def stack_camera_params(encoder_params: Mapping[str, Any],
                        camera_keys: Sequence[str]) -> dict:
  """The cameras' ImageEncoder parameters (sub-trees of the ObservationEncoder's parameters)
  stacked on a new leading axis in `camera_keys` order, for `ObservationEncoder`'s
  `stacked_cameras`."""
  return jax.tree.map(lambda *leaves: jnp.stack(leaves), *[encoder_params[k] for k in camera_keys])


class ObservationEncoder(nn.Module):
  """Encodes a flat batch of observations: `{key: (N, ...)}` → (N, D_obs) float32.

  Images come in as floats in [−1, 1], (N, H, W, 3) with H, W ≥ crop_shape; they are cropped
  to crop_shape at random (rng stream 'crop') when `train`, at the centre otherwise.
  crop_shape None disables cropping. Parameters live under one sub-tree per camera key.

  `stacked_cameras` (the cameras' parameters from `stack_camera_params`, camera keys in
  shape_meta order) runs all cameras' encoders as one vmapped program instead: on a GPU each
  layer is then one grouped cuDNN convolution for all cameras, and a sampling call makes half
  the launches (docs/performance.md, session 23). Same results, for images of one shape.
  """
  shape_meta: ShapeMeta
  crop_shape: Optional[tuple[int, int]] = (76, 76)
  resnet_width: int = 64
  num_keypoints: int = 32
  feature_dim: int = 64
  group_norm: bool = True
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, obs: Mapping[str, jax.Array], train: bool,
               stacked_cameras: Optional[Any] = None) -> jax.Array:
    if not self.group_norm:
      raise ValueError(
          'ObservationEncoder: group_norm=False (BatchNorm) is not supported: BatchNorm running '
          'statistics do not mix with the EMA of parameters the policy relies on (SPEC §10; the '
          'reference replaces BatchNorm by GroupNorm for this reason). Set '
          'config.model.obs_encoder_group_norm = True.')
    n = self._check_obs(obs)
    images = {}
    for key in self.camera_keys:
      images[key] = obs[key]
      if self.crop_shape is not None:
        images[key] = crop_images(obs[key], self.crop_shape,
                                  self._crop_rng(key, obs[key], train))
    if stacked_cameras is None:
      image_features = {key: self._image_encoder(name=key)(x) for key, x in images.items()}
    else:
      image_features = self._stacked_image_features(images, stacked_cameras)
    features = [image_features[s.key] if s.kind == 'rgb' else obs[s.key]
                for s in self.shape_meta.obs]
    return jnp.concatenate([x.reshape(n, -1).astype(jnp.float32) for x in features], axis=-1)

  @property
  def camera_keys(self) -> tuple[str, ...]:
    return tuple(s.key for s in self.shape_meta.obs if s.kind == 'rgb')

  @property
  def stacks_cameras(self) -> bool:
    """Whether `stacked_cameras` can serve: several cameras whose images reach the encoders in
    one shape."""
    shapes = {s.shape for s in self.shape_meta.obs if s.kind == 'rgb'}
    return len(self.camera_keys) > 1 and (self.crop_shape is not None or len(shapes) == 1)

  def _image_encoder(self, **kwargs) -> ImageEncoder:
    return ImageEncoder(self.resnet_width, self.num_keypoints, self.feature_dim,
                        dtype=self.dtype, **kwargs)

  def _stacked_image_features(self, images: Mapping[str, jax.Array],
                              stacked_params: Any) -> dict[str, jax.Array]:
    shapes = {key: x.shape for key, x in images.items()}
    if len(set(shapes.values())) != 1:
      raise ValueError(f'ObservationEncoder: stacked_cameras needs images of one shape, got '
                       f'{shapes}')
    # Unbound (parent=None): applied to the stacked parameters, not a child with its own.
    encoder = self._image_encoder(parent=None)
    features = jax.vmap(lambda params, x: encoder.apply({'params': params}, x))(
        stacked_params, jnp.stack(list(images.values())))
    return dict(zip(images, features))

  def _crop_rng(self, key: str, images: jax.Array, train: bool) -> Optional[jax.Array]:
    if not train or tuple(images.shape[1:3]) == tuple(self.crop_shape):
      return None
    if not self.has_rng('crop'):
      raise ValueError(f'ObservationEncoder: obs[{key!r}] needs a random crop in training; '
                       "pass rngs={'crop': key} to apply()")
    return self.make_rng('crop')

  def _check_obs(self, obs: Mapping[str, jax.Array]) -> int:
    """Validates keys, ranks, sizes and dtypes; returns the common batch size N."""
    missing = [k for k in self.shape_meta.keys if k not in obs]
    if missing:
      raise ValueError(f'ObservationEncoder: obs lacks keys {missing}; got {sorted(obs)}')
    sizes = {k: obs[k].shape[:1] for k in self.shape_meta.keys}
    if len(set(sizes.values())) != 1 or () in sizes.values():
      raise ValueError(f'ObservationEncoder: obs keys disagree on the batch size N: {sizes}')
    for spec in self.shape_meta.obs:
      x = obs[spec.key]
      if spec.kind == 'rgb':
        min_hw = tuple(self.crop_shape) if self.crop_shape is not None else (1, 1)
        if (x.ndim != 4 or x.shape[3] != spec.shape[2] or x.shape[1] < min_hw[0]
            or x.shape[2] < min_hw[1]):
          raise ValueError(
              f'ObservationEncoder: obs[{spec.key!r}] has shape {x.shape}; expected '
              f'(N, H, W, {spec.shape[2]}) with H, W at least {min_hw}')
        if not jnp.issubdtype(x.dtype, jnp.floating):
          raise ValueError(
              f'ObservationEncoder: obs[{spec.key!r}] has dtype {x.dtype}; expected floats in '
              '[-1, 1] (normalise uint8 images first)')
      elif x.shape[1:] != spec.shape:
        raise ValueError(f'ObservationEncoder: obs[{spec.key!r}] has shape {x.shape}; expected '
                         f'(N, {", ".join(map(str, spec.shape))})')
    return next(iter(sizes.values()))[0]
