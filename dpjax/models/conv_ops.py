"""Convolution and max-pool with backward passes that run fast under XLA:CPU (issue 6).

Both compute what `lax.conv_general_dilated` / `nn.max_pool` compute (up to float summation
order); `conv2d` offers three other formulations of the same convolution:

* `method='cpu_kernels'`: forward and kernel gradient on the C++ kernels (cpu_kernels.conv,
  conv_kernel_grad: GEMMs reading the padded input in place, 2-6× faster than XLA:CPU on the
  ResNet's layers); a stride-1 input gradient is the same kernel on the padded output gradient
  with the mirrored, transposed kernel; a strided one is XLA's transposed convolution (in
  float32). float32, or bfloat16 on CPUs with AVX512-BF16 (products summed in float32 and
  rounded once, as XLA's bfloat16 convolution). In float32, stride-1 3×3 convolutions on maps
  larger than 6×6 take Winograd's F(2x2, 3x3) instead, forward and both gradients
  (`cpu_kernels.winograd_conv`: 2.0-2.25× fewer products on ResNet-18's first two stages).
* `method='gemm_kernel_grad'`: the kernel gradient is one matrix product of the input's k×k
  patches with the output gradient (the fallback where the C++ kernels cannot be built or
  used). XLA:CPU otherwise runs it as a convolution whose window is
  the whole feature map, which for ResNet-18's first stage (19×19, 64 channels) took ≈ 4× longer
  than the forward convolution (docs/performance.md). With narrow layers (16 channels) building
  the patches costs more than it saves, so callers choose per layer.
* `method='tap_gemms'` (stride 1): one matrix product per kernel tap over only the output pixels
  whose tap falls inside the image. On ResNet-18's last stage (3×3 maps, 512 channels) 40 % of a
  padded convolution's products are with padding zeros; skipping them made forward + backward
  1.75× faster. Its gradients are the autodiff of the same products.
* `max_pool_3x3_stride2`: XLA's gradient of a max-pool reduce-window is a select-and-scatter
  that XLA:CPU lowers to a slow windowed scan (≈ 230 ms for 128 images of 38×38×64 against 44
  ms here). The backward here routes each output gradient to the first maximum of its window
  in row-major order, as torch's `max_pool2d` does. Where the C++ kernels run
  (`cpu_kernels.enabled`), the forward pass also records that argmax (int8) and the backward
  pass scatters through it; elsewhere the backward recomputes it from 9 strided views.
"""

import functools
from typing import Any

import jax
import jax.numpy as jnp

from dpjax.models import cpu_kernels

_DIMENSIONS = ('NHWC', 'HWIO', 'NHWC')


def _same_padding(kernel_size: int) -> tuple[tuple[int, int], tuple[int, int]]:
  pad = kernel_size // 2
  return ((pad, pad), (pad, pad))


def _xla_conv(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return jax.lax.conv_general_dilated(x, kernel, (stride, stride),
                                      _same_padding(kernel.shape[0]),
                                      dimension_numbers=_DIMENSIONS)


def _windows(x: jax.Array, kernel_size: int, stride: int, pad_value: float) -> list[jax.Array]:
  """The k·k strided views of `x` padded by k // 2 with `pad_value`, one per kernel offset in
  row-major order: view (i, j)[n, r, c] is the input under offset (i, j) of output pixel (r, c)."""
  h, w = x.shape[1:3]
  (pad, _), _ = _same_padding(kernel_size)
  out_h = (h + 2 * pad - kernel_size) // stride + 1
  out_w = (w + 2 * pad - kernel_size) // stride + 1
  padded = jnp.pad(x, ((0, 0), (pad, pad), (pad, pad), (0, 0)), constant_values=pad_value)
  return [padded[:, i:i + stride * (out_h - 1) + 1:stride, j:j + stride * (out_w - 1) + 1:stride]
          for i in range(kernel_size) for j in range(kernel_size)]


def _patches(x: jax.Array, kernel_size: int, stride: int) -> jax.Array:
  """(N, H, W, C) → (N·out_h·out_w, k·k·C): row r holds output pixel r's receptive field,
  ordered (kernel row, kernel column, channel) like an HWIO kernel's first three axes."""
  windows = _windows(x, kernel_size, stride, 0.0)
  return jnp.concatenate(windows, axis=-1).reshape(-1, kernel_size * kernel_size * x.shape[-1])


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_gemm_kernel_grad(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _xla_conv(x, kernel, stride)


def _conv_forward(x, kernel, stride):
  return _xla_conv(x, kernel, stride), (x, kernel)


def _xla_input_grad(x_like: Any, kernel: jax.Array, stride: int, grad: jax.Array) -> jax.Array:
  """The gradient of `_xla_conv` with respect to its input, whose shape and dtype `x_like` (an
  array or jax.ShapeDtypeStruct) gives."""
  (grad_x,) = jax.linear_transpose(lambda inputs: _xla_conv(inputs, kernel, stride),
                                   x_like)(grad)
  return grad_x


def _conv_backward(stride, residuals, grad):
  x, kernel = residuals
  grad_x = _xla_input_grad(x, kernel, stride, grad)
  n, out_h, out_w, out_c = grad.shape
  patches = _patches(x, kernel.shape[0], stride)
  # (C_out, M) @ (M, k·k·C_in), transposed: the faster operand order for XLA:CPU here.
  grad_kernel = (grad.reshape(n * out_h * out_w, out_c).T @ patches).T
  return grad_x, grad_kernel.reshape(kernel.shape)


_conv_gemm_kernel_grad.defvjp(_conv_forward, _conv_backward)


def _tap_gemms(x: jax.Array, kernel: jax.Array) -> jax.Array:
  n, h, w, c = x.shape
  k, out_c = kernel.shape[0], kernel.shape[-1]
  out = None
  for i in range(k):
    for j in range(k):
      di, dj = i - k // 2, j - k // 2
      # Output rows [top, bottom) and columns [left, right) see this tap inside the image.
      top, bottom, left, right = max(0, -di), min(h, h - di), max(0, -dj), min(w, w - dj)
      if bottom <= top or right <= left:
        continue
      rows = x[:, top + di:bottom + di, left + dj:right + dj].reshape(-1, c)
      part = (rows @ kernel[i, j]).reshape(n, bottom - top, right - left, out_c)
      part = jnp.pad(part, ((0, 0), (top, h - bottom), (left, w - right), (0, 0)))
      out = part if out is None else out + part
  return out


def _pad_same(x: jax.Array, kernel_size: int) -> jax.Array:
  return jnp.pad(x, ((0, 0), *_same_padding(kernel_size), (0, 0)))


@functools.partial(jax.custom_vjp, nondiff_argnums=(2,))
def _conv_cpu_kernels(x: jax.Array, kernel: jax.Array, stride: int) -> jax.Array:
  return _cpu_kernels_forward(x, kernel, stride)[0]


def _operand_channels(c: int, dtype: Any) -> int:
  """Input channels as the C++ kernels take them: in pairs for bfloat16 (a zero channel added to
  an odd C, e.g. the stem's RGB)."""
  return c + c % 2 if dtype == jnp.bfloat16 else c


def _extra_kernel_columns(kernel_shape: tuple[int, ...], dtype: Any) -> int:
  """Zero taps added to each kernel row where one makes its KW·C values whole steps of the C++
  kernels' fastest path (`cpu_kernels.kernel_row_multiple`): the stem's 7 × 4 as 8 × 4 on AMX
  tiles, 8/7 of the products at a multiple of the speed."""
  multiple = cpu_kernels.kernel_row_multiple(dtype)
  kw, c = kernel_shape[1], _operand_channels(kernel_shape[2], dtype)
  return int((kw * c) % multiple != 0 and ((kw + 1) * c) % multiple == 0)


def _input_operand(x_padded: jax.Array, kernel_shape: tuple[int, ...],
                   stride: int) -> jax.Array:
  """x_padded as the C++ kernels take it with `_kernel_operand(kernel)`: channels as
  `_operand_channels`, and past the right border zero columns for the extra taps to read."""
  _, _, wp, c = x_padded.shape
  kw = kernel_shape[1]
  extra = _extra_kernel_columns(kernel_shape, x_padded.dtype)
  extra_w = max(0, ((wp - kw) // stride) * stride + kw + extra - wp) if extra else 0
  return jnp.pad(x_padded, ((0, 0), (0, 0), (0, extra_w),
                            (0, _operand_channels(c, x_padded.dtype) - c)))


def _kernel_operand(kernel: jax.Array, dtype: Any) -> jax.Array:
  """kernel as the C++ kernels take it for a convolution in `dtype`: output channels in whole
  panels of 32 (zero columns added, e.g. the cpu variant's 16), input channels as
  `_operand_channels`, and `_extra_kernel_columns` zero taps."""
  c, c_out = kernel.shape[2:]
  return jnp.pad(kernel, ((0, 0), (0, _extra_kernel_columns(kernel.shape, dtype)),
                          (0, _operand_channels(c, dtype) - c),
                          (0, -c_out % cpu_kernels.PANEL_WIDTH)))


def _cpu_kernels_forward(x, kernel, stride):
  k = kernel.shape[0]
  x_padded = _pad_same(x, k)
  if cpu_kernels.winograd_supported(x.shape, kernel.shape, stride, x.dtype):
    y = cpu_kernels.winograd_conv(x_padded, cpu_kernels.winograd_panels(kernel))
  else:
    y = cpu_kernels.conv(_input_operand(x_padded, kernel.shape, stride),
                         _kernel_operand(kernel, x.dtype), stride, k // 2)[..., :kernel.shape[-1]]
  return y, (x_padded, kernel)


def _cpu_kernels_backward(stride, residuals, grad):
  x_padded, kernel = residuals
  k = kernel.shape[0]
  c, c_out = kernel.shape[2:]
  pad = k // 2
  n, hp, wp, _ = x_padded.shape
  x_shape = (n, hp - 2 * pad, wp - 2 * pad, c)
  x_operand = _input_operand(x_padded, kernel.shape, stride)
  kernel_operand = _kernel_operand(kernel, x_padded.dtype)
  grad_operand = jnp.pad(grad, ((0, 0),) * 3 + ((0, kernel_operand.shape[-1] - c_out),))
  if cpu_kernels.winograd_supported(x_shape, kernel.shape, stride, x_padded.dtype):
    grad_kernel = cpu_kernels.winograd_kernel_grad(x_padded, grad)
  else:
    grad_kernel = cpu_kernels.conv_kernel_grad(x_operand, grad_operand, kernel_operand.shape,
                                               stride, pad)[:, :k, :c, :c_out]
  # A stride-1 convolution's input gradient is the convolution of the padded output gradient
  # with the kernel mirrored in space and transposed in channels.
  if cpu_kernels.winograd_supported(grad.shape, (k, k, c_out, c), stride, grad.dtype):
    grad_x = cpu_kernels.winograd_conv(_pad_same(grad, k),
                                       cpu_kernels.winograd_panels(kernel, mirror=True))
  elif stride == 1 and c % cpu_kernels.PANEL_WIDTH == 0:
    grad_x = cpu_kernels.conv(_pad_same(grad_operand, k), kernel_operand, 1, pad, mirror=True)
  else:
    # Strided (or narrow) input gradients are XLA's, in float32 also for bfloat16: XLA:CPU's
    # bfloat16 convolutions are slower.
    x = jax.ShapeDtypeStruct(x_shape, jnp.float32)
    grad_x = _xla_input_grad(x, kernel.astype(jnp.float32), stride, grad.astype(jnp.float32))
  return grad_x.astype(grad.dtype), grad_kernel.astype(kernel.dtype)


_conv_cpu_kernels.defvjp(_cpu_kernels_forward, _cpu_kernels_backward)


CONV_METHODS = ('xla', 'gemm_kernel_grad', 'tap_gemms', 'cpu_kernels')


def conv2d(x: jax.Array, kernel: jax.Array, stride: int, method: str = 'xla') -> jax.Array:
  """Bias-free convolution with torch's padding (k // 2 each side), NHWC × HWIO → NHWC.

  x (N, H, W, C_in); kernel (k, k, C_in, C_out) with odd k; same dtype for both.
  method: one of CONV_METHODS (see the module docstring); 'tap_gemms' needs stride 1.
  """
  if kernel.ndim != 4 or kernel.shape[0] != kernel.shape[1] or kernel.shape[0] % 2 == 0:
    raise ValueError(f'conv2d: kernel must be (k, k, C_in, C_out) with odd k, got {kernel.shape}')
  if x.ndim != 4 or x.shape[-1] != kernel.shape[2]:
    raise ValueError(f'conv2d: x must be (N, H, W, {kernel.shape[2]}), got {x.shape}')
  if method == 'gemm_kernel_grad':
    return _conv_gemm_kernel_grad(x, kernel, stride)
  if method == 'cpu_kernels':
    if not cpu_kernels.conv_supported(x.shape, kernel.shape, stride, x.dtype):
      raise ValueError(f"conv2d: method 'cpu_kernels' cannot run x {x.dtype} {x.shape} with "
                       f'kernel {kernel.shape} and stride {stride} '
                       '(see cpu_kernels.conv_supported)')
    return _conv_cpu_kernels(x, kernel, stride)
  if method == 'tap_gemms':
    if stride != 1:
      raise ValueError(f"conv2d: method 'tap_gemms' needs stride 1, got {stride}")
    return _tap_gemms(x, kernel)
  if method != 'xla':
    raise ValueError(f'conv2d: method must be one of {CONV_METHODS}, got {method!r}')
  return _xla_conv(x, kernel, stride)


def packed_kernel(kernel: jax.Array, x_shape: tuple[int, ...], stride: int,
                  dtype: Any) -> jax.Array:
  """kernel (k, k, C_in, C_out) as `conv2d_packed` reads it for inputs x_shape (N, H, W, C_in)
  in `dtype`: the C++ kernels' panels (Winograd's where `cpu_kernels.winograd_supported`),
  packed once for a caller that convolves with the same kernel many times (sampling).
  Needs `cpu_kernels.conv_supported` for the kernel in `dtype`."""
  if cpu_kernels.winograd_supported(x_shape, kernel.shape, stride, dtype):
    return cpu_kernels.winograd_panels(kernel)
  return cpu_kernels.conv_panels(_kernel_operand(kernel, dtype), dtype)


def conv2d_packed(x: jax.Array, panels: jax.Array, kernel_shape: tuple[int, ...],
                  stride: int) -> jax.Array:
  """`conv2d(x, kernel, stride, 'cpu_kernels')` from `packed_kernel(kernel, x.shape, stride,
  x.dtype)`, forward only (no gradient): kernel_shape (k, k, C_in, C_out) is the kernel's."""
  k, _, _, c_out = kernel_shape
  if cpu_kernels.winograd_supported(x.shape, kernel_shape, stride, x.dtype):
    return cpu_kernels.winograd_conv(_pad_same(x, k), panels)
  x_operand = _input_operand(_pad_same(x, k), kernel_shape, stride)
  kernel_operand = jax.eval_shape(functools.partial(_kernel_operand, dtype=x.dtype),
                                  jax.ShapeDtypeStruct(kernel_shape, x.dtype))
  y = cpu_kernels.conv(x_operand, kernel_operand, stride, k // 2, panels=panels)
  return y[..., :c_out]


def matmul(x: jax.Array, kernel: jax.Array) -> jax.Array:
  """x (..., K) @ kernel (K, N), one dtype for both. In bfloat16 where the conv kernels run it
  (`cpu_kernels.conv_supported`: N a multiple of 16, AVX512-BF16), as their 1×1 convolution
  over the rows of x, gradients included: XLA:CPU's bfloat16 dots ran the transformer's
  training matmuls at 70-130 GFLOP/s (docs/performance.md)."""
  k, n = kernel.shape
  rows = x.reshape(-1, 1, 1, k)
  if x.dtype != jnp.bfloat16 or not cpu_kernels.conv_supported(rows.shape, (1, 1, k, n), 1,
                                                                x.dtype):
    return x @ kernel
  y = conv2d(rows, kernel.reshape(1, 1, k, n), 1, 'cpu_kernels')
  return y.reshape(*x.shape[:-1], n)


_POOL_WINDOW, _POOL_STRIDE, _POOL_PAD = 3, 2, 1  # _POOL_PAD = _POOL_WINDOW // 2, as _windows.


def _max_pool_forward_only(x: jax.Array) -> jax.Array:
  pad = ((0, 0), (_POOL_PAD, _POOL_PAD), (_POOL_PAD, _POOL_PAD), (0, 0))
  return jax.lax.reduce_window(x, jnp.array(-jnp.inf, x.dtype), jax.lax.max,
                               (1, _POOL_WINDOW, _POOL_WINDOW, 1),
                               (1, _POOL_STRIDE, _POOL_STRIDE, 1), pad)


def max_pool_3x3_stride2(x: jax.Array) -> jax.Array:
  """torch's MaxPool2d(3, stride=2, padding=1) on NHWC: (N, H, W, C) → (N, ⌈H/2⌉, ⌈W/2⌉, C)."""
  if cpu_kernels.enabled(jnp.float32) and x.dtype in (jnp.float32, jnp.bfloat16):
    # bfloat16 through the float32 kernels: the maxima are exact either way, and XLA's
    # bfloat16 backward took 0.44 s per camera of a training step, on one thread.
    return _max_pool_cpu_kernels(x.astype(jnp.float32), x.shape).astype(x.dtype)
  return _max_pool_xla(x)


@functools.partial(jax.custom_vjp, nondiff_argnums=(1,))
def _max_pool_cpu_kernels(x: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
  del x_shape  # Only the backward pass needs it.
  return cpu_kernels.max_pool(x)[0]


def _cpu_kernels_pool_forward(x, x_shape):
  del x_shape
  return cpu_kernels.max_pool(x)  # (pooled, residual argmax)


def _cpu_kernels_pool_backward(x_shape, argmax, grad):
  return (cpu_kernels.max_pool_grad(argmax, grad, x_shape),)


_max_pool_cpu_kernels.defvjp(_cpu_kernels_pool_forward, _cpu_kernels_pool_backward)


@jax.custom_vjp
def _max_pool_xla(x: jax.Array) -> jax.Array:
  return _max_pool_forward_only(x)


def _pool_forward(x):
  return _max_pool_forward_only(x), x


def _pool_backward(x, grad):
  windows = _windows(x, _POOL_WINDOW, _POOL_STRIDE, -jnp.inf)
  best, first_argmax = windows[0], jnp.zeros(windows[0].shape, jnp.int32)
  for offset, window in enumerate(windows[1:], start=1):
    larger = window > best  # Strict: ties keep the earlier offset, as torch does.
    best = jnp.where(larger, window, best)
    first_argmax = jnp.where(larger, offset, first_argmax)
  n, h, w, c = x.shape
  out_h, out_w = grad.shape[1:3]
  zero = jnp.zeros((), grad.dtype)
  grad_padded = None
  for offset in range(_POOL_WINDOW * _POOL_WINDOW):
    i, j = divmod(offset, _POOL_WINDOW)
    # The transpose of the strided slice `padded[:, i::2, j::2]`: interior padding.
    placement = ((0, 0, 0),
                 (i, h + 2 * _POOL_PAD - i - _POOL_STRIDE * (out_h - 1) - 1, _POOL_STRIDE - 1),
                 (j, w + 2 * _POOL_PAD - j - _POOL_STRIDE * (out_w - 1) - 1, _POOL_STRIDE - 1),
                 (0, 0, 0))
    part = jax.lax.pad(jnp.where(first_argmax == offset, grad, zero), zero, placement)
    grad_padded = part if grad_padded is None else grad_padded + part
  return (grad_padded[:, _POOL_PAD:_POOL_PAD + h, _POOL_PAD:_POOL_PAD + w],)


_max_pool_xla.defvjp(_pool_forward, _pool_backward)
