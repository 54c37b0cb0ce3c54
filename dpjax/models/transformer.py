"""TransformerForDiffusion: the reference's minGPT-style noise-prediction network (SPEC §5).

Decoder mode (`time_as_cond=True`, the paper's): condition tokens [time, obs_1..obs_To] +
cond_pos_emb → condition encoder (token-wise MLP, or pre-norm transformer encoder when
n_cond_layers > 0) → memory; action tokens input_emb(sample) + pos_emb → n_layer pre-norm
decoder layers (causal self-attention, cross-attention on memory with the memory mask, GELU
FFN) → LayerNorm → Linear head.
Encoder-only (BERT-like) mode (`time_as_cond=False`, no obs cond): the time token is prepended
to the action tokens and a pre-norm encoder runs over the T + 1 tokens.

Every layer mirrors its PyTorch counterpart (nn.TransformerDecoderLayer / EncoderLayer with
norm_first=True, nn.MultiheadAttention with one fused in-projection, LayerNorm eps 1e-5,
exact GELU, dropout p_drop_attn on attention weights, after each sub-block and inside the
FFN), so parameter counts equal the reference's (8,996,103 for the Lift defaults).
Init as the reference: Linear / attention weights N(0, 0.02), biases 0, LayerNorm 1 / 0,
pos_emb N(0, 0.02), cond_pos_emb N(0, 0.02) when observations condition (zeros otherwise,
as the reference leaves it).
"""

import functools
import math
from typing import Any, Mapping, NamedTuple, Optional, Sequence, Union

import chex
import flax.linen as nn
import flax.struct
import jax
import jax.numpy as jnp
import numpy as np

from dpjax.models import conv_ops, cpu_kernels, pallas_decoder

LAYER_NORM_EPS = 1e-5
weight_init = nn.initializers.normal(stddev=0.02)


def attention_masks(T: int, T_cond: int) -> tuple[np.ndarray, np.ndarray]:
  """The reference's boolean attention masks (True = may attend).

  Returns (self_mask (T, T): action token t sees tokens s ≤ t;
           memory_mask (T, T_cond): action token t sees condition token s iff t ≥ s − 1,
           since condition token 0 is time and token s ≥ 1 is observation step s − 1).
  """
  t = np.arange(T)[:, None]
  self_mask = t >= np.arange(T)[None, :]
  memory_mask = t >= np.arange(T_cond)[None, :] - 1
  return self_mask, memory_mask


def sinusoidal_time_embedding(timesteps: jax.Array, dim: int) -> jax.Array:
  """(B,) → (B, dim) float32: [sin(t·f), cos(t·f)], f_i = exp(−i·ln(10000)/(dim/2 − 1))."""
  half = dim // 2
  freqs = jnp.exp(jnp.arange(half, dtype=jnp.float32) * -(math.log(10000.0) / (half - 1)))
  args = timesteps.astype(jnp.float32)[:, None] * freqs[None, :]
  return jnp.concatenate([jnp.sin(args), jnp.cos(args)], axis=-1)


def mish(x: jax.Array) -> jax.Array:
  return x * jnp.tanh(jax.nn.softplus(x))


def _add_bias(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y (..., N) + bias (N,), one dtype; in bfloat16 with `_add_bias_by_rows_product`'s gradient,
  which takes 75 ms of reduce-window op time out of a default training step
  (docs/performance.md). In float32 it measured no faster, so XLA's own gradient stays."""
  if y.dtype == jnp.bfloat16:
    return _add_bias_by_rows_product(y, bias)
  return y + bias


@jax.custom_vjp
def _add_bias_by_rows_product(y: jax.Array, bias: jax.Array) -> jax.Array:
  """y + bias whose bias gradient, the sum of dy's rows, is a product with a row of ones:
  XLA:CPU ran that bfloat16 reduction as a reduce-window at ~0.2 G values/s."""
  return y + bias


def _add_bias_forward(y, bias):
  return y + bias, None


def _add_bias_backward(_, grad):
  rows = grad.reshape(-1, grad.shape[-1]).astype(jnp.float32)
  return grad, (jnp.ones((1, rows.shape[0]), jnp.float32) @ rows)[0].astype(grad.dtype)


_add_bias_by_rows_product.defvjp(_add_bias_forward, _add_bias_backward)


class Dense(nn.Module):
  """nn.Dense(features, dtype) with this model's initialisation — same parameters ('kernel'
  (K, N), 'bias' (N,), float32) and arithmetic — whose product is conv_ops.matmul and whose
  bias is added by `_add_bias`."""
  features: int
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    kernel = self.param('kernel', weight_init, (x.shape[-1], self.features), jnp.float32)
    bias = self.param('bias', nn.initializers.zeros, (self.features,), jnp.float32)
    return _add_bias(conv_ops.matmul(x.astype(self.dtype), kernel.astype(self.dtype)),
                     bias.astype(self.dtype))



def _layer_norm(dtype: Any, name: str) -> nn.LayerNorm:
  return nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype=dtype, name=name)


class MultiheadAttention(nn.Module):
  """torch.nn.MultiheadAttention (batch_first): fused in-projection (E, 3E) + out_proj.

  `in_proj_kernel` is torch's `in_proj_weight` transposed; q uses its first E columns, k and v
  the next two blocks. Logits and softmax run in float32; masked logits get the most negative
  float, so masked weights (and their gradients) are exactly zero.
  """
  num_heads: int
  dropout_rate: float = 0.0
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, query: jax.Array, key_value: Optional[jax.Array],
               mask: Optional[np.ndarray], train: bool) -> jax.Array:
    """query (B, T, E); key_value (B, S, E) or None for self-attention; mask (T, S) bool."""
    b, t, e = query.shape
    h = self.num_heads
    kernel = self.param('in_proj_kernel', weight_init, (e, 3 * e), jnp.float32)
    bias = self.param('in_proj_bias', nn.initializers.zeros, (3 * e,), jnp.float32)
    kernel, bias = kernel.astype(self.dtype), bias.astype(self.dtype)
    query = query.astype(self.dtype)
    if key_value is None:
      q, k, v = jnp.split(_add_bias(conv_ops.matmul(query, kernel), bias), 3, axis=-1)
    else:
      q = _add_bias(conv_ops.matmul(query, kernel[:, :e]), bias[:e])
      k, v = jnp.split(
          _add_bias(conv_ops.matmul(key_value.astype(self.dtype), kernel[:, e:]), bias[e:]), 2,
          axis=-1)
    dropout = nn.Dropout(self.dropout_rate, deterministic=False) if train else None
    out = _attend(q, k, v, h, mask, self.dtype, dropout)
    return Dense(e, self.dtype, name='out_proj')(out)


def _attend(q: jax.Array, k: jax.Array, v: jax.Array, num_heads: int,
            mask: Optional[np.ndarray], dtype: Any,
            dropout: Optional[nn.Dropout] = None) -> jax.Array:
  """Scaled dot-product attention of projected q (B, T, E), k and v (B, S, E) → (B, T, E)."""
  b, t, e = q.shape
  s = k.shape[1]
  q = q.reshape(b, t, num_heads, e // num_heads)
  k = k.reshape(b, s, num_heads, e // num_heads)
  v = v.reshape(b, s, num_heads, e // num_heads)
  logits = jnp.einsum('bthd,bshd->bhts', q, k).astype(jnp.float32) / math.sqrt(e // num_heads)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  if dropout is not None:
    weights = dropout(weights)
  return jnp.einsum('bhts,bshd->bthd', weights.astype(dtype), v).reshape(b, t, e)


class FeedForward(nn.Module):
  """linear2(dropout(gelu(linear1(x)))), exact (erf) GELU as torch's activation='gelu'."""
  hidden_dim: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, train: bool) -> jax.Array:
    y = Dense(self.hidden_dim, self.dtype, name='linear1')(x)
    y = nn.Dropout(self.dropout_rate, deterministic=not train)(
        jax.nn.gelu(y, approximate=False))
    return Dense(x.shape[-1], self.dtype, name='linear2')(y)


class EncoderLayer(nn.Module):
  """nn.TransformerEncoderLayer(norm_first=True, activation='gelu', dim_feedforward=4E)."""
  num_heads: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, mask: Optional[np.ndarray], train: bool) -> jax.Array:
    e = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _layer_norm(self.dtype, 'norm1')(x)
    x = x + drop(MultiheadAttention(self.num_heads, self.dropout_rate, self.dtype,
                                    name='self_attn')(y, None, mask, train))
    y = _layer_norm(self.dtype, 'norm2')(x)
    return x + drop(FeedForward(4 * e, self.dropout_rate, self.dtype, name='ffn')(y, train))


class DecoderLayer(nn.Module):
  """nn.TransformerDecoderLayer(norm_first=True, activation='gelu', dim_feedforward=4E)."""
  num_heads: int
  dropout_rate: float
  dtype: Any = jnp.float32

  @nn.compact
  def __call__(self, x: jax.Array, memory: jax.Array, self_mask: Optional[np.ndarray],
               memory_mask: Optional[np.ndarray], train: bool) -> jax.Array:
    e = x.shape[-1]
    drop = lambda y: nn.Dropout(self.dropout_rate, deterministic=not train)(y)
    y = _layer_norm(self.dtype, 'norm1')(x)
    x = x + drop(MultiheadAttention(self.num_heads, self.dropout_rate, self.dtype,
                                    name='self_attn')(y, None, self_mask, train))
    y = _layer_norm(self.dtype, 'norm2')(x)
    x = x + drop(MultiheadAttention(self.num_heads, self.dropout_rate, self.dtype,
                                    name='multihead_attn')(y, memory, memory_mask, train))
    y = _layer_norm(self.dtype, 'norm3')(x)
    return x + drop(FeedForward(4 * e, self.dropout_rate, self.dtype, name='ffn')(y, train))


class TransformerForDiffusion(nn.Module):
  """Noise-prediction transformer: (sample (B, T, input_dim), timestep, cond) → (B, T, output_dim).

  The fields are the reference constructor's. obs_as_cond=True needs cond_dim > 0 and cond
  (B, n_obs_steps, cond_dim); obs_as_cond=False needs cond_dim = 0 and cond None (time is then
  the only condition token). time_as_cond=False selects the encoder-only mode and requires
  obs_as_cond=False, as in the reference. dtype is the compute dtype; parameters, softmax and
  LayerNorm statistics stay float32 and the output is float32. first_step is the horizon step
  of the sample's first token: n_obs_steps − 1 when only the executed actions are sampled
  (pred_action_steps_only), so that the causal masks are those steps' rows of the horizon's
  masks (the first executed action sees every observation); positional embeddings are taken
  from the first rows, as the reference does.
  """
  input_dim: int
  output_dim: int
  horizon: int
  n_obs_steps: int
  cond_dim: int
  n_layer: int = 8
  n_head: int = 4
  n_emb: int = 256
  p_drop_emb: float = 0.0
  p_drop_attn: float = 0.3
  causal_attn: bool = True
  time_as_cond: bool = True
  obs_as_cond: bool = True
  n_cond_layers: int = 0
  dtype: Any = jnp.float32
  first_step: int = 0

  @property
  def num_tokens(self) -> int:
    """T of the reference: action tokens, plus the time token in encoder-only mode."""
    return self.horizon + (0 if self.time_as_cond else 1)

  @property
  def num_cond_tokens(self) -> int:
    """T_cond of the reference: time (decoder mode) plus n_obs_steps when obs condition."""
    if not self.time_as_cond:
      return 0
    return 1 + (self.n_obs_steps if self.obs_as_cond else 0)

  def _check_config(self):
    where = 'TransformerForDiffusion'
    if self.n_emb % 2 or self.n_emb < 4:
      raise ValueError(f'{where}: n_emb must be even and ≥ 4 (sinusoidal time), got {self.n_emb}')
    if self.n_emb % self.n_head:
      raise ValueError(f'{where}: n_emb {self.n_emb} is not divisible by n_head {self.n_head}')
    if self.obs_as_cond and (self.cond_dim <= 0 or self.n_obs_steps <= 0):
      raise ValueError(f'{where}: obs_as_cond=True needs cond_dim > 0 and n_obs_steps > 0, got '
                       f'cond_dim={self.cond_dim}, n_obs_steps={self.n_obs_steps}')
    if not self.obs_as_cond and self.cond_dim != 0:
      raise ValueError(f'{where}: obs_as_cond=False takes no cond, so cond_dim must be 0 '
                       f'(got {self.cond_dim}); observations are inpainted into the sample')
    if not self.time_as_cond and self.obs_as_cond:
      raise ValueError(f'{where}: time_as_cond=False (encoder-only) cannot take observation '
                       'tokens; set obs_as_cond=False, as the reference requires')
    if self.first_step and not self.time_as_cond:
      raise ValueError(f'{where}: first_step={self.first_step} needs the decoder mode '
                       '(time_as_cond=True), where only the executed actions can be sampled')

  @nn.compact
  def __call__(self, sample: jax.Array, timestep: Union[jax.Array, int, float],
               cond: Optional[jax.Array] = None, train: bool = False) -> jax.Array:
    """sample (B, t, input_dim) with t ≤ horizon; timestep scalar, (1,) or (B,);
    cond (B, n_obs_steps, cond_dim) or None. Returns (B, t, output_dim) float32."""
    self._check_config()
    b, t = self._check_inputs(sample, cond)
    timestep = jnp.asarray(timestep)
    if timestep.ndim > 1 or timestep.size not in (1, b):
      raise ValueError(f'TransformerForDiffusion: timestep must be a scalar, (1,) or ({b},), '
                       f'got shape {timestep.shape}')
    timesteps = jnp.broadcast_to(timestep.reshape(-1), (b,))
    time_emb = sinusoidal_time_embedding(timesteps, self.n_emb)[:, None, :].astype(self.dtype)

    drop = nn.Dropout(self.p_drop_emb, deterministic=not train)
    input_emb = Dense(self.n_emb, self.dtype, name='input_emb')(sample.astype(self.dtype))
    pos_emb = self.param('pos_emb', weight_init, (1, self.num_tokens, self.n_emb), jnp.float32)

    if not self.time_as_cond:
      x = jnp.concatenate([time_emb, input_emb], axis=1)
      x = drop(x + pos_emb[:, :t + 1].astype(self.dtype))
      mask = attention_masks(t + 1, 0)[0] if self.causal_attn else None
      for i in range(self.n_layer):
        x = EncoderLayer(self.n_head, self.p_drop_attn, self.dtype, name=f'encoder_layers_{i}')(
            x, mask, train)
      x = x[:, 1:]
    else:
      cond_tokens = time_emb
      if self.obs_as_cond:
        cond_obs_emb = Dense(self.n_emb, self.dtype, name='cond_obs_emb')(cond.astype(self.dtype))
        cond_tokens = jnp.concatenate([cond_tokens, cond_obs_emb], axis=1)
      # The reference re-initialises cond_pos_emb only when cond_obs_emb exists.
      cond_pos_init = weight_init if self.obs_as_cond else nn.initializers.zeros
      cond_pos_emb = self.param('cond_pos_emb', cond_pos_init,
                                (1, self.num_cond_tokens, self.n_emb), jnp.float32)
      memory = drop(cond_tokens + cond_pos_emb.astype(self.dtype))
      memory = self._condition_encoder(memory, train)

      x = drop(input_emb + pos_emb[:, :t].astype(self.dtype))
      tgt_mask, mem_mask = decoder_masks(self, t)
      for i in range(self.n_layer):
        x = DecoderLayer(self.n_head, self.p_drop_attn, self.dtype, name=f'decoder_layers_{i}')(
            x, memory, tgt_mask, mem_mask, train)

    x = _layer_norm(self.dtype, 'ln_f')(x)
    return Dense(self.output_dim, self.dtype, name='head')(x).astype(jnp.float32)

  def _condition_encoder(self, x: jax.Array, train: bool) -> jax.Array:
    if self.n_cond_layers > 0:
      for i in range(self.n_cond_layers):
        x = EncoderLayer(self.n_head, self.p_drop_attn, self.dtype,
                         name=f'cond_encoder_layers_{i}')(x, None, train)
      return x
    x = Dense(4 * self.n_emb, self.dtype, name='cond_encoder_fc1')(x)
    return Dense(self.n_emb, self.dtype, name='cond_encoder_fc2')(mish(x))

  def _check_inputs(self, sample: jax.Array, cond: Optional[jax.Array]) -> tuple[int, int]:
    where = 'TransformerForDiffusion'
    tokens = self.horizon - self.first_step
    if sample.ndim != 3 or sample.shape[2] != self.input_dim or not (
        1 <= sample.shape[1] <= tokens):
      raise ValueError(f'{where}: sample must be (B, T ≤ {tokens}, {self.input_dim}) (horizon '
                       f'{self.horizon} from step {self.first_step}), got {sample.shape}')
    b, t = sample.shape[:2]
    if self.obs_as_cond:
      expected = (b, self.n_obs_steps, self.cond_dim)
      if cond is None or cond.shape != expected:
        raise ValueError(f'{where}: cond must have shape {expected}, got '
                         f'{None if cond is None else cond.shape}')
    elif cond is not None:
      raise ValueError(f'{where}: obs_as_cond=False takes cond=None, got shape {cond.shape}')
    return b, t


def decoder_masks(model: TransformerForDiffusion,
                  tokens: int) -> tuple[Optional[np.ndarray], Optional[np.ndarray]]:
  """The decoder's (self mask (t, t), memory mask (t, T_cond)) for `tokens` action tokens from
  `model.first_step`; None where the model is not causal or the mask hides nothing."""
  if not model.causal_attn:
    return None, None
  self_mask, memory_mask = attention_masks(model.num_tokens, model.num_cond_tokens)
  rows = slice(model.first_step, model.first_step + tokens)
  # The memory mask only exists when observation tokens follow time (reference). From step
  # To − 1 on it hides nothing, and the GPU's decoder kernels take that as "no mask".
  mem_mask = memory_mask[rows] if model.obs_as_cond else None
  if mem_mask is not None and mem_mask.all():
    mem_mask = None
  return self_mask[rows, rows], mem_mask


class CachedDecoderLayer(NamedTuple):
  """One decoder layer's Dense weights, packed for this backend by `cpu_kernels.pack_dense`
  (the cross-attention's projections are folded into its memory rows instead)."""
  self_qkv: cpu_kernels.PackedDense  # Self-attention in-projection, E → 3E.
  self_out: cpu_kernels.PackedDense
  ffn_in: cpu_kernels.PackedDense
  ffn_out: cpu_kernels.PackedDense


@flax.struct.dataclass
class DecoderConstants:
  """What `cached_denoise` takes from the parameters alone (decoder mode), for one sampler.

  With the token-wise condition encoder (n_cond_layers = 0) a memory row depends only on its own
  condition token, so the time token's row of every layer's cross-attention
  (`fold_cross_attention`) depends only on the timestep: a table over the sampler's timesteps.
  The decoder's Dense weights are packed for the CPU kernel (`cpu_kernels`). Built once per call
  of the sampler, or once per parameters (`DiffusionPolicy.sampling_variables`).
  """
  time_memory: jax.Array  # (n_steps, n_layer, H (2E + 1)) float32: the time row, folded.
  input_emb: cpu_kernels.PackedDense
  layers: tuple[CachedDecoderLayer, ...]
  head: cpu_kernels.PackedDense
  # The sampler's timesteps, in order: static (part of the pytree's structure), so a table made
  # for another sampler is refused when a program is traced, not used with wrong time rows.
  timesteps: tuple[int, ...] = flax.struct.field(pytree_node=False)


def supports_cached_denoise(model: TransformerForDiffusion) -> bool:
  """Whether `cached_denoise` applies: decoder mode with the token-wise condition MLP."""
  return model.time_as_cond and model.n_cond_layers == 0


def _linear(p: Mapping[str, jax.Array], x: jax.Array, dtype: Any) -> jax.Array:
  """`Dense(dtype)` applied with its parameters `p`."""
  return x.astype(dtype) @ p['kernel'].astype(dtype) + p['bias'].astype(dtype)


def _apply_layer_norm(p: Mapping[str, jax.Array], x: jax.Array, dtype: Any) -> jax.Array:
  """nn.LayerNorm(epsilon=LAYER_NORM_EPS, dtype) applied with its parameters `p`, statistics in
  float32. The variance is taken of the centred values (flax: E[x²] − E[x]²), a form XLA:GPU
  runs as one fused normalization kernel instead of two reductions and an elementwise pass."""
  x = x.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=-1, keepdims=True)
  inv_std = jax.lax.rsqrt(jnp.mean(jnp.square(centred), axis=-1, keepdims=True) + LAYER_NORM_EPS)
  return (centred * inv_std * p['scale'] + p['bias']).astype(dtype)


def _packed_layer(p: Mapping[str, Any], dtype: Any) -> CachedDecoderLayer:
  def pack(kernel, bias):
    return cpu_kernels.pack_dense(kernel, bias, dtype)

  self_attn = p['self_attn']
  return CachedDecoderLayer(
      self_qkv=pack(self_attn['in_proj_kernel'], self_attn['in_proj_bias']),
      self_out=pack(**self_attn['out_proj']),
      ffn_in=pack(**p['ffn']['linear1']),
      ffn_out=pack(**p['ffn']['linear2']))


def _condition_memory(model: TransformerForDiffusion, params: Mapping[str, Any],
                      tokens: jax.Array) -> jax.Array:
  """The token-wise condition MLP (n_cond_layers = 0) on (..., E) condition tokens."""
  hidden = mish(_linear(params['cond_encoder_fc1'], tokens, model.dtype))
  return _linear(params['cond_encoder_fc2'], hidden, model.dtype)


def fold_cross_attention(attn_params: Mapping[str, Any], memory: jax.Array, num_heads: int,
                         dtype: Any) -> jax.Array:
  """Memory rows (..., E) → (..., H (2E + 1)) float32: [score (H, E) | value (H, E) | offset (H)].

  For a fixed memory row s, head h's cross-attention logit of a normalized query row y is
  (y Wq_h + bq_h) · k_h(s) / √d = y · score_h(s) + offset_h(s), and the row's share of the
  output is its softmax weight times v_h(s) Wo_h = value_h(s). Folding the query and out
  projections into the memory (which is the same at every denoising step) leaves each step a
  dot product and an axpy of E floats per head and row in place of two E × E matmuls
  (SPEC §5's decoder at batch 1 then streams 25 MB of weights a step instead of 29).
  K and V are projected in `dtype`, as `MultiheadAttention` computes them; the folding
  products are float32 at full precision.
  """
  e = memory.shape[-1]
  d = e // num_heads
  kernel = attn_params['in_proj_kernel'].astype(dtype)
  bias = attn_params['in_proj_bias'].astype(dtype)
  memory = memory.astype(dtype)
  f32 = functools.partial(jnp.asarray, dtype=jnp.float32)
  heads = memory.shape[:-1] + (num_heads, d)
  keys = f32(memory @ kernel[:, e:2 * e] + bias[e:2 * e]).reshape(heads) / math.sqrt(d)
  values = f32(memory @ kernel[:, 2 * e:] + bias[2 * e:]).reshape(heads)
  highest = jax.lax.Precision.HIGHEST
  score = jnp.einsum('ehd,...hd->...he', f32(kernel[:, :e]).reshape(e, num_heads, d), keys,
                     precision=highest)
  out_kernel = f32(attn_params['out_proj']['kernel'].astype(dtype)).reshape(num_heads, d, e)
  value = jnp.einsum('...hd,hde->...he', values, out_kernel, precision=highest)
  offset = jnp.einsum('hd,...hd->...h', f32(bias[:e]).reshape(num_heads, d), keys,
                      precision=highest)
  rows = memory.shape[:-1] + (num_heads * e,)
  return jnp.concatenate([score.reshape(rows), value.reshape(rows), offset], axis=-1)


def _folded_memory(model: TransformerForDiffusion, params: Mapping[str, Any],
                   memory: jax.Array) -> tuple[jax.Array, ...]:
  """(..., E) memory rows → n_layer × (..., H (2E + 1)): every layer's `fold_cross_attention`."""
  return tuple(fold_cross_attention(params[f'decoder_layers_{i}']['multihead_attn'], memory,
                                    model.n_head, model.dtype) for i in range(model.n_layer))


def _attend_folded(y: jax.Array, time_row: jax.Array, obs_rows: jax.Array, out_bias: jax.Array,
                   num_heads: int, mask: Optional[np.ndarray]) -> jax.Array:
  """Cross-attention of normalized queries y (B, T, E) on `fold_cross_attention` rows — the
  time row shared by the batch (H (2E + 1),), then each sequence's observation rows
  (B, S1, H (2E + 1)) — with the out-projection bias → (B, T, E) float32.

  Score, value and offset columns are each gathered on their own, as a select between the time
  row and the observation rows shifted down by one: XLA:GPU fuses a step's gathers, all layers',
  into one kernel (as concatenations they were a kernel each, and slicing a concatenation of
  whole rows copied the columns out again)."""
  b = y.shape[0]
  he = num_heads * y.shape[-1]
  is_time_row = (jnp.arange(1 + obs_rows.shape[1]) == 0)[None, :, None]
  below_time_row = jnp.pad(obs_rows, ((0, 0), (1, 0), (0, 0)))

  def columns(start, stop):  # (B, 1 + S1, stop − start)
    return jnp.where(is_time_row, time_row[start:stop], below_time_row[..., start:stop])

  score = columns(0, he).reshape(b, -1, num_heads, y.shape[-1])
  value = columns(he, 2 * he).reshape(score.shape)
  offset = columns(2 * he, time_row.shape[-1])
  logits = jnp.einsum('bte,bshe->bhts', y.astype(jnp.float32), score) + jnp.moveaxis(
      offset, 1, 2)[:, :, None, :]
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  return jnp.einsum('bhts,bshe->bte', weights, value) + out_bias.astype(jnp.float32)


def _self_attention(qkv: cpu_kernels.PackedDense, out: cpu_kernels.PackedDense, y: jax.Array,
                    num_heads: int, mask: Optional[np.ndarray], dtype: Any) -> jax.Array:
  """`MultiheadAttention` in eval mode on normalized y (B, T, E), from its in- and out-projections
  as plain (unpacked) weights → (B, T, E) in `dtype`; the arithmetic of `_attend` and Dense.

  Off CPU it is written head-major: the in-projection yields (3H, B, T, d) and the out-projection
  contracts heads and their features at once, so XLA:GPU moves no q, k or v into place between
  the products (6 kernels, against 8 for the (B, T, E) form; scripts/gpu_kernels.py). XLA:CPU
  runs that form up to 2× slower, so CPU keeps the (B, T, E) products (docs/performance.md)."""
  if jax.default_backend() == 'cpu':
    q, k, v = jnp.split(cpu_kernels.dense(qkv, y), 3, axis=-1)
    return cpu_kernels.dense(out, _attend(q, k, v, num_heads, mask, dtype))
  e = y.shape[-1]
  d = e // num_heads
  heads = jnp.einsum('bte,egd->gbtd', y.astype(dtype), qkv.kernel.reshape(e, 3 * num_heads, d)
                     ) + qkv.bias.reshape(3 * num_heads, 1, 1, d)
  q, k, v = jnp.split(heads, 3)
  logits = jnp.einsum('hbtd,hbsd->hbts', q, k).astype(jnp.float32) / math.sqrt(d)
  if mask is not None:
    logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
  weights = jax.nn.softmax(logits, axis=-1)
  attended = jnp.einsum('hbts,hbsd->hbtd', weights.astype(dtype), v)
  return jnp.einsum('hbtd,hde->bte', attended, out.kernel.reshape(num_heads, d, e)) + out.bias


def decoder_constants(model: TransformerForDiffusion, params: Mapping[str, Any],
                      timesteps: jax.Array) -> DecoderConstants:
  """Precomputes the parameter-only part of `model` (eval mode) for `cached_denoise`.

  Args:
    model: a TransformerForDiffusion with `supports_cached_denoise(model)`.
    params: its parameters (`variables['params']` of the module).
    timesteps: (n_steps,) the timesteps the sampler will visit, in order (concrete values).
  """
  if not supports_cached_denoise(model):
    raise ValueError('decoder_constants: needs time_as_cond=True and n_cond_layers=0, got '
                     f'time_as_cond={model.time_as_cond}, n_cond_layers={model.n_cond_layers}')
  e, dtype = model.n_emb, model.dtype
  time_tokens = sinusoidal_time_embedding(jnp.asarray(timesteps), e).astype(dtype)
  time_memory = _condition_memory(model, params,
                                  time_tokens + params['cond_pos_emb'][0, 0].astype(dtype))
  return DecoderConstants(
      time_memory=jnp.stack(_folded_memory(model, params, time_memory), axis=1),
      input_emb=cpu_kernels.pack_dense(**params['input_emb'], dtype=dtype),
      layers=tuple(_packed_layer(params[f'decoder_layers_{i}'], dtype)
                   for i in range(model.n_layer)),
      head=cpu_kernels.pack_dense(**params['head'], dtype=dtype),
      timesteps=tuple(np.asarray(timesteps).tolist()))


def observation_memory(model: TransformerForDiffusion, params: Mapping[str, Any],
                       cond: Optional[jax.Array],
                       pallas: bool = False) -> Optional[tuple[jax.Array, ...]]:
  """The observation rows of every layer's folded cross-attention memory for `cached_denoise`,
  computed once per sampling call: n_layer arrays (B, To, H (2E + 1)) float32 for cond (B, To,
  cond_dim) when model.obs_as_cond, else None. With `pallas`, in the form the Pallas decoder
  reads (`pallas_decoder.memory_blocks`).

  One array per layer, not one stacked array: the sampler's loop would slice a layer's rows out
  of the stack at every step, a copy (at batch 28, 460 KB per layer and step).
  """
  if not model.obs_as_cond:
    return None
  chex.assert_shape(cond, (None, model.n_obs_steps, model.cond_dim))
  dtype = model.dtype
  tokens = _linear(params['cond_obs_emb'], cond, dtype) + params['cond_pos_emb'][0, 1:].astype(
      dtype)
  rows = _folded_memory(model, params, _condition_memory(model, params, tokens))
  if pallas:
    return tuple(pallas_decoder.memory_blocks(r, model.n_head, 1, model.num_cond_tokens)
                 for r in rows)
  return rows


def _on_layer_kernel(layers: tuple[CachedDecoderLayer, ...]) -> bool:
  """Whether `cached_denoise` runs these layers on `cpu_kernels.decoder_layer`: one kernel call
  per layer where the weights are packed for the kernels (at batch 1 the layer's nine steps
  take microseconds apiece; as separate calls the pool's wake-ups and XLA's small ops between
  them cost as much as the work)."""
  return cpu_kernels.enabled(jnp.float32) and all(
      dense.kernel.ndim > 2 for layer in layers for dense in layer)


def runs_pallas_decoder(model: TransformerForDiffusion, constants: DecoderConstants,
                        tokens: int) -> bool:
  """Whether `cached_denoise(..., pallas=True)` can run the decoder layers of `model` on
  `pallas_decoder`'s kernels here, for `tokens` action tokens: four kernels per layer, where
  XLA's ops take ≥ 16 on a GPU. Needs a backend they run on, sizes they take and unpacked
  weights (the C++ kernels' packing is for CPUs)."""
  return pallas_decoder.runs_here() and pallas_decoder.fits(
      model.n_emb, model.n_head, tokens, model.num_cond_tokens) and all(
      dense.kernel.ndim == 2 for layer in constants.layers for dense in layer)


def cached_denoise(model: TransformerForDiffusion, params: Mapping[str, Any],
                   constants: DecoderConstants, obs_memory: Optional[Sequence[jax.Array]],
                   sample: jax.Array, step: jax.Array, pallas: bool = False) -> jax.Array:
  """`model.apply({'params': params}, sample, timesteps[step], cond)` in eval mode, from
  `decoder_constants(model, params, timesteps)` and `observation_memory(..., cond)`.

  sample (B, t, input_dim); step: int32 scalar index into the constants' timesteps; pallas:
  run the decoder layers on `pallas_decoder`'s kernels (`runs_pallas_decoder` must hold), on
  `observation_memory(..., pallas=True)`. Returns (B, t, output_dim) float32.
  """
  chex.assert_rank(sample, 3)
  b, t = sample.shape[:2]
  if (obs_memory is None) == model.obs_as_cond:
    # Without it the observation rows would silently be none (or fail in a kernel's mask).
    raise ValueError(f'cached_denoise: obs_as_cond={model.obs_as_cond} takes '
                     f'{"the observation_memory of its cond" if model.obs_as_cond else "None"} '
                     'as obs_memory')
  if obs_memory is not None:
    chex.assert_equal(len(obs_memory), len(constants.layers))
    for rows in obs_memory:
      chex.assert_axis_dimension(rows, 0, b)
  dtype, h = model.dtype, model.n_head
  tgt_mask, mem_mask = decoder_masks(model, t)

  if cpu_kernels.enabled(jnp.float32):
    # The attention and LayerNorm kernels compute in float32: under mixed precision, on
    # bfloat16 inputs made exact in float32 (softmax and statistics are float32 either way).
    f32 = functools.partial(jnp.asarray, dtype=jnp.float32)

    def self_attention(layer, y):
      q, k, v = jnp.split(cpu_kernels.dense(layer.self_qkv, y), 3, axis=-1)
      attended = cpu_kernels.attention(f32(q), f32(k), f32(v), h, tgt_mask).astype(dtype)
      return cpu_kernels.dense(layer.self_out, attended)

    def layer_norm(p, x):
      return cpu_kernels.layer_norm(f32(x), p['scale'], p['bias'], LAYER_NORM_EPS).astype(dtype)
  else:

    def self_attention(layer, y):
      return _self_attention(layer.self_qkv, layer.self_out, y, h, tgt_mask, dtype)

    layer_norm = functools.partial(_apply_layer_norm, dtype=dtype)

  x = cpu_kernels.dense(constants.input_emb, sample) + params['pos_emb'][:, :t].astype(dtype)
  layer_params = [params[f'decoder_layers_{i}'] for i in range(len(constants.layers))]
  if pallas:
    if not runs_pallas_decoder(model, constants, t):
      raise ValueError(
          'cached_denoise(pallas=True): the Pallas decoder does not run here (it needs a single '
          f'GPU, n_emb / n_head sizes it takes and unpacked weights; backend '
          f'{jax.default_backend()!r}, n_emb={model.n_emb}, n_head={model.n_head}, {t} tokens)')
    x = pallas_decoder.decoder_layers(
        x, step, constants.time_memory, obs_memory, model.num_cond_tokens - 1,
        layer_params, constants.layers, h, tgt_mask is not None, mem_mask is not None,
        LAYER_NORM_EPS)
    x = layer_norm(params['ln_f'], x)
    return cpu_kernels.dense(constants.head, x).astype(jnp.float32)
  time_memory = constants.time_memory[step]
  if obs_memory is None:
    obs_memory = (jnp.zeros((b, 0, time_memory.shape[-1])),) * len(constants.layers)
  layers = list(zip(layer_params, constants.layers, time_memory, obs_memory))
  if _on_layer_kernel(constants.layers):
    # Float32 between the kernel's layers (bfloat16 numbers in bfloat16): no conversions.
    x = x.astype(jnp.float32)
    for p, dense, time_row, obs_rows in layers:
      x = cpu_kernels.decoder_layer(x, time_row[None], obs_rows,
                                    [p['norm1'], p['norm2'], p['norm3']], dense,
                                    p['multihead_attn']['out_proj']['bias'], h, tgt_mask,
                                    mem_mask, LAYER_NORM_EPS)
    x = x.astype(dtype)
  else:
    for p, dense, time_row, obs_rows in layers:
      x = x + self_attention(dense, layer_norm(p['norm1'], x))
      y = layer_norm(p['norm2'], x)
      x = x + _attend_folded(y, time_row, obs_rows, p['multihead_attn']['out_proj']['bias'], h,
                             mem_mask).astype(dtype)
      y = layer_norm(p['norm3'], x)
      hidden = jax.nn.gelu(cpu_kernels.dense(dense.ffn_in, y), approximate=False)
      x = x + cpu_kernels.dense(dense.ffn_out, hidden)
  x = layer_norm(params['ln_f'], x)
  return cpu_kernels.dense(constants.head, x).astype(jnp.float32)
