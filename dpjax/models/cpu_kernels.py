"""C++ kernels for the CPU hot paths XLA runs slowly (csrc/), with XLA fallbacks.

Sampling: batch-1 sampling runs the decoder's 32 matmuls on 10 rows per denoising step, so it
streams its 25 MB of weights 100 times; XLA:CPU's GEMM does that at ~7 GB/s (column panels
strided by N). The dense kernel reads each 32-column panel of a pre-packed (N/32, K, 32) kernel
as one contiguous stream (~20 GB/s here; 25-27 with software prefetch). The attention kernel
replaces XLA's batched 10 x 64 x 10 GEMMs and head transposes, the LayerNorm kernel XLA's
per-reduction YNNPACK calls; `decoder_layer` runs a whole decoder layer (those kernels, GELU,
residuals; float32, or bfloat16 weights) as one call, because at batch 1 each of its steps is
microseconds of work.

Training: `conv` and `conv_kernel_grad` are the ResNet's convolutions as GEMMs whose rows are
read straight out of the padded NHWC input (no patches built), at 170-200 GFLOP/s on the
2-core VM where XLA:CPU runs the forward at 55-100 and the kernel gradients of the
high-resolution layers at 25-45; conv_ops' 'cpu_kernels' method gives them their autodiff rule.
In float32 the stride-1 3 × 3 convolutions of the first two stages (19 × 19 and 10 × 10 maps)
take Winograd's F(2x2, 3x3) instead (`winograd_conv`, `winograd_kernel_grad`): 2.0-2.25× fewer
products, 1.45-2× faster.
Both also run bfloat16 operands (float32 sums) for mixed precision, where the CPU has
AVX512-BF16 (on AMX tiles where it has AMX: the dense blocks, the convolutions of 16 images or
more and the kernel gradients). `channel_moments` gives GroupNorm its sums in one pass each.
docs/performance.md has the measurements.

`pack_dense(kernel, bias, dtype)` chooses the layout for the current backend: packed panels
where the float32 kernels are usable (`enabled(dtype)`: one CPU device, float32, built), k-pair
panels for bfloat16 on a CPU with AVX512-BF16 (whose dot instruction runs 2.3x the float32 FMA
rate here), the plain (K, N) kernel otherwise; `dense` runs any of them. The other entry points
are for callers that checked `enabled` (`conv_supported` for convolutions); they have no
autodiff rule of their own.

The sources are in csrc/, a file per kernel (`*.cc`, each defining its FFI handlers) and the
pieces they share (`*.h`: thread pool, vector math, register blocks, AMX tiles). The shared
library is compiled on first use with the system C++ compiler against the installed jaxlib's
FFI headers, for this CPU (`-march=native`), into $DPJAX_KERNEL_CACHE (default ~/.cache/dpjax);
`python -m dpjax.models.cpu_kernels` builds it ahead of time.
Without a compiler, everything falls back to XLA's ops with one warning.
"""

import concurrent.futures
import contextlib
import ctypes
import functools
import hashlib
import logging
import os
import pathlib
import shutil
import subprocess
import tempfile
from typing import Any, Mapping, NamedTuple, Optional, Sequence

import jax
import jax.numpy as jnp
import jaxlib
import numpy as np

PANEL_WIDTH = 32
_SOURCES = pathlib.Path(__file__).with_name('csrc')
_DENSE_TARGET = 'dpjax_packed_dense'
_DENSE_BF16_TARGET = 'dpjax_packed_dense_bf16'
_ATTENTION_TARGET = 'dpjax_attention'
_LAYER_NORM_TARGET = 'dpjax_layer_norm'
_DECODER_LAYER_TARGET = 'dpjax_decoder_layer'
_CONV_TARGET = 'dpjax_conv'
_CONV_BF16_TARGET = 'dpjax_conv_bf16'
_WINOGRAD_CONV_TARGET = 'dpjax_winograd_conv'
_WINOGRAD_PANELS_TARGET = 'dpjax_winograd_panels'
_WINOGRAD_KERNEL_GRAD_TARGET = 'dpjax_winograd_kernel_grad'
_CONV_KERNEL_GRAD_TARGET = 'dpjax_conv_kernel_grad'
_CONV_KERNEL_GRAD_BF16_TARGET = 'dpjax_conv_kernel_grad_bf16'
_MAX_POOL_TARGET = 'dpjax_max_pool'
_MAX_POOL_GRAD_TARGET = 'dpjax_max_pool_grad'
_PACK_CONV_KERNEL_TARGET = 'dpjax_pack_conv_kernel'
_MOMENTS_TARGETS = {jnp.dtype(jnp.float32): 'dpjax_channel_moments',
                    jnp.dtype(jnp.bfloat16): 'dpjax_channel_moments_bf16'}
_FLAGS = ('-O3', '-march=native', '-std=c++17', '-fPIC')


class PackedDense(NamedTuple):
  """A Dense layer's parameters in the layout `dense` runs on this backend.

  kernel: (K, N) float, or (ceil(N / 32), K, 32) float32 panels (N zero-padded to 32s).
  bias: (N,).
  """
  kernel: jax.Array
  bias: jax.Array


def _cpu_fingerprint() -> str:
  try:
    lines = pathlib.Path('/proc/cpuinfo').read_text().splitlines()
  except OSError:
    return os.uname().machine
  return next((line for line in lines if line.startswith(('flags', 'Features'))),
              os.uname().machine)


def _library_path() -> pathlib.Path:
  digest = hashlib.sha256()
  for source in sorted(p for p in _SOURCES.iterdir() if p.suffix in ('.cc', '.h')):
    digest.update(f'{source.name}\n{source.read_text()}\n'.encode())
  digest.update('\n'.join([jaxlib.__version__, ' '.join(_FLAGS), _cpu_fingerprint()]).encode())
  key = digest.hexdigest()[:16]
  cache = pathlib.Path(os.environ.get('DPJAX_KERNEL_CACHE',
                                      pathlib.Path.home() / '.cache' / 'dpjax'))
  return cache / f'cpu_kernels-{key}.so'


def _run(command: Sequence[str]) -> None:
  result = subprocess.run(command, capture_output=True, text=True, check=False)
  if result.returncode != 0:
    raise RuntimeError(f'cpu_kernels: `{" ".join(command)}` failed:\n{result.stderr}')


def build() -> pathlib.Path:
  """Compiles csrc/ for this machine and jaxlib if not cached; returns the library path.

  The sources compile in parallel, one compiler per core. Raises RuntimeError naming the failed
  compiler command and its output.
  """
  path = _library_path()
  if path.exists():
    return path
  compiler = os.environ.get('CXX') or shutil.which('g++') or shutil.which('c++')
  if compiler is None:
    raise RuntimeError('cpu_kernels: no C++ compiler found (set CXX or install g++) to build '
                       f'{_SOURCES}')
  path.parent.mkdir(parents=True, exist_ok=True)
  # Objects and library under a private name, then renamed: concurrent builds never expose a
  # partial library.
  with tempfile.TemporaryDirectory(dir=path.parent) as work:
    sources = sorted(_SOURCES.glob('*.cc'))
    objects = [os.path.join(work, f'{source.stem}.o') for source in sources]
    with concurrent.futures.ThreadPoolExecutor(os.cpu_count()) as pool:
      list(pool.map(_run, [[compiler, *_FLAGS, f'-I{jax.ffi.include_dir()}', '-c', str(source),
                            '-o', obj] for source, obj in zip(sources, objects)]))
    library = os.path.join(work, path.name)
    _run([compiler, '-shared', *objects, '-o', library])
    os.replace(library, path)
  return path


@functools.cache
def _library() -> Optional[ctypes.CDLL]:
  """Builds (once per machine) and registers the kernels; None, with a warning, if it cannot."""
  try:
    library = ctypes.cdll.LoadLibrary(str(build()))
  except (RuntimeError, OSError) as error:
    logging.warning('%s\nUsing XLA ops instead (slower sampling and training on CPU).', error)
    return None
  for target, symbol in ((_DENSE_TARGET, library.DpjaxPackedDense),
                         (_DENSE_BF16_TARGET, library.DpjaxPackedDenseBf16),
                         (_ATTENTION_TARGET, library.DpjaxAttention),
                         (_LAYER_NORM_TARGET, library.DpjaxLayerNorm),
                         (_DECODER_LAYER_TARGET, library.DpjaxDecoderLayer),
                         (_CONV_TARGET, library.DpjaxConv),
                         (_CONV_BF16_TARGET, library.DpjaxConvBf16),
                         (_WINOGRAD_CONV_TARGET, library.DpjaxWinogradConv),
                         (_WINOGRAD_PANELS_TARGET, library.DpjaxWinogradPanels),
                         (_WINOGRAD_KERNEL_GRAD_TARGET, library.DpjaxWinogradKernelGrad),
                         (_CONV_KERNEL_GRAD_TARGET, library.DpjaxConvKernelGrad),
                         (_CONV_KERNEL_GRAD_BF16_TARGET, library.DpjaxConvKernelGradBf16),
                         (_MAX_POOL_TARGET, library.DpjaxMaxPool),
                         (_MAX_POOL_GRAD_TARGET, library.DpjaxMaxPoolGrad),
                         (_PACK_CONV_KERNEL_TARGET, library.DpjaxPackConvKernel),
                         (_MOMENTS_TARGETS[jnp.dtype(jnp.float32)], library.DpjaxChannelMoments),
                         (_MOMENTS_TARGETS[jnp.dtype(jnp.bfloat16)],
                          library.DpjaxChannelMomentsBf16)):
    jax.ffi.register_ffi_target(target, jax.ffi.pycapsule(symbol), platform='cpu')
  return library


def kernels_available() -> bool:
  """Whether the kernels are built and registered (building them on first use)."""
  return _library() is not None


_disabled_depth = 0


@contextlib.contextmanager
def disabled():
  """Computations traced inside this context use XLA's ops only (`enabled` is False): to count
  FLOPs with XLA's cost analysis, which cannot see into a custom call, or to compare. jit's
  trace caches are cleared on entry and exit, so no trace crosses the boundary."""
  global _disabled_depth
  jax.clear_caches()
  _disabled_depth += 1
  try:
    yield
  finally:
    _disabled_depth -= 1
    jax.clear_caches()


def enabled(dtype: Any) -> bool:
  """Whether computations in `dtype` on the default backend run on these kernels.

  Only on a single CPU device: XLA's SPMD partitioner cannot split a custom call, so over a
  multi-device mesh it would gather the whole batch to every device for each kernel call.
  """
  return dtype == jnp.float32 and _usable()


def _usable() -> bool:
  return (not _disabled_depth and jax.default_backend() == 'cpu' and jax.device_count() == 1
          and kernels_available())


def _bf16_dense_enabled() -> bool:
  """Whether `dense` runs bfloat16 layers on the kernels (the CPU has AVX512-BF16)."""
  return _usable() and bool(_library().DpjaxHasBf16Dense())


def kernel_row_multiple(dtype: Any) -> int:
  """How many values a kernel row (KW·C) of a convolution in `dtype` should be a multiple of for
  the fastest path: 32 for bfloat16 on AMX tiles (one tile step), otherwise 1."""
  if dtype == jnp.bfloat16 and _bf16_dense_enabled() and _library().DpjaxHasAmxTiles():
    return 32
  return 1


def pack_dense(kernel: jax.Array, bias: jax.Array, dtype: Any) -> PackedDense:
  """(K, N) kernel and (N,) bias of a Dense layer computing in `dtype` → `PackedDense`."""
  if kernel.ndim != 2 or bias.shape != kernel.shape[1:]:
    raise ValueError(f'cpu_kernels.pack_dense: expected kernel (K, N) and bias (N,), got '
                     f'{kernel.shape} and {bias.shape}')
  kernel, bias = kernel.astype(dtype), bias.astype(dtype)
  k, n = kernel.shape
  padded = jnp.pad(kernel, ((0, 0), (0, -n % PANEL_WIDTH)))
  if enabled(dtype):
    return PackedDense(_pack_conv_kernel(padded[None, None], mirror=False), bias)
  if dtype == jnp.bfloat16 and k % 2 == 0 and _bf16_dense_enabled():
    return PackedDense(_bf16_pairs(padded), bias)
  return PackedDense(kernel, bias)


def _bf16_pairs(kernel: jax.Array) -> jax.Array:
  """(K, N) bfloat16, K even and N a multiple of 32 → (N / 32, K / 2, 32, 2): each k-pair's two
  weights side by side per column, as the AVX512-BF16 dot instruction takes them."""
  k = kernel.shape[0]
  return kernel.reshape(k // 2, 2, -1, PANEL_WIDTH).transpose(2, 0, 3, 1)


def dense(layer: PackedDense, x: jax.Array) -> jax.Array:
  """x (..., K) → x @ kernel + bias, (..., N), in the dtype `layer` was packed for."""
  kernel, bias = layer
  if kernel.ndim == 2:
    return x.astype(kernel.dtype) @ kernel + bias
  bf16 = kernel.ndim == 4
  k = kernel.shape[1] * (2 if bf16 else 1)
  if x.shape[-1] != k:
    raise ValueError(f'cpu_kernels.dense: expected x (..., {k}) for the packed kernel, got '
                     f'{x.shape}')
  rows = x.reshape(-1, k).astype(kernel.dtype)
  out_type = jax.ShapeDtypeStruct((rows.shape[0], kernel.shape[0] * PANEL_WIDTH), jnp.float32)
  y = jax.ffi.ffi_call(_DENSE_BF16_TARGET if bf16 else _DENSE_TARGET, out_type,
                       vmap_method='sequential')(rows, kernel)
  n = bias.shape[0]
  # Sums in float32, rounded once to the layer's dtype.
  return (y[:, :n] + bias.astype(jnp.float32)).astype(bias.dtype).reshape(*x.shape[:-1], n)


def _mask_or_all(mask: Optional[np.ndarray], shape: tuple[int, int], where: str) -> jax.Array:
  mask = np.ones(shape, bool) if mask is None else np.asarray(mask, bool)
  if mask.shape != shape:
    raise ValueError(f'cpu_kernels.{where}: mask must be (T, S) = {shape}, got '
                     f'{mask.shape}')
  return jnp.asarray(mask)


def attention(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
              mask: Optional[np.ndarray]) -> jax.Array:
  """`transformer._attend` (no dropout) of float32 q (B, T, E), k and v (B, S, E) → (B, T, E).

  mask: (T, S) bool, True = may attend, or None. Needs `enabled(jnp.float32)`.
  """
  b, t, e = q.shape
  s = k.shape[1]
  if (q.dtype, k.dtype, v.dtype) != (jnp.float32,) * 3 or k.shape != (b, s, e) or (
      v.shape != k.shape) or e % num_heads:
    raise ValueError(f'cpu_kernels.attention: expected float32 q (B, T, E), k and v (B, S, E) '
                     f'with E divisible by {num_heads} heads, got q {q.dtype} {q.shape}, '
                     f'k {k.dtype} {k.shape}, v {v.dtype} {v.shape}')
  call = jax.ffi.ffi_call(_ATTENTION_TARGET, jax.ShapeDtypeStruct(q.shape, jnp.float32),
                          vmap_method='sequential')
  return call(q, k, v, _mask_or_all(mask, (t, s), 'attention'), num_heads=np.int64(num_heads))


def layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, epsilon: float) -> jax.Array:
  """flax.linen.LayerNorm(epsilon) over the last axis of float32 x (..., E) with its params.

  Needs `enabled(jnp.float32)`.
  """
  e = x.shape[-1]
  if x.dtype != jnp.float32 or scale.shape != (e,) or bias.shape != (e,):
    raise ValueError(f'cpu_kernels.layer_norm: expected float32 x (..., E), scale and bias (E,), '
                     f'got x {x.dtype} {x.shape}, scale {scale.shape}, bias {bias.shape}')
  call = jax.ffi.ffi_call(_LAYER_NORM_TARGET, jax.ShapeDtypeStruct((x.size // e, e), jnp.float32),
                          vmap_method='sequential')
  rows = call(x.reshape(-1, e), scale.astype(jnp.float32), bias.astype(jnp.float32),
              epsilon=np.float32(epsilon))
  return rows.reshape(x.shape)


def decoder_layer(x: jax.Array, shared_memory: jax.Array, batch_memory: jax.Array,
                  norms: Sequence[Mapping[str, jax.Array]], dense_layers: Sequence[PackedDense],
                  cross_out_bias: jax.Array, num_heads: int, self_mask: Optional[np.ndarray],
                  memory_mask: Optional[np.ndarray], epsilon: float) -> jax.Array:
  """One `transformer.DecoderLayer` in eval mode (pre-norm, exact GELU), as one kernel call.

  x: (B, T, E). The cross-attention memory as `transformer.fold_cross_attention` rows (H (2E + 1)
  float32 each): shared_memory (S0, H (2E + 1)), the same for every sequence, then batch_memory
  (B, S1, H (2E + 1)) (S1 may be 0).
  norms: norm1, norm2, norm3 LayerNorm params ('scale', 'bias'), (E,).
  dense_layers: self_qkv (E → 3E), self_out, ffn_in (E → F), ffn_out (F → E), all packed by
  `pack_dense` for the kernels in float32, or all in bfloat16: then the layer computes as the
  bfloat16 module does (bfloat16 products summed in float32, activations rounded to bfloat16;
  softmax and LayerNorm statistics in float32).
  cross_out_bias: (E,) the cross-attention out-projection's bias.
  self_mask: (T, T), memory_mask: (T, S0 + S1) bool, True = may attend, or None (all).
  Returns the layer's output, (B, T, E) float32 (bfloat16 numbers in bfloat16). Needs
  `enabled(jnp.float32)`.
  """
  b, t, e = x.shape
  s = shared_memory.shape[0] + batch_memory.shape[1]
  row = num_heads * (2 * e + 1)
  panel_ranks = {layer.kernel.ndim for layer in dense_layers}
  if len(norms) != 3 or len(dense_layers) != 4 or panel_ranks not in ({3}, {4}) or (
      shared_memory.shape[1:] != (row,) or batch_memory.shape[::2] != (b, row)) or (
      cross_out_bias.shape != (e,)):
    raise ValueError(
        'cpu_kernels.decoder_layer: expected x (B, T, E), shared_memory (S0, H (2E + 1)), '
        'batch_memory (B, S1, H (2E + 1)), 3 LayerNorms, 4 Dense layers all packed for the '
        f'kernels and cross_out_bias (E,), with H = {num_heads} heads; got x {x.shape}, '
        f'shared_memory {shared_memory.shape}, batch_memory {batch_memory.shape}, {len(norms)} '
        f'norms, {len(dense_layers)} dense layers with kernels of rank {sorted(panel_ranks)}, '
        f'cross_out_bias {cross_out_bias.shape}')
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

  def packed(layer):
    return [layer.kernel, f32(layer.bias)]

  def norm(params):
    return [f32(params['scale']), f32(params['bias'])]

  self_qkv, self_out, ffn_in, ffn_out = dense_layers
  parameters = [*norm(norms[0]), *packed(self_qkv), *packed(self_out), *norm(norms[1]),
                f32(cross_out_bias), *norm(norms[2]), *packed(ffn_in), *packed(ffn_out)]
  call = jax.ffi.ffi_call(_DECODER_LAYER_TARGET, jax.ShapeDtypeStruct(x.shape, jnp.float32),
                          vmap_method='sequential')
  return call(f32(x), f32(shared_memory), f32(batch_memory),
              _mask_or_all(self_mask, (t, t), 'decoder_layer'),
              _mask_or_all(memory_mask, (t, s), 'decoder_layer'), *parameters,
              num_heads=np.int64(num_heads), epsilon=np.float32(epsilon))


def _check_conv_operands(where: str, x_padded: jax.Array, kernel_shape: tuple[int, ...],
                         out_shape: tuple[int, ...]) -> None:
  kh, kw, c, c_out = kernel_shape
  if x_padded.dtype not in _CONV_TARGETS or x_padded.ndim != 4 or x_padded.shape[-1] != c or (
      c_out % PANEL_WIDTH) or min(out_shape) < 1 or (
          where == 'conv' and x_padded.dtype == jnp.bfloat16 and c % 2):
    raise ValueError(f'cpu_kernels.{where}: expected float32 or bfloat16 padded x (N, Hp, Wp, '
                     f'{c}) and C_out a multiple of {PANEL_WIDTH} for kernel {kernel_shape} (C '
                     f'even for a bfloat16 conv), got x {x_padded.dtype} {x_padded.shape} '
                     f'(output {out_shape})')


def conv_supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                   dtype: Any) -> bool:
  """Whether conv_ops' 'cpu_kernels' convolution can run x (N, H, W, C) with kernel (KH, KW, C,
  C_out) in `dtype` (float32 where `enabled`, bfloat16 where the CPU has AVX512-BF16): C_out a
  multiple of 16, since conv_ops fills up the kernels' panels of 32 output channels with zeros
  (narrower layers would waste most of the products); input gradients of strided convolutions or
  of C not a multiple of 32 come from XLA."""
  c_out = kernel_shape[-1]
  if len(x_shape) != 4 or c_out % (PANEL_WIDTH // 2):
    return False
  if dtype == jnp.bfloat16:
    return _bf16_dense_enabled()
  return enabled(dtype)


def _conv_output_shape(x_padded_shape: tuple[int, ...], kernel_shape: tuple[int, ...],
                      stride: int) -> tuple[int, int, int, int]:
  """(N, Ho, Wo, C_out) of a valid (unpadded) convolution over an already padded input."""
  n, hp, wp, _ = x_padded_shape
  kh, kw, _, c_out = kernel_shape
  return n, (hp - kh) // stride + 1, (wp - kw) // stride + 1, c_out


def _pack_conv_kernel(kernel: jax.Array, mirror: bool) -> jax.Array:
  """(KH, KW, C, C_out) → the conv kernel's (C_out / 32, KH·KW·C, 32) panels; with `mirror`,
  those of the kernel mirrored in space with its channel axes swapped, (C / 32, KH·KW·C_out, 32)."""
  kh, kw, c, c_out = kernel.shape
  if mirror:
    c, c_out = c_out, c
  call = jax.ffi.ffi_call(_PACK_CONV_KERNEL_TARGET,
                          jax.ShapeDtypeStruct((c_out // PANEL_WIDTH, kh * kw * c, PANEL_WIDTH),
                                               jnp.float32), vmap_method='sequential')
  return call(kernel.astype(jnp.float32), mirror=bool(mirror))


def conv_panels(kernel: jax.Array, dtype: Any, mirror: bool = False) -> jax.Array:
  """The panels `conv` reads for kernel (KH, KW, C, C_out), C_out a multiple of 32, in `dtype`:
  float32 (C_out / 32, KH·KW·C, 32); bfloat16 as k-pairs, (C_out / 32, KH·KW·C / 2, 32, 2).
  With `mirror`, those of the kernel mirrored in space with its channel axes swapped. Packing
  reads and writes the whole kernel: a caller that convolves with the same kernel many times
  (sampling) packs it once and passes the panels to `conv`."""
  if dtype == jnp.float32:
    return _pack_conv_kernel(kernel, mirror)
  if mirror:
    kernel = jnp.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  kh, kw, c, c_out = kernel.shape
  return _bf16_pairs(kernel.astype(jnp.bfloat16).reshape(kh * kw * c, c_out))


_CONV_TARGETS = {jnp.dtype(jnp.float32): (_CONV_TARGET, _CONV_KERNEL_GRAD_TARGET),
                 jnp.dtype(jnp.bfloat16): (_CONV_BF16_TARGET, _CONV_KERNEL_GRAD_BF16_TARGET)}


def conv(x_padded: jax.Array, kernel: jax.Array, stride: int, pad: int,
         mirror: bool = False, panels: Optional[jax.Array] = None) -> jax.Array:
  """Valid convolution of x_padded (N, Hp, Wp, C) with kernel (KH, KW, C, C_out), C_out a
  multiple of 32 → (N, Ho, Wo, C_out) in x_padded's dtype. `pad`: how many outer rows and
  columns of x_padded on each side are zeros (taps there are skipped on small maps; 0 is always
  correct). x_padded float32, or bfloat16 with C even: then the kernel is rounded to bfloat16,
  the products summed in float32 and the sums rounded to bfloat16, as XLA's bfloat16
  convolution does.
  mirror: convolve with the kernel mirrored in space and its channel axes swapped instead (given
  as (KH, KW, C_out, C): the input gradient of a stride-1 convolution with it).
  panels: `conv_panels(kernel, x_padded.dtype, mirror)` packed ahead; `kernel` may then be a
  jax.ShapeDtypeStruct of its shape.
  Needs `conv_supported` for x_padded's dtype."""
  kh, kw, c, c_out = kernel.shape
  kernel_shape = (kh, kw, c_out, c) if mirror else kernel.shape
  out_shape = _conv_output_shape(x_padded.shape, kernel_shape, stride)
  _check_conv_operands('conv', x_padded, kernel_shape, out_shape)
  if panels is None:
    panels = conv_panels(kernel, x_padded.dtype, mirror)
  else:
    expected = jax.eval_shape(functools.partial(conv_panels, dtype=x_padded.dtype, mirror=mirror),
                              jax.ShapeDtypeStruct(kernel.shape, jnp.float32))
    if (panels.shape, panels.dtype) != (expected.shape, expected.dtype):
      raise ValueError(f'cpu_kernels.conv: panels {panels.dtype} {panels.shape} are not those of '
                       f'kernel {kernel.shape} for {x_padded.dtype} (expected {expected.dtype} '
                       f'{expected.shape})')
  call = jax.ffi.ffi_call(_CONV_TARGETS[x_padded.dtype][0],
                          jax.ShapeDtypeStruct(out_shape, x_padded.dtype),
                          vmap_method='sequential')
  return call(x_padded, panels, kh=np.int64(kh), kw=np.int64(kw), stride=np.int64(stride),
              pad=np.int64(pad))


# Maps of at most this many pixels `conv` runs position by position, skipping the taps in the
# zero border (csrc/conv_geometry.h, kPositionMajorMaxPixels).
_POSITION_MAJOR_MAX_PIXELS = 36


def winograd_supported(x_shape: tuple[int, ...], kernel_shape: tuple[int, ...], stride: int,
                       dtype: Any) -> bool:
  """Whether `winograd_conv` runs (and pays off for) x (N, H, W, C) with kernel (3, 3, C, C_out)
  at `stride`: float32 where `enabled`, stride 1, C a multiple of 16, C_out of 32, and maps
  larger than those `conv` processes position by position. On those (ResNet-18's 5 × 5 and 3 × 3)
  the direct kernels skip the taps in the border, which Winograd's 2 × 2 tiles pad out instead:
  there it was no faster (kernel gradients, 3 × 3 maps: slower)."""
  return (len(x_shape) == 4 and tuple(kernel_shape[:2]) == (3, 3) and stride == 1 and
          x_shape[1] * x_shape[2] > _POSITION_MAJOR_MAX_PIXELS and x_shape[3] % 16 == 0 and
          kernel_shape[3] % PANEL_WIDTH == 0 and enabled(dtype))


def winograd_panels(kernel: jax.Array, mirror: bool = False) -> jax.Array:
  """kernel (3, 3, C, C_out) → its F(2x2, 3x3) transform G g G^T as `winograd_conv` reads it,
  (16, C_out / 32, C, 32) float32. With `mirror`, that of the kernel mirrored in space with its
  channel axes swapped (the input gradient's), (16, C / 32, C_out, 32)."""
  kh, kw, c, c_out = kernel.shape
  if mirror:
    c, c_out = c_out, c
  if (kh, kw) != (3, 3) or c_out % PANEL_WIDTH:
    raise ValueError(f'cpu_kernels.winograd_panels: expected a kernel (3, 3, C, C_out) with C_out '
                     f'(C if mirrored) a multiple of {PANEL_WIDTH}, got {kernel.shape} '
                     f'(mirror={mirror})')
  out_type = jax.ShapeDtypeStruct((16, c_out // PANEL_WIDTH, c, PANEL_WIDTH), jnp.float32)
  return jax.ffi.ffi_call(_WINOGRAD_PANELS_TARGET, out_type, vmap_method='sequential')(
      kernel.astype(jnp.float32), mirror=bool(mirror))


def winograd_conv(x_padded: jax.Array, panels: jax.Array) -> jax.Array:
  """The 3 × 3 stride-1 convolution of float32 x_padded (N, Hp, Wp, C) (padding included) with
  the kernel whose `winograd_panels` are given → (N, Hp - 2, Wp - 2, C_out), computed by
  Winograd's F(2x2, 3x3) (csrc/winograd.cc). Needs `winograd_supported`."""
  n, hp, wp, c = x_padded.shape
  if x_padded.dtype != jnp.float32 or panels.ndim != 4 or panels.shape[0] != 16 or (
      panels.shape[2:] != (c, PANEL_WIDTH)) or c % 16 or min(hp, wp) < 3:
    raise ValueError(f'cpu_kernels.winograd_conv: expected float32 x (N, Hp, Wp, C), C a '
                     f'multiple of 16, and panels (16, C_out / 32, C, 32), got x '
                     f'{x_padded.dtype} {x_padded.shape} and panels {panels.shape}')
  out_type = jax.ShapeDtypeStruct((n, hp - 2, wp - 2, panels.shape[1] * PANEL_WIDTH),
                                  jnp.float32)
  return jax.ffi.ffi_call(_WINOGRAD_CONV_TARGET, out_type, vmap_method='sequential')(
      x_padded, panels)


def winograd_kernel_grad(x_padded: jax.Array, grad: jax.Array) -> jax.Array:
  """The gradient of `winograd_conv(x_padded, winograd_panels(kernel))` with respect to the
  kernel, for the float32 output gradient `grad` (N, Hp - 2, Wp - 2, C_out) → (3, 3, C, C_out),
  by F(2x2, 3x3) too. Needs `winograd_supported`."""
  n, hp, wp, c = x_padded.shape
  c_out = grad.shape[-1]
  if x_padded.dtype != jnp.float32 or grad.dtype != jnp.float32 or c % 16 or (
      c_out % PANEL_WIDTH) or grad.shape != (n, hp - 2, wp - 2, c_out):
    raise ValueError(f'cpu_kernels.winograd_kernel_grad: expected float32 x (N, Hp, Wp, C), C a '
                     f'multiple of 16, and grad (N, Hp - 2, Wp - 2, C_out), C_out a multiple of '
                     f'{PANEL_WIDTH}, got x {x_padded.dtype} {x_padded.shape} and grad '
                     f'{grad.dtype} {grad.shape}')
  out_type = jax.ShapeDtypeStruct((3, 3, c, c_out), jnp.float32)
  return jax.ffi.ffi_call(_WINOGRAD_KERNEL_GRAD_TARGET, out_type, vmap_method='sequential')(
      x_padded, grad)


def conv_kernel_grad(x_padded: jax.Array, grad: jax.Array, kernel_shape: tuple[int, ...],
                     stride: int, pad: int) -> jax.Array:
  """The gradient of `conv(x_padded, kernel, stride, pad)` with respect to the kernel, for the
  output gradient `grad` (N, Ho, Wo, C_out) in x_padded's dtype → float32 (KH, KW, C, C_out)
  (bfloat16 operands: their products summed in float32). Needs `conv_supported`."""
  out_shape = _conv_output_shape(x_padded.shape, kernel_shape, stride)
  _check_conv_operands('conv_kernel_grad', x_padded, kernel_shape, out_shape)
  if grad.shape != out_shape or grad.dtype != x_padded.dtype:
    raise ValueError(f'cpu_kernels.conv_kernel_grad: expected {x_padded.dtype} grad {out_shape}, '
                     f'got {grad.dtype} {grad.shape}')
  call = jax.ffi.ffi_call(_CONV_TARGETS[x_padded.dtype][1],
                          jax.ShapeDtypeStruct(tuple(kernel_shape), jnp.float32),
                          vmap_method='sequential')
  return call(x_padded, grad, stride=np.int64(stride), pad=np.int64(pad))


def moments_supported(shape: tuple[int, ...], dtype: Any) -> bool:
  """Whether `channel_moments` runs operands of `shape` (N, P, C) and `dtype`: float32 or
  bfloat16, C a multiple of 16, where `enabled(jnp.float32)`."""
  return (len(shape) == 3 and shape[-1] % 16 == 0 and jnp.dtype(dtype) in _MOMENTS_TARGETS and
          enabled(jnp.float32))


def channel_moments(u: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(sum_p u, sum_p u·v) over axis 1 of u and v (N, P, C) (same dtype and shape), in float32,
  each (N, C): GroupNorm's statistics (u = v = x) and its backward's (u = dy, v = x). XLA:CPU
  runs such reductions at 1-2 G values/s. Needs `moments_supported`."""
  if u.shape != v.shape or u.dtype != v.dtype or not moments_supported(u.shape, u.dtype):
    raise ValueError(f'cpu_kernels.channel_moments: expected u and v of one shape (N, P, C), C '
                     f'a multiple of 16, float32 or bfloat16, got {u.dtype} {u.shape} and '
                     f'{v.dtype} {v.shape}')
  result = jax.ShapeDtypeStruct((u.shape[0], u.shape[2]), jnp.float32)
  call = jax.ffi.ffi_call(_MOMENTS_TARGETS[u.dtype], (result, result), vmap_method='sequential')
  return call(u, v)


def _pooled_shape(x_shape: tuple[int, ...]) -> tuple[int, int, int, int]:
  n, h, w, c = x_shape
  return n, (h - 1) // 2 + 1, (w - 1) // 2 + 1, c


def max_pool(x: jax.Array) -> tuple[jax.Array, jax.Array]:
  """torch's MaxPool2d(3, stride=2, padding=1) of float32 x (N, H, W, C) → the maxima and, as
  int8, which of the 9 window offsets (row-major; the first maximum, or the last NaN) held each,
  both (N,
  ceil(H/2), ceil(W/2), C). Needs `enabled(jnp.float32)`."""
  if x.dtype != jnp.float32 or x.ndim != 4:
    raise ValueError(f'cpu_kernels.max_pool: expected float32 x (N, H, W, C), got {x.dtype} '
                     f'{x.shape}')
  shape = _pooled_shape(x.shape)
  call = jax.ffi.ffi_call(_MAX_POOL_TARGET, (jax.ShapeDtypeStruct(shape, jnp.float32),
                                             jax.ShapeDtypeStruct(shape, jnp.int8)),
                          vmap_method='sequential')
  return call(x)


def max_pool_grad(argmax: jax.Array, grad: jax.Array, x_shape: tuple[int, ...]) -> jax.Array:
  """The input gradient (x_shape) of `max_pool` for its int8 `argmax` and the float32 output
  gradient. Needs `enabled(jnp.float32)`."""
  shape = _pooled_shape(x_shape)
  if argmax.shape != shape or argmax.dtype != jnp.int8 or grad.shape != shape or (
      grad.dtype != jnp.float32):
    raise ValueError(f'cpu_kernels.max_pool_grad: expected int8 argmax and float32 grad {shape} '
                     f'for x {tuple(x_shape)}, got {argmax.dtype} {argmax.shape} and '
                     f'{grad.dtype} {grad.shape}')
  call = jax.ffi.ffi_call(_MAX_POOL_GRAD_TARGET, jax.ShapeDtypeStruct(tuple(x_shape), jnp.float32),
                          vmap_method='sequential')
  return call(argmax, grad)


if __name__ == '__main__':
  print(build())
