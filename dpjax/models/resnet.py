"""ResNet-18 convolutional trunk with GroupNorm (robomimic `ResNet18Conv`, SPEC §4), NHWC.

torchvision's resnet18 without avgpool and fc, every BatchNorm replaced by GroupNorm with
C/16 groups (eps 1e-5), as the reference policy does with `obs_encoder_group_norm=True`.
Input (N, H, W, C) → output (N, ceil(H/32), ceil(W/32), 8·width); 76×76 → 3×3×512.

Initialisation follows torchvision: conv kernels Kaiming-normal (fan_out, ReLU gain, no
truncation), norm scale 1 and bias 0. Convolutions have no bias, as in torchvision.
"""

import functools
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from dpjax.models import conv_ops, cpu_kernels

GROUP_NORM_EPS = 1e-5
CHANNELS_PER_GROUP = 16

# torchvision: nn.init.kaiming_normal_(w, mode='fan_out', nonlinearity='relu').
conv_kernel_init = nn.initializers.variance_scaling(2.0, 'fan_out', 'normal')


def group_norm_groups(channels: int) -> int:
  """The reference's `num_groups = num_features // 16`, at least 1 for narrow test widths."""
  groups = max(1, channels // CHANNELS_PER_GROUP)
  if channels % groups:
    raise ValueError(
        f'dpjax/models/resnet.py: {channels} channels cannot be split into {groups} GroupNorm '
        f'groups (C/{CHANNELS_PER_GROUP}); choose a resnet_width that is a multiple of 16 '
        'or at most 16')
  return groups


def _per_channel(values: jax.Array, c: int) -> jax.Array:
  """(N, G) → (N, C), each group's value for its channels."""
  return jnp.repeat(values, c // values.shape[1], axis=1)


def _inverse_std(mean: jax.Array, mean_sq: jax.Array, epsilon: float) -> jax.Array:
  return jax.lax.rsqrt(jnp.maximum(mean_sq - jnp.square(mean), 0.0) + epsilon)


def _normalize(x, scale, bias, mean, inv_std, dtype):
  """y = (x - mean)·inv_std·scale + bias as one per-(sample, channel) scale and shift."""
  c = x.shape[-1]
  a = _per_channel(inv_std, c) * scale
  b = bias - _per_channel(mean, c) * a
  return (x.astype(jnp.float32) * a[:, None, None] + b[:, None, None]).astype(dtype)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4, 5))
def _group_norm_moments(x, scale, bias, groups, epsilon, dtype):
  return _group_norm_moments_forward(x, scale, bias, groups, epsilon, dtype)[0]


def _group_norm_moments_forward(x, scale, bias, groups, epsilon, dtype):
  n, h, w, c = x.shape
  flat = x.reshape(n, h * w, c)
  sums, sums_sq = cpu_kernels.channel_moments(flat, flat)
  count = h * w * c // groups
  mean = sums.reshape(n, groups, c // groups).sum(-1) / count
  mean_sq = sums_sq.reshape(n, groups, c // groups).sum(-1) / count
  inv_std = _inverse_std(mean, mean_sq, epsilon)
  return _normalize(x, scale, bias, mean, inv_std, dtype), (x, scale, mean, inv_std)


def _group_norm_moments_backward(groups, epsilon, dtype, residuals, grad):
  """torch's GroupNorm backward from the per-channel sums of dy and dy·x (one kernel pass):
  dx = inv_std·(scale·dy − mean_g(scale·dy) − x̂·mean_g(scale·dy·x̂)), x̂ = (x − mean)·inv_std."""
  del epsilon, dtype
  x, scale, mean, inv_std = residuals
  n, h, w, c = x.shape
  count = h * w * c // groups
  grad_sums, grad_x_sums = cpu_kernels.channel_moments(
      grad.astype(x.dtype).reshape(n, h * w, c), x.reshape(n, h * w, c))
  group_sum = lambda values: values.reshape(n, groups, c // groups).sum(-1)
  # Σ dy·x̂ per (sample, channel).
  grad_normalized_sums = _per_channel(inv_std, c) * (
      grad_x_sums - _per_channel(mean, c) * grad_sums)
  grad_scale = grad_normalized_sums.sum(0)
  grad_bias = grad_sums.sum(0)
  mean_grad = group_sum(scale * grad_sums) / count  # mean_g(scale·dy), (N, G)
  mean_grad_normalized = group_sum(scale * grad_normalized_sums) / count
  # dx = dy·a + x·b + d per (sample, channel).
  a = _per_channel(inv_std, c) * scale
  b = _per_channel(-jnp.square(inv_std) * mean_grad_normalized, c)
  d = _per_channel(inv_std * (mean * inv_std * mean_grad_normalized - mean_grad), c)
  grad_x = (grad.astype(jnp.float32) * a[:, None, None] +
            x.astype(jnp.float32) * b[:, None, None] + d[:, None, None])
  return grad_x.astype(x.dtype), grad_scale, grad_bias


_group_norm_moments.defvjp(_group_norm_moments_forward, _group_norm_moments_backward)


class GroupNorm(nn.Module):
  """torch.nn.GroupNorm over NHWC features; statistics in float32 whatever `dtype` is.

  One pass (E[x], E[x²]) over an (N, H·W, G, C/G) view, then the normalisation is folded into
  one per-(sample, channel) scale and shift, so XLA fuses it into a single elementwise op:
  this is the difference between a Flax ResNet that keeps up with PyTorch on CPU and one that
  does not. Where the C++ kernels run (`cpu_kernels.moments_supported`), the statistics and
  the backward pass's sums are one kernel pass each (XLA:CPU's reductions took ~100 ms per
  camera of a training step); the rest stays elementwise for XLA to fuse.
  """
  num_groups: int
  epsilon: float = GROUP_NORM_EPS
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    n, h, w, c = x.shape
    g = self.num_groups
    scale = self.param('scale', nn.initializers.ones, (c,), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (c,), jnp.float32)
    if cpu_kernels.moments_supported((n, h * w, c), x.dtype):
      return _group_norm_moments(x, scale, bias, g, self.epsilon, self.dtype)
    grouped = x.astype(jnp.float32).reshape(n, h * w, g, c // g)
    mean = jnp.mean(grouped, axis=(1, 3))
    mean_sq = jnp.mean(jnp.square(grouped), axis=(1, 3))
    return _normalize(x, scale, bias, mean, _inverse_std(mean, mean_sq, self.epsilon), self.dtype)


# On CPU, the convolution formulation per layer (conv_ops; measured in docs/performance.md):
# the C++ kernels run every layer of a training batch fastest, float32 or bfloat16, and at
# batch-1 sampling the first stage (2 images of 19×19: 722 pixels; both cameras' encoders
# 22-26 → 19 ms); on smaller maps (its deep stages) XLA is faster unless the kernel is packed
# ahead (`Conv` with PACKED_KERNELS). Without them (no compiler):
# XLA's own kernel gradient is slow for wide, high-resolution layers (stage 1 of the
# paper-sized ResNet: 19×19×64), so those use patches; tiny maps (the last stage's 3×3) waste
# 40 % of the products on padding, which pays to skip from a few dozen images on.
GEMM_KERNEL_GRAD_MIN_CHANNELS = 64
GEMM_KERNEL_GRAD_MIN_PIXELS = 16 * 16
TAP_GEMMS_MAX_SIDE = 4
TAP_GEMMS_MIN_IMAGES = 32
CPU_KERNELS_MIN_PIXELS = 512


def conv_method(input_shape: tuple[int, ...], kernel_shape: tuple[int, ...], strides: int,
                dtype: Any, backend: str) -> str:
  """The conv_ops.conv2d method for an (N, H, W, C) input and (k, k, C, C_out) kernel in
  `dtype` on this backend."""
  n, h, w, c = input_shape
  if backend != 'cpu':
    return 'xla'
  if n * h * w >= CPU_KERNELS_MIN_PIXELS and cpu_kernels.conv_supported(
      input_shape, kernel_shape, strides, dtype):
    return 'cpu_kernels'
  if strides == 1 and max(h, w) <= TAP_GEMMS_MAX_SIDE and n >= TAP_GEMMS_MIN_IMAGES:
    return 'tap_gemms'
  if c >= GEMM_KERNEL_GRAD_MIN_CHANNELS and h * w >= GEMM_KERNEL_GRAD_MIN_PIXELS:
    return 'gemm_kernel_grad'
  return 'xla'


# The variable collection of kernels packed for sampling (`Conv`): {module path: 'kernel'}.
PACKED_KERNELS = 'packed_kernels'


class Conv(nn.Module):
  """Bias-free conv with torch's padding (kernel // 2 on each side); params as nn.Conv's.

  Sampling packs kernels ahead (`DiffusionPolicy.sampling_variables`): applied with the
  PACKED_KERNELS collection mutable, a Conv the C++ kernels can run stores its kernel packed
  there; applied with that collection, it convolves with the stored panels (forward only).
  Inference on CPU then also runs the small deep-stage maps on the kernels, which
  lose to XLA only when each call packs its kernel again (docs/performance.md).
  """
  features: int
  kernel_size: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    k = self.kernel_size
    kernel = self.param('kernel', conv_kernel_init, (k, k, x.shape[-1], self.features),
                        jnp.float32)
    x = x.astype(self.dtype)
    if cpu_kernels.conv_supported(x.shape, kernel.shape, self.strides, self.dtype):
      if self.is_mutable_collection(PACKED_KERNELS) and not self.is_initializing():
        self.put_variable(PACKED_KERNELS, 'kernel', conv_ops.packed_kernel(
            kernel, x.shape, self.strides, self.dtype))
      if self.has_variable(PACKED_KERNELS, 'kernel'):
        return conv_ops.conv2d_packed(x, self.get_variable(PACKED_KERNELS, 'kernel'),
                                      kernel.shape, self.strides)
    method = conv_method(x.shape, kernel.shape, self.strides, self.dtype, jax.default_backend())
    return conv_ops.conv2d(x, kernel.astype(self.dtype), self.strides, method)


class BasicBlock(nn.Module):
  """torchvision BasicBlock: 3×3 conv–GN–ReLU–3×3 conv–GN, plus (projected) identity, ReLU."""
  features: int
  strides: int = 1
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    groups = group_norm_groups(self.features)
    y = Conv(self.features, 3, self.strides, self.dtype, name='conv1')(x)
    y = nn.relu(GroupNorm(groups, dtype=self.dtype, name='norm1')(y))
    y = Conv(self.features, 3, 1, self.dtype, name='conv2')(y)
    y = GroupNorm(groups, dtype=self.dtype, name='norm2')(y)
    residual = x
    if self.strides != 1 or x.shape[-1] != self.features:
      residual = Conv(self.features, 1, self.strides, self.dtype,
                      name='downsample_conv')(x)
      residual = GroupNorm(groups, dtype=self.dtype, name='downsample_norm')(residual)
    return nn.relu(y + residual)


class ResNet18(nn.Module):
  """ResNet-18 trunk: (N, H, W, C) float → (N, ceil(H/32), ceil(W/32), 8·width).

  width: channels of the first stage (64 in the reference); stages have width, 2w, 4w, 8w.
  dtype: compute dtype (e.g. bfloat16); parameters and GroupNorm statistics stay float32.
  """
  width: int = 64
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, images: jax.Array) -> jax.Array:
    if images.ndim != 4:
      raise ValueError(f'ResNet18: expected images (N, H, W, C), got shape {images.shape}')
    x = images.astype(self.dtype)
    x = Conv(self.width, 7, 2, self.dtype, name='conv1')(x)
    x = nn.relu(GroupNorm(group_norm_groups(self.width), dtype=self.dtype, name='norm1')(x))
    x = conv_ops.max_pool_3x3_stride2(x)
    for stage, multiplier in enumerate((1, 2, 4, 8)):
      for block in range(2):
        strides = 2 if stage > 0 and block == 0 else 1
        x = BasicBlock(self.width * multiplier, strides, dtype=self.dtype,
                       name=f'layer{stage + 1}_{block}')(x)
    return x
