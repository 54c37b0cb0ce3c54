"""Pallas (Triton) kernels for the decoder layers of a denoising step on a GPU.

At batch 1 a denoising step multiplies ten token rows by 7.3 M weights: on a GPU its time goes
to launching and waiting for XLA's many small kernels per layer, not to arithmetic
(docs/performance.md). Here a decoder layer is four kernels:

  self-attention block: LayerNorm → one head's q, k, v → masked attention → that head's share of
      the out-projection (grid: batch × heads);
  cross-attention block: the same with the memory's precomputed keys and values;
  FFN in: LayerNorm → Linear → exact GELU, one block of hidden units per program;
  FFN out: Linear + residual, one block of output columns per program.

An attention block writes one partial sum per head (the first head's also holds the residual and
the out-projection's bias); the next kernel adds them up as it reads its input, so no launch is
spent on the reduction. Triton's blocks are powers of two: tokens and memory rows are padded to
at least 16 (padded keys are masked; padded query rows are dropped at the end). The residual
stream is float32 between kernels; products take the layers' dtype (float32 products run in
TF32, as XLA's default matmul precision does on the GPU) and accumulate in float32.
"""

import contextlib
import functools
import math
from typing import Any, Mapping, Optional, Sequence

import jax
from jax import lax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu
import numpy as np

_MIN_ROWS = 16  # The smallest operand side of Triton's dot.
_K_CHUNK = 64  # Rows of a weight tile loaded per step of a reduction loop.
_FFN_IN_BLOCK = 64  # Hidden units per FFN-in program.
_FFN_OUT_BLOCK = 32  # Output columns per FFN-out program.
_NUM_WARPS = 4
_NUM_STAGES = 2

_interpret_depth = 0
_disabled_depth = 0


@contextlib.contextmanager
def interpreted():
  """Inside this context the kernels are enabled on any backend and run in Pallas' interpreter
  (to test them on a CPU). jit's trace caches are cleared on entry and exit."""
  global _interpret_depth
  jax.clear_caches()
  _interpret_depth += 1
  try:
    yield
  finally:
    _interpret_depth -= 1
    jax.clear_caches()


@contextlib.contextmanager
def disabled():
  """Inside this context `enabled` is False: XLA's ops only (to compare). jit's trace caches are
  cleared on entry and exit."""
  global _disabled_depth
  jax.clear_caches()
  _disabled_depth += 1
  try:
    yield
  finally:
    _disabled_depth -= 1
    jax.clear_caches()


def enabled() -> bool:
  """Whether the decoder layers run on these kernels: on a GPU backend, or interpreted."""
  return not _disabled_depth and (_interpret_depth > 0 or jax.default_backend() == 'gpu')


def _power_of_two(n: int) -> bool:
  return n >= _MIN_ROWS and n & (n - 1) == 0


def supports(n_emb: int, num_heads: int, ffn_dim: int) -> bool:
  """Whether a decoder layer of these sizes fits the kernels' power-of-two blocks."""
  return (n_emb % num_heads == 0 and _power_of_two(n_emb) and _power_of_two(n_emb // num_heads)
          and _power_of_two(ffn_dim) and ffn_dim >= _FFN_IN_BLOCK and n_emb >= _K_CHUNK)


def _padded(n: int) -> int:
  return max(_MIN_ROWS, pl.next_power_of_2(n))


def _row_sum(parts_ref, cols) -> jax.Array:
  """(P, T, E) partial sums → their sum over P of columns `cols`, (T, cols) float32."""
  x = parts_ref[0, :, cols]
  for p in range(1, parts_ref.shape[0]):
    x += parts_ref[p, :, cols]
  return x


def _normalize_and_project(parts_ref, scale_ref, bias_ref, weight_refs, eps: float, dtype: Any):
  """LayerNorm(sum of parts) @ each weight (E, N) → tuple of (T, N) float32, K-chunked."""
  x = _row_sum(parts_ref, slice(None))
  mean = jnp.mean(x, axis=1, keepdims=True)
  centered = x - mean
  rstd = lax.rsqrt(jnp.mean(centered * centered, axis=1, keepdims=True) + eps)

  def accumulate(i, sums):
    cols = pl.ds(pl.multiple_of(i * _K_CHUNK, _K_CHUNK), _K_CHUNK)
    y = ((_row_sum(parts_ref, cols) - mean) * rstd * scale_ref[:, cols]
         + bias_ref[:, cols]).astype(dtype)
    return tuple(s + jnp.dot(y, w_ref[cols, :], preferred_element_type=jnp.float32)
                 for s, w_ref in zip(sums, weight_refs))

  rows = parts_ref.shape[1]
  init = tuple(jnp.zeros((rows, w_ref.shape[1]), jnp.float32) for w_ref in weight_refs)
  return lax.fori_loop(0, parts_ref.shape[2] // _K_CHUNK, accumulate, init)


def _biased(product: jax.Array, bias_ref, dtype: Any) -> jax.Array:
  return (product + bias_ref[...].astype(jnp.float32)).astype(dtype)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array, dtype: Any) -> jax.Array:
  """One head: q (T, D), k and v (S, D), mask (T, S) int32 (nonzero = may attend) → (T, D)."""
  logits = lax.dot_general(q, k, (((1,), (1,)), ((), ())), preferred_element_type=jnp.float32)
  logits = jnp.where(mask != 0, logits * (1.0 / math.sqrt(q.shape[1])),
                     jnp.finfo(jnp.float32).min)
  weights = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  weights = weights / jnp.sum(weights, axis=1, keepdims=True)
  return jnp.dot(weights.astype(dtype), v, preferred_element_type=jnp.float32).astype(dtype)


def _project_out(attended: jax.Array, weight_ref, bias_ref, parts_ref, out_ref):
  """out = attended (T, D) @ this head's rows of the out-projection (D, E); the first head adds
  the residual (the input's parts) and the bias."""
  first_head = pl.program_id(1) == 0
  e = out_ref.shape[1]
  for start in range(0, e, _K_CHUNK):
    cols = pl.ds(start, _K_CHUNK)
    residual = _row_sum(parts_ref, cols) + bias_ref[:, cols].astype(jnp.float32)
    out_ref[:, cols] = (jnp.dot(attended, weight_ref[:, cols], preferred_element_type=jnp.float32)
                        + jnp.where(first_head, residual, 0.0))


def _self_attention_kernel(parts_ref, scale_ref, bias_ref, wq_ref, wk_ref, wv_ref, bq_ref, bk_ref,
                           bv_ref, mask_ref, wo_ref, bo_ref, out_ref, *, eps, dtype):
  q, k, v = _normalize_and_project(parts_ref, scale_ref, bias_ref, (wq_ref, wk_ref, wv_ref), eps,
                                   dtype)
  attended = _attend(_biased(q, bq_ref, dtype), _biased(k, bk_ref, dtype),
                     _biased(v, bv_ref, dtype), mask_ref[...], dtype)
  _project_out(attended, wo_ref, bo_ref, parts_ref, out_ref)


def _cross_attention_kernel(parts_ref, scale_ref, bias_ref, wq_ref, bq_ref, k_ref, v_ref,
                            mask_ref, wo_ref, bo_ref, out_ref, *, eps, dtype):
  (q,) = _normalize_and_project(parts_ref, scale_ref, bias_ref, (wq_ref,), eps, dtype)
  attended = _attend(_biased(q, bq_ref, dtype), k_ref[...], v_ref[...], mask_ref[...], dtype)
  _project_out(attended, wo_ref, bo_ref, parts_ref, out_ref)


# Eigen's float32 erf (as XLA's): x·P(x²)/Q(x²) on x clipped to ±4; Triton has no erf.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06,
          -5.69250639462346e-05, -7.34990630326855e-04, -2.95459980854025e-03,
          -1.60960333262415e-02)
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03,
          -7.37332916720468e-03, -1.42647390514189e-02)


def _erf(x: jax.Array) -> jax.Array:
  x = jnp.clip(x, -4.0, 4.0)
  x2 = x * x
  p = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_P[1:], jnp.full_like(x, _ERF_P[0]))
  q = functools.reduce(lambda acc, c: acc * x2 + c, _ERF_Q[1:], jnp.full_like(x, _ERF_Q[0]))
  return x * p / q


def _ffn_in_kernel(parts_ref, scale_ref, bias_ref, w_ref, b_ref, out_ref, *, eps, dtype):
  (h,) = _normalize_and_project(parts_ref, scale_ref, bias_ref, (w_ref,), eps, dtype)
  h = h + b_ref[...].astype(jnp.float32)
  out_ref[...] = (0.5 * h * (1.0 + _erf(h * (1.0 / math.sqrt(2.0))))).astype(out_ref.dtype)


def _ffn_out_kernel(hidden_ref, w_ref, b_ref, parts_ref, out_ref):
  def accumulate(i, total):
    rows = pl.ds(pl.multiple_of(i * _K_CHUNK, _K_CHUNK), _K_CHUNK)
    return total + jnp.dot(hidden_ref[:, rows], w_ref[rows, :], preferred_element_type=jnp.float32)

  init = jnp.zeros(out_ref.shape, jnp.float32)
  total = lax.fori_loop(0, hidden_ref.shape[1] // _K_CHUNK, accumulate, init)
  out_ref[...] = total + b_ref[...].astype(jnp.float32) + _row_sum(parts_ref, slice(None))


def _mask_array(mask: Optional[np.ndarray], shape: tuple[int, int], valid: tuple[int, int]):
  """(t, s) bool or None (all) → (T, S) int32 padded: padded keys masked, padded queries see
  the valid keys (their outputs are dropped; a row with no key would be all-masked)."""
  t, s = valid
  padded = np.zeros(shape, np.int32)
  padded[:, :s] = 1
  if mask is not None:
    padded[:t, :s] = np.asarray(mask, bool)
  return jnp.asarray(padded)


def _row(vector: jax.Array) -> jax.Array:
  return vector.reshape(1, -1)


class _Calls:
  """The four pallas_calls of a layer, for batch `b`, padded tokens `tp` and memory rows `sp`."""

  def __init__(self, b: int, tp: int, sp: int, e: int, ffn_dim: int, heads: int, dtype: Any,
               eps: float):
    self.b, self.tp, self.sp, self.e, self.ffn_dim, self.heads = b, tp, sp, e, ffn_dim, heads
    self.dtype, self.eps = dtype, eps
    self.d = e // heads

  def _call(self, kernel, name: str, grid, in_specs, out_spec, out_shape, **params):
    return pl.pallas_call(
        functools.partial(kernel, **params), out_shape=out_shape, grid=grid, in_specs=in_specs,
        out_specs=out_spec, interpret=_interpret_depth > 0, name=name,
        compiler_params=plgpu.CompilerParams(num_warps=_NUM_WARPS, num_stages=_NUM_STAGES))

  def _parts_spec(self, num_parts: int) -> pl.BlockSpec:
    return pl.BlockSpec((pl.squeezed, num_parts, self.tp, self.e), lambda b, j: (b, 0, 0, 0))

  def _head_parts(self) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct((self.b, self.heads, self.tp, self.e), jnp.float32)

  def _full(self, shape) -> pl.BlockSpec:
    return pl.BlockSpec(shape, lambda b, j: (0,) * len(shape))

  def _columns(self, rows: int, width: int, offset: int = 0) -> pl.BlockSpec:
    return pl.BlockSpec((rows, width), lambda b, j: (0, offset + j))

  def attention(self, parts, norm, qkv, v_or_kv, mask, out, cross: bool):
    """One attention block → (B, heads, T, E) partial sums."""
    e, d, h = self.e, self.d, self.heads
    out_specs = [pl.BlockSpec((d, e), lambda b, j: (j, 0)), self._full((1, e))]
    norm_specs = [self._parts_spec(parts.shape[1]), self._full((1, e)), self._full((1, e))]
    if cross:
      memory = pl.BlockSpec((pl.squeezed, self.sp, d), lambda b, j: (b, 0, j))
      memory_v = pl.BlockSpec((pl.squeezed, self.sp, d), lambda b, j: (b, 0, h + j))
      in_specs = norm_specs + [self._columns(e, d), self._columns(1, d), memory, memory_v,
                               self._full(mask.shape)] + out_specs
      args = (qkv.kernel, _row(qkv.bias), v_or_kv, v_or_kv)
      kernel, name = _cross_attention_kernel, 'dpjax_cross_attention'
    else:
      weights = [self._columns(e, d, part * h) for part in range(3)]
      biases = [self._columns(1, d, part * h) for part in range(3)]
      in_specs = norm_specs + weights + biases + [self._full(mask.shape)] + out_specs
      args = (qkv.kernel,) * 3 + (_row(qkv.bias),) * 3
      kernel, name = _self_attention_kernel, 'dpjax_self_attention'
    call = self._call(kernel, name, (self.b, h), in_specs,
                      pl.BlockSpec((pl.squeezed, pl.squeezed, self.tp, e),
                                   lambda b, j: (b, j, 0, 0)),
                      self._head_parts(), eps=self.eps, dtype=self.dtype)
    return call(parts, _row(norm['scale']), _row(norm['bias']), *args, mask, out.kernel,
                _row(out.bias))

  def ffn(self, parts, norm, ffn_in, ffn_out):
    """LayerNorm → FFN → + residual → (B, 1, T, E)."""
    e, f, tp = self.e, self.ffn_dim, self.tp
    hidden = self._call(
        _ffn_in_kernel, 'dpjax_ffn_in', (self.b, f // _FFN_IN_BLOCK),
        [self._parts_spec(parts.shape[1]), self._full((1, e)), self._full((1, e)),
         self._columns(e, _FFN_IN_BLOCK), self._columns(1, _FFN_IN_BLOCK)],
        pl.BlockSpec((pl.squeezed, tp, _FFN_IN_BLOCK), lambda b, j: (b, 0, j)),
        jax.ShapeDtypeStruct((self.b, tp, f), self.dtype), eps=self.eps, dtype=self.dtype)(
            parts, _row(norm['scale']), _row(norm['bias']), ffn_in.kernel, _row(ffn_in.bias))
    block = _FFN_OUT_BLOCK
    return self._call(
        _ffn_out_kernel, 'dpjax_ffn_out', (self.b, e // block),
        [pl.BlockSpec((pl.squeezed, tp, f), lambda b, j: (b, 0, 0)), self._columns(f, block),
         self._columns(1, block),
         pl.BlockSpec((pl.squeezed, parts.shape[1], tp, block), lambda b, j: (b, 0, 0, j))],
        pl.BlockSpec((pl.squeezed, pl.squeezed, tp, block), lambda b, j: (b, 0, 0, j)),
        jax.ShapeDtypeStruct((self.b, 1, tp, e), jnp.float32))(
            hidden, ffn_out.kernel, _row(ffn_out.bias), parts)


def decoder_layers(x: jax.Array, memory_kv: jax.Array, norms: Sequence[Mapping[str, Any]],
                   layers: Sequence[Any], num_heads: int, self_mask: Optional[np.ndarray],
                   memory_mask: Optional[np.ndarray], eps: float) -> jax.Array:
  """The pre-norm decoder layers (eval mode) on these kernels.

  Args:
    x: (B, t, E) the action tokens entering the first layer.
    memory_kv: (n_layer, B, S, 2E) each layer's cross-attention [K | V] of the memory, in the
      layers' dtype.
    norms: per layer, the (norm1, norm2, norm3) LayerNorm parameters.
    layers: per layer, `transformer.CachedDecoderLayer` of unpacked (K, N) Dense weights.
    num_heads: attention heads.
    self_mask, memory_mask: (t, t) and (t, S) bool (True = may attend), or None for all.
    eps: LayerNorm epsilon.
  Returns (B, t, E) float32.
  """
  b, t, e = x.shape
  s = memory_kv.shape[2]
  dtype = layers[0].self_qkv.kernel.dtype
  tp, sp = _padded(t), _padded(s)
  calls = _Calls(b, tp, sp, e, layers[0].ffn_in.kernel.shape[1], num_heads, dtype, eps)
  self_mask = _mask_array(self_mask, (tp, tp), (t, t))
  memory_mask = _mask_array(memory_mask, (tp, sp), (t, s))
  memory_kv = jnp.pad(memory_kv.astype(dtype), ((0, 0), (0, 0), (0, sp - s), (0, 0)))
  parts = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, tp - t), (0, 0)))[:, None]
  for (norm1, norm2, norm3), dense, kv in zip(norms, layers, memory_kv):
    parts = calls.attention(parts, norm1, dense.self_qkv, None, self_mask, dense.self_out,
                            cross=False)
    parts = calls.attention(parts, norm2, dense.cross_q, kv, memory_mask, dense.cross_out,
                            cross=True)
    parts = calls.ffn(parts, norm3, dense.ffn_in, dense.ffn_out)
  return parts[:, 0, :t]
