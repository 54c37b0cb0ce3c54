"""The cached denoising step's decoder layers as four Pallas (Triton) kernels each, for GPUs.

At batch 1 a GPU denoising step is bound by how many dependent kernels it launches, not by
arithmetic: on an H200 each of the ≈ 200 kernels XLA made of a step took ≈ 1.3 µs, and XLA's
ops need ≥ 16 kernels per decoder layer (docs/performance.md; scripts/gpu_kernels.py counts
them). Each kernel here splits only its weight product across programs, by output columns,
and every program recomputes the cheap row-wise work before that product — LayerNorm, the
heads' attention over ≤ 128 stacked rows, the folded cross-attention's few memory rows — so
one layer is:

  1. LayerNorm 1 → self-attention in-projection                          → q, k, v head-major
  2. self-attention (all heads in one masked product) → out-projection + residual → x
  3. LayerNorm 2 → folded cross-attention (all heads on all memory rows in one product)
     + residual (→ x, program 0) → LayerNorm 3 → FFN in-projection → exact GELU → hidden
  4. FFN out-projection (a pipelined loop over its 4E rows) + residual   → x

Written so that a program's loads are issued together rather than one product's operands at a
time (Triton stages every product operand through shared memory behind a barrier, so a load
used before the next is issued is a serial L2 round trip): docs/performance.md, session 19 —
and without register spills, which loading 100 KB or more at once into registers caused
(session 21): larger operands go through a loop that Triton pipelines into shared memory.

Arithmetic as `transformer.cached_denoise`'s XLA path: products in the weights' dtype with
float32 accumulation (float32 products at XLA:GPU's default precision), softmax and LayerNorm
statistics in float32; the residual stream stays float32 between the kernels. Tokens are padded
to a power of two ≥ 16 (Triton's tile sizes); padded rows are never attended to.

`interpreted()` runs the same kernels on any backend in Pallas' interpreter, which is how the
tests check them on a CPU.
"""

import contextlib
import functools
import math
from typing import Any, Iterator, Mapping, Optional, Sequence

import jax
import jax.numpy as jnp
from jax.experimental import pallas as pl
from jax.experimental.pallas import triton as plgpu

# Output columns per program: ≥ 16 (Triton's smallest product tile), and small enough that a
# batch-1 product still spreads its weights over 8–32 of the GPU's SMs.
_PROJECTION_COLUMNS = 32  # The in-projections, E → 3E and E → 4E.
_OUT_COLUMNS = 16  # The products back to E columns (the FFN's reads 4E rows per column).
_MIN_TILE = 16  # Triton's smallest product dimension.
_COMPILER_PARAMS = plgpu.CompilerParams(num_warps=4, num_stages=1)
# The FFN out-projection's weight rows per pipelined load (`_ffn_out_kernel`).
_FFN_OUT_CHUNK = 256
# Software-pipelining depth (Triton's num_stages) of a kernel's loop: the FFN out-projection's
# 4E = 1024 rows (Lift) in 4 chunks, three in flight ahead of the one in use (96 KB of shared
# memory in float32).
_MAX_STAGES = 4
_MASKED = float(jnp.finfo(jnp.float32).min)  # A masked logit.

_interpret_depth = 0


@contextlib.contextmanager
def interpreted() -> Iterator[None]:
  """Within: `runs_here()` holds on every backend and the kernels run in Pallas' interpreter."""
  global _interpret_depth
  _interpret_depth += 1
  try:
    yield
  finally:
    _interpret_depth -= 1


def _pipelined(chunks: int) -> plgpu.CompilerParams:
  """Compiler parameters for a kernel whose loop over `chunks` chunks Triton pipelines: up to
  _MAX_STAGES − 1 chunks' loads in flight ahead of the one in use (asynchronous copies into
  shared memory, not through registers)."""
  return plgpu.CompilerParams(num_warps=4, num_stages=min(_MAX_STAGES, chunks))


def _is_power_of_two(n: int) -> bool:
  return n > 0 and n & (n - 1) == 0


def fits(n_emb: int, n_head: int, tokens: int, memory_rows: int) -> bool:
  """Whether the kernels take a decoder of these sizes: Triton's tiles need E ≥ 32 and the head
  width E / H ≥ 16, both powers of two; the stacked self-attention's H · T' rows and the
  memory tile's R rows (H per memory row: the time row and the observation rows) at most 128,
  R at most E."""
  return (_is_power_of_two(n_emb) and n_emb >= _PROJECTION_COLUMNS and n_emb % n_head == 0
          and _is_power_of_two(n_emb // n_head) and n_emb // n_head >= 16
          and n_head * padded_tokens(tokens) <= 128
          and memory_tile_rows(n_head, memory_rows) <= min(n_emb, 128))


def runs_here() -> bool:
  """Whether the kernels run on this backend: a single GPU (XLA's SPMD partitioner cannot
  split a kernel call over a mesh), or anything within `interpreted()`."""
  on_gpu = jax.default_backend() == 'gpu' and jax.device_count() == 1
  return on_gpu or _interpret_depth > 0


def padded_tokens(tokens: int) -> int:
  """T': the rows the kernels give `tokens` tokens, a power of two ≥ 16 (Triton's tiles)."""
  return max(_MIN_TILE, 1 << (tokens - 1).bit_length())


def _product(x: jax.Array, weights: jax.Array, transpose_weights: bool = False) -> jax.Array:
  """x @ weights (or weights transposed) in the weights' dtype, accumulated in float32."""
  contract = (1,) if transpose_weights else (0,)
  return jax.lax.dot_general(x.astype(weights.dtype), weights, (((1,), contract), ((), ())),
                             preferred_element_type=jnp.float32)


def _layer_norm(x: jax.Array, scale: jax.Array, bias: jax.Array, eps: float) -> jax.Array:
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(centred * centred, axis=-1, keepdims=True) + eps)
  return centred * inv_std * scale[None, :] + bias[None, :]


def _erf(x: jax.Array) -> jax.Array:
  """erf to ≤ 1.5e-7 (Abramowitz & Stegun 7.1.26): Pallas' Triton lowering has no erf."""
  a = jnp.abs(x)
  t = 1.0 / (1.0 + 0.3275911 * a)
  poly = t * (0.254829592 + t * (-0.284496736 + t * (1.421413741 + t * (-1.453152027
                                                                          + t * 1.061405429))))
  magnitude = 1.0 - poly * jnp.exp(-a * a)
  return jnp.where(x < 0, -magnitude, magnitude)


def _qkv_kernel(x_ref, scale_ref, shift_ref, w_ref, b_ref, qkv_ref, *, eps):
  y = _layer_norm(x_ref[...], scale_ref[...], shift_ref[...], eps)
  qkv_ref[...] = _product(y, w_ref[...]) + b_ref[...].astype(jnp.float32)[None, :]


def _self_attention_kernel(qkv_ref, x_ref, w_ref, b_ref, out_ref, *, num_heads, length, causal):
  """Every head at once: q, k and v come head-major, (H·T', d) with row h·T' + t, so the heads'
  attention is one masked (H·T', H·T') product (Pallas' Triton dot has no batch dimension, and
  a product per head would serialise its loads)."""
  dtype = w_ref.dtype
  stacked, d = qkv_ref.shape[1:]
  padded = stacked // num_heads
  e = num_heads * d
  q, k, v = (qkv_ref[part].astype(dtype) for part in range(3))
  out = x_ref[...] + b_ref[...].astype(jnp.float32)[None, :]
  weights = w_ref[...]

  def iota(shape, axis):
    return jax.lax.broadcasted_iota(jnp.int32, shape, axis)

  row, col = iota((stacked, stacked), 0), iota((stacked, stacked), 1)
  visible = row // padded == col // padded
  visible &= (col % padded <= row % padded) if causal else (col % padded < length)
  logits = jnp.where(visible, _product(q, k, transpose_weights=True) / math.sqrt(d), _MASKED)
  exps = jnp.exp(logits - jnp.max(logits, axis=1, keepdims=True))
  attended = _product(exps / jnp.sum(exps, axis=1, keepdims=True), v)  # (H·T', d)
  # Back to (T', E), head h in columns h·d…: tile the features across every head's columns,
  # keep each row's own head, then sum each token's H rows. 0/1 products only move values
  # (rounded to the product precision, as the out-projection's operand would be).
  tiled = _product(attended, (iota((d, e), 0) == iota((d, e), 1) % d).astype(dtype))
  own_head = iota((stacked, e), 0) // padded == iota((stacked, e), 1) // d
  tokens = (iota((padded, stacked), 0) == iota((padded, stacked), 1) % padded).astype(dtype)
  heads = _product(tokens, jnp.where(own_head, tiled, 0.0).astype(dtype))
  out_ref[...] = out + _product(heads, weights)


def memory_tile_rows(num_heads: int, memory_rows: int) -> int:
  """R: the rows of the tile that stacks every head of `memory_rows` folded memory rows (the
  time row, then the observation rows), a power of two ≥ 16 (Triton's smallest product tile)."""
  return padded_tokens(memory_rows * num_heads)


def memory_blocks(rows: jax.Array, num_heads: int, first_row: int,
                  memory_rows: int) -> jax.Array:
  """Folded memory rows (..., S, H (2E + 1)) (`transformer.fold_cross_attention`) that are rows
  [first_row, first_row + S) of a layer's `memory_rows` → (..., 2R + 1, E), R =
  `memory_tile_rows`, the form the kernels read: memory row s, head h at row (first_row + s) H + h
  of the scores [0, R) and of the values [R, 2R), its offset in row 2R at that column; zeros
  elsewhere. The step's time row (first_row 0) and the observation rows (first_row 1) are kept
  apart in this form and added by the kernel into one tile: the attention of all heads on all
  memory rows is then one product for the logits and one for the output."""
  e = (rows.shape[-1] // num_heads - 1) // 2
  tile = memory_tile_rows(num_heads, memory_rows)
  lead, stacked = rows.shape[:-2], rows.shape[-2] * num_heads
  before, after = first_row * num_heads, tile - first_row * num_heads - stacked
  unpadded = [(0, 0)] * len(lead)

  def head_rows(part):  # (..., S, H · E) → (..., R, E)
    return jnp.pad(part.reshape(lead + (stacked, e)), unpadded + [(before, after), (0, 0)])

  he = num_heads * e
  offsets = jnp.pad(rows[..., 2 * he:].reshape(lead + (stacked,)),
                    unpadded + [(before, e - before - stacked)])
  return jnp.concatenate([head_rows(rows[..., :he]), head_rows(rows[..., he:2 * he]),
                          offsets[..., None, :]], axis=-2)


def _cross_attention_ffn_in_kernel(x_ref, norm2_scale_ref, norm2_shift_ref, time_ref, *refs,
                                   layer, num_heads, num_obs, memory_causal, eps):
  """Cross-attention on the folded memory in `memory_blocks` form — the step's time rows
  time_ref[layer] and, with `num_obs`, the sequence's observation rows — added into one tile:
  every head's logits on every memory row are one product, the output another; each head's
  softmax runs over its columns."""
  own_ref = refs[0] if num_obs else None
  (out_bias_ref, norm3_scale_ref, norm3_shift_ref, w_ref, b_ref, hidden_ref,
   x_out_ref) = refs[1:] if num_obs else refs
  x = x_ref[...]
  padded = x.shape[0]
  tile = (time_ref.shape[1] - 1) // 2

  def load(rows_ref, *row):  # scores (R, E), values (R, E), offsets (R,)
    return (rows_ref[(*row, pl.ds(0, tile), slice(None))],
            rows_ref[(*row, pl.ds(tile, tile), slice(None))],
            rows_ref[(*row, 2 * tile, pl.ds(0, tile))])

  scores, values, offsets = load(time_ref, layer)
  if num_obs:
    scores, values, offsets = (a + b for a, b in zip((scores, values, offsets), load(own_ref)))
  weights, bias = w_ref[...], b_ref[...].astype(jnp.float32)[None, :]
  y = _layer_norm(x, norm2_scale_ref[...], norm2_shift_ref[...], eps)
  logits = _product(y, scores, transpose_weights=True) + offsets[None, :]  # (T', R)
  query = jax.lax.broadcasted_iota(jnp.int32, (padded, tile), 0)
  column = jax.lax.broadcasted_iota(jnp.int32, (padded, tile), 1)
  memory_row, head = column // num_heads, column % num_heads
  visible = memory_row <= num_obs
  if memory_causal:  # Observation row s ≥ 1 is step s − 1, seen by action token t iff t ≥ s − 1.
    visible &= query >= memory_row - 1
  logits = jnp.where(visible, logits, _MASKED)
  # Each head's softmax over its columns h, H + h, …: its maximum and sum by masked row
  # reductions, spread back to its columns.
  own_head = [head == h for h in range(num_heads)]

  def per_head(reduce, array, fill):
    return functools.reduce(jnp.add, [
        jnp.where(mask, reduce(jnp.where(mask, array, fill), axis=1, keepdims=True), 0.0)
        for mask in own_head])

  exps = jnp.where(visible, jnp.exp(logits - per_head(jnp.max, logits, _MASKED)), 0.0)
  # The time row is visible to every token, so no head's sum is zero.
  attended = (x + out_bias_ref[...][None, :]
              + _product(exps / per_head(jnp.sum, exps, 0.0), values))

  @pl.when(pl.program_id(1) == 0)
  def _():
    x_out_ref[...] = attended

  y = _layer_norm(attended, norm3_scale_ref[...], norm3_shift_ref[...], eps)
  z = _product(y, weights) + bias
  hidden_ref[...] = 0.5 * z * (1.0 + _erf(z * (1.0 / math.sqrt(2.0))))


def _ffn_out_kernel(hidden_ref, x_ref, w_ref, b_ref, out_ref, *, chunk):
  """The 4E-long product in a loop over `chunk` rows of the weights, which Triton pipelines
  (`_pipelined`): the next chunks' loads in flight while one is multiplied, straight into shared
  memory. As one product its 128 KB of float32 operands went through registers, and ptxas
  spilled them (3.6 KB per thread, docs/performance.md, session 21)."""

  def accumulate(i, total):
    rows = pl.ds(pl.multiple_of(i * chunk, chunk), chunk)
    return total + _product(hidden_ref[:, rows], w_ref[rows, :])

  total = jax.lax.fori_loop(0, w_ref.shape[0] // chunk, accumulate,
                            jnp.zeros(out_ref.shape, jnp.float32))
  out_ref[...] = x_ref[...] + b_ref[...].astype(jnp.float32)[None, :] + total


def decoder_layers(x: jax.Array, step: jax.Array, time_memory: jax.Array,
                   obs_memory: Optional[Sequence[jax.Array]], num_obs: int,
                   layer_params: Sequence[Mapping[str, Any]], layers: Sequence[Any],
                   num_heads: int, causal: bool, memory_causal: bool, eps: float) -> jax.Array:
  """x (B, T, E) float32 through every decoder layer of `transformer.cached_denoise` → (B, T, E)
  float32.

  step: int32 scalar, the row of time_memory (n_steps, n_layer, H (2E + 1)) this step uses;
  obs_memory: per layer the `memory_blocks` (B, 2R + 1, E) of its num_obs observation rows
  (made once per sampling call), or None (num_obs 0); layer_params: each
  layer's parameters (its norms and cross-attention out-projection bias); layers: each
  layer's `CachedDecoderLayer` of unpacked (K, N) weights; causal / memory_causal: whether the
  self- / cross-attention masks of SPEC §5 apply.
  """
  b, length, e = x.shape
  padded = padded_tokens(length)
  x = jnp.pad(x.astype(jnp.float32), ((0, 0), (0, padded - length), (0, 0)))
  time_rows = memory_blocks(time_memory[step][:, None], num_heads, 0, 1 + num_obs)

  def whole(array):
    return pl.BlockSpec(array.shape, lambda i, j: (0,) * array.ndim)

  def rows(width):
    return pl.BlockSpec((pl.squeezed, padded, width), lambda i, j: (i, 0, 0))

  def row_columns(width):
    return pl.BlockSpec((pl.squeezed, padded, width), lambda i, j: (i, 0, j))

  def product_specs(dense, width):
    return [pl.BlockSpec((dense.kernel.shape[0], width), lambda i, j: (0, j)),
            pl.BlockSpec((width,), lambda i, j: (j,))]

  # The in-projection's output columns in head-major order, (3, H, T', d) per sequence.
  d = e // num_heads
  qkv_columns = min(_PROJECTION_COLUMNS, d)
  per_part, per_head = e // qkv_columns, d // qkv_columns
  head_major_columns = pl.BlockSpec(
      (pl.squeezed, pl.squeezed, pl.squeezed, padded, qkv_columns),
      lambda i, j: (i, j // per_part, j % per_part // per_head, 0, j % per_head))

  def call(kernel, grid_columns, in_specs, out_specs, out_shapes, *args,
           compiler_params=_COMPILER_PARAMS):
    out_shape = [jax.ShapeDtypeStruct((b,) + shape, jnp.float32) for shape in out_shapes]
    return pl.pallas_call(kernel, out_shape=out_shape, grid=(b, grid_columns),
                          in_specs=in_specs, out_specs=out_specs,
                          compiler_params=compiler_params,
                          interpret=_interpret_depth > 0)(*args)

  ffn_chunk = min(_FFN_OUT_CHUNK, 4 * e)

  for index, (p, dense) in enumerate(zip(layer_params, layers)):
    norm1, norm2, norm3 = p['norm1'], p['norm2'], p['norm3']
    (qkv,) = call(functools.partial(_qkv_kernel, eps=eps), 3 * e // qkv_columns,
                  [rows(e), whole(norm1['scale']), whole(norm1['bias']),
                   *product_specs(dense.self_qkv, qkv_columns)],
                  [head_major_columns], [(3, num_heads, padded, d)],
                  x, norm1['scale'], norm1['bias'], *dense.self_qkv)
    (x,) = call(functools.partial(_self_attention_kernel, num_heads=num_heads, length=length,
                                  causal=causal), e // _OUT_COLUMNS,
                [pl.BlockSpec((pl.squeezed, 3, num_heads * padded, d), lambda i, j: (i, 0, 0, 0)),
                 row_columns(_OUT_COLUMNS), *product_specs(dense.self_out, _OUT_COLUMNS)],
                [row_columns(_OUT_COLUMNS)], [(padded, e)],
                qkv.reshape(b, 3, num_heads * padded, d), x, *dense.self_out)
    own = ([pl.BlockSpec((pl.squeezed,) + obs_memory[index].shape[1:],
                         lambda i, j: (i, 0, 0))], [obs_memory[index]]) if num_obs else ([], [])
    out_bias = p['multihead_attn']['out_proj']['bias']
    hidden, x = call(
        functools.partial(_cross_attention_ffn_in_kernel, layer=index, num_heads=num_heads,
                          num_obs=num_obs, memory_causal=memory_causal, eps=eps),
        4 * e // _PROJECTION_COLUMNS,
        [rows(e), whole(norm2['scale']), whole(norm2['bias']), whole(time_rows),
         *own[0], whole(out_bias), whole(norm3['scale']), whole(norm3['bias']),
         *product_specs(dense.ffn_in, _PROJECTION_COLUMNS)],
        [row_columns(_PROJECTION_COLUMNS), rows(e)], [(padded, 4 * e), (padded, e)],
        x, norm2['scale'], norm2['bias'], time_rows, *own[1], out_bias, norm3['scale'],
        norm3['bias'], *dense.ffn_in)
    (x,) = call(functools.partial(_ffn_out_kernel, chunk=ffn_chunk), e // _OUT_COLUMNS,
                [rows(4 * e), row_columns(_OUT_COLUMNS),
                 *product_specs(dense.ffn_out, _OUT_COLUMNS)],
                [row_columns(_OUT_COLUMNS)], [(padded, e)], hidden, x, *dense.ffn_out,
                compiler_params=_pipelined(4 * e // ffn_chunk))
  return x[:, :length]
