"""The CPU kernels (dpjax/models/csrc/): build, values against independent
formulations (float64 numpy matmuls and tap sums, the XLA attention of the transformer, XLA's
convolution and its gradients)."""

import functools

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import conv_ops, cpu_kernels
from dpjax.models import transformer


@pytest.fixture(autouse=True)
def _kernels_registered():
  """The entry points need `enabled` to have built and registered the library, as callers do."""
  assert cpu_kernels.enabled(jnp.float32)


def _layer(k, n, seed=0):
  rng = np.random.default_rng(seed)
  return (rng.standard_normal((k, n)).astype(np.float32),
          rng.standard_normal(n).astype(np.float32))


def test_build_compiles_once_into_the_cache_dir(tmp_path, monkeypatch):
  monkeypatch.setenv('DPJAX_KERNEL_CACHE', str(tmp_path))
  path = cpu_kernels.build()
  assert path.parent == tmp_path and path.suffix == '.so' and path.stat().st_size > 0
  built_at = path.stat().st_mtime_ns
  assert cpu_kernels.build() == path and path.stat().st_mtime_ns == built_at
  assert [p.name for p in tmp_path.iterdir()] == [path.name]  # No temporary file left behind.


def test_build_failure_names_the_command_and_leaves_no_library(tmp_path, monkeypatch):
  monkeypatch.setenv('DPJAX_KERNEL_CACHE', str(tmp_path))
  monkeypatch.setenv('CXX', 'false')
  with pytest.raises(RuntimeError, match=r'`false .*csrc/.*\.cc.*` failed'):
    cpu_kernels.build()
  assert not list(tmp_path.iterdir())


@pytest.mark.parametrize('lead,k,n', [
    ((1,), 256, 768),  # One row: batch-1 sampling's smallest matmul.
    ((1, 10), 256, 1024),  # Batch-1 sampling: 10 action tokens.
    ((13,), 1024, 256),  # A full block of 12 rows plus one.
    ((28, 10), 256, 256),  # Batch-28 sampling.
    ((2, 10), 7, 256),  # input_emb: K = action dim.
    ((2, 10), 256, 7),  # head: N padded to one 32-column panel.
    ((3,), 40, 100),  # Neither K nor N a multiple of anything.
])
def test_packed_dense_equals_float64_matmul(lead, k, n):
  kernel, bias = _layer(k, n)
  x = np.random.default_rng(1).standard_normal(lead + (k,)).astype(np.float32)
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.float32)
  assert layer.kernel.shape == (-(-n // 32), k, 32)  # The kernel path, not the XLA fallback.
  got = jax.jit(cpu_kernels.dense)(layer, jnp.asarray(x))
  expected = x.astype(np.float64) @ kernel + bias
  assert got.shape == lead + (n,) and got.dtype == jnp.float32
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(k))


def test_packed_dense_inside_a_scan_gives_the_xla_result():
  """As the sampler uses it: a chain of dependent calls in one compiled loop."""
  layers = [_layer(64, 64, seed) for seed in range(3)]
  x = np.random.default_rng(2).standard_normal((10, 64)).astype(np.float32)

  def chain(dense_layers, apply):
    def body(h, _):
      for layer in dense_layers:
        h = jnp.tanh(apply(layer, h))
      return h, None
    return jax.lax.scan(body, jnp.asarray(x), None, length=20)[0]

  packed = [cpu_kernels.pack_dense(jnp.asarray(k), jnp.asarray(b), jnp.float32) for k, b in layers]
  plain = [cpu_kernels.PackedDense(jnp.asarray(k), jnp.asarray(b)) for k, b in layers]
  np.testing.assert_allclose(jax.jit(chain, static_argnums=1)(packed, cpu_kernels.dense),
                             jax.jit(chain, static_argnums=1)(plain, cpu_kernels.dense),
                             atol=2e-5)


def test_other_dtypes_keep_the_plain_layout():
  kernel, bias = _layer(16, 8)
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.float16)
  assert layer.kernel.shape == (16, 8) and layer.kernel.dtype == jnp.float16
  out = cpu_kernels.dense(layer, jnp.ones((2, 16), jnp.float32))
  assert out.dtype == jnp.float16
  np.testing.assert_allclose(out.astype(np.float32), np.broadcast_to(kernel.sum(0) + bias, (2, 8)),
                             rtol=2e-3, atol=0.02)


def _bfloat16_values(a):
  return np.asarray(jnp.asarray(a).astype(jnp.bfloat16).astype(jnp.float32), np.float64)


# Where the CPU has AMX, K = 256 and 1024 run on its tiles (16 k-pairs a step, 12 rows and then 1
# for 13) and K = 40 on vdpbf16ps.
@pytest.mark.parametrize('lead,k,n', [((1, 10), 256, 1024), ((13,), 1024, 256), ((2, 10), 256, 7),
                                      ((3,), 40, 100)])
def test_bfloat16_dense_sums_bfloat16_products_in_float32(lead, k, n):
  if not cpu_kernels._bf16_dense_enabled():  # pylint: disable=protected-access
    pytest.skip('this CPU has no AVX512-BF16')
  kernel, bias = _layer(k, n)
  x = np.random.default_rng(1).standard_normal(lead + (k,)).astype(np.float32)
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.bfloat16)
  assert layer.kernel.shape == (-(-n // 32), k // 2, 32, 2)
  assert layer.kernel.dtype == jnp.bfloat16
  got = jax.jit(cpu_kernels.dense)(layer, jnp.asarray(x))
  assert got.shape == lead + (n,) and got.dtype == jnp.bfloat16
  # The same bfloat16 operands, products summed in float64, rounded once to bfloat16: equal to
  # within one bfloat16 rounding step (2^-8 relative) of the float32 sums.
  expected = _bfloat16_values(x) @ _bfloat16_values(kernel) + _bfloat16_values(bias)
  np.testing.assert_allclose(np.asarray(got, np.float64), _bfloat16_values(expected),
                             rtol=2 ** -7, atol=1e-3)


def test_bad_shapes_are_refused():
  kernel, bias = _layer(16, 8)
  with pytest.raises(ValueError, match=r'kernel \(K, N\) and bias \(N,\), got \(16, 8\) and '
                                       r'\(9,\)'):
    cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.zeros(9), jnp.float32)
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.float32)
  with pytest.raises(ValueError, match=r'x \(\.\.\., 16\) for the packed kernel, got \(2, 15\)'):
    cpu_kernels.dense(layer, jnp.ones((2, 15)))
  # The C++ handler checks its operands itself.
  wrong_width = jnp.zeros((1, 16, 16), jnp.float32)
  call = jax.ffi.ffi_call(cpu_kernels._DENSE_TARGET, jax.ShapeDtypeStruct((2, 32), jnp.float32))
  with pytest.raises(Exception, match=r'panels \(N / 32, K, 32\)'):
    jax.block_until_ready(call(jnp.ones((2, 16)), wrong_width))


@pytest.mark.parametrize('b,t,s,e,heads,mask', [
    (1, 10, 10, 256, 4, 'causal'),  # Batch-1 self-attention.
    (28, 10, 3, 256, 4, 'memory'),  # Batch-28 cross-attention: time + 2 observation rows.
    (3, 5, 7, 12, 3, None),  # Unmasked, head size 4.
    (2, 4, 4, 8, 2, 'none_allowed'),  # Fully masked rows: uniform weights, as in XLA.
])
def test_attention_equals_the_transformer_attention(b, t, s, e, heads, mask):
  rng = np.random.default_rng(3)
  q, k, v = (jnp.asarray(rng.standard_normal(shape).astype(np.float32))
             for shape in ((b, t, e), (b, s, e), (b, s, e)))
  self_mask, memory_mask = transformer.attention_masks(t, s)
  masks = {'causal': self_mask, 'memory': memory_mask, None: None,
           'none_allowed': np.arange(t)[:, None] < np.arange(s)[None, :] - 1}
  got = jax.jit(lambda q, k, v: cpu_kernels.attention(q, k, v, heads, masks[mask]))(q, k, v)
  expected = transformer._attend(q, k, v, heads, masks[mask], jnp.float32)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-6)


def test_attention_refuses_bad_operands():
  q = jnp.ones((2, 3, 8))
  with pytest.raises(ValueError, match=r'divisible by 3 heads.*q float32 \(2, 3, 8\)'):
    cpu_kernels.attention(q, q, q, 3, None)
  with pytest.raises(ValueError, match=r'mask must be \(T, S\) = \(3, 3\), got \(3, 2\)'):
    cpu_kernels.attention(q, q, q, 2, np.ones((3, 2), bool))


def _decoder_layer_case(b, t, e, heads, shared, own, causal, dtype):
  """transformer.DecoderLayer(dtype)'s eval-mode output for random inputs and parameters, and
  cpu_kernels.decoder_layer's, its memory folded beforehand (transformer.fold_cross_attention)
  and the rows shared by every sequence passed once."""
  rng = np.random.default_rng(5)
  layer = transformer.DecoderLayer(heads, dropout_rate=0.1, dtype=dtype)
  x = jnp.asarray(rng.standard_normal((b, t, e)), dtype)
  memory = jnp.asarray(np.concatenate([
      np.broadcast_to(rng.standard_normal((shared, e)), (b, shared, e)),
      rng.standard_normal((b, own, e))], axis=1), dtype)
  self_mask, memory_mask = transformer.attention_masks(t, shared + own)
  masks = (self_mask, memory_mask) if causal else (None, None)
  params = layer.init(jax.random.key(0), x, memory, *masks, train=False)['params']
  params = jax.tree_util.tree_map(  # Biases and norms away from their zero / one init.
      lambda a: a + 0.1 * rng.standard_normal(a.shape).astype(np.float32), params)
  expected = layer.apply({'params': params}, x, memory, *masks, train=False)

  cross = params['multihead_attn']
  folded = transformer.fold_cross_attention(cross, memory, heads, dtype)

  def pack(kernel, bias):
    return cpu_kernels.pack_dense(kernel, bias, dtype)

  dense = [pack(params['self_attn']['in_proj_kernel'], params['self_attn']['in_proj_bias']),
           pack(**params['self_attn']['out_proj']), pack(**params['ffn']['linear1']),
           pack(**params['ffn']['linear2'])]
  norms = [params['norm1'], params['norm2'], params['norm3']]
  got = jax.jit(lambda x, shared_memory, own_memory: cpu_kernels.decoder_layer(
      x, shared_memory, own_memory, norms, dense, cross['out_proj']['bias'], heads, *masks,
      transformer.LAYER_NORM_EPS))(x, folded[0, :shared], folded[:, shared:])
  return np.asarray(expected, np.float32), np.asarray(got, np.float32)


@pytest.mark.parametrize('b,t,e,heads,shared,own,causal', [
    (1, 10, 256, 4, 1, 2, True),  # Batch-1 sampling: the time row, 2 observation rows.
    (3, 5, 40, 4, 1, 0, False),  # No observation rows; N = 3E and 4E not multiples of 32.
    (2, 12, 64, 2, 2, 3, True),  # More rows than a kernel block holds.
    (9, 10, 64, 4, 1, 2, True),  # Attention by whole sequences; 90 rows: 16-row tasks and a rest.
])
def test_decoder_layer_equals_the_flax_layer(b, t, e, heads, shared, own, causal):
  expected, got = _decoder_layer_case(b, t, e, heads, shared, own, causal, jnp.float32)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)


# pylint: disable-next=protected-access
@pytest.mark.skipif(not cpu_kernels._bf16_dense_enabled(), reason='CPU without AVX512-BF16')
@pytest.mark.parametrize('b', [1, 28])
def test_decoder_layer_in_bfloat16_is_as_close_to_float32_as_the_flax_layer(b):
  """Mixed precision: bfloat16 weights, float32 sums, activations rounded to bfloat16. Its
  rounding points differ a little from the bfloat16 module's (logits and GELU stay float32), so
  the check is against the float32 layer: no further from it than the module, and as far as
  bfloat16 arithmetic is (not secretly float32)."""
  case = (b, 10, 256, 4, 1, 2, True)
  exact, _ = _decoder_layer_case(*case, jnp.float32)
  module, got = _decoder_layer_case(*case, jnp.bfloat16)
  error, module_error = np.abs(got - exact), np.abs(module - exact)
  assert error.max() <= 1.1 * module_error.max()
  assert 0.5 * module_error.mean() <= error.mean() <= 1.1 * module_error.mean()


def test_decoder_layer_refuses_bad_operands():
  e, heads = 64, 4
  dense = [cpu_kernels.pack_dense(jnp.ones((k, n)), jnp.ones(n), jnp.float32)
           for k, n in ((e, 3 * e), (e, e), (e, 4 * e), (4 * e, e))]
  norms = [{'scale': jnp.ones(e), 'bias': jnp.zeros(e)}] * 3
  row = heads * (2 * e + 1)
  x, shared, own, bias = (jnp.ones((2, 5, e)), jnp.ones((1, row)), jnp.ones((2, 2, row)),
                          jnp.zeros(e))
  with pytest.raises(ValueError, match=r'shared_memory \(S0, H \(2E \+ 1\)\).*H = 4 heads.*'
                     r'shared_memory \(1, 128\)'):
    cpu_kernels.decoder_layer(x, shared[:, :2 * e], own, norms, dense, bias, heads, None, None,
                              1e-5)
  with pytest.raises(ValueError, match=r'cross_out_bias \(E,\).*cross_out_bias \(3, 64\)'):
    cpu_kernels.decoder_layer(x, shared, own, norms, dense, jnp.zeros((3, e)), heads, None, None,
                              1e-5)
  with pytest.raises(ValueError, match=r'mask must be \(T, S\) = \(5, 3\), got \(5, 5\)'):
    cpu_kernels.decoder_layer(x, shared, own, norms, dense, bias, heads, None, np.ones((5, 5)),
                              1e-5)
  swapped = [dense[1], dense[0], *dense[2:]]  # Packed shapes the kernel itself checks.
  with pytest.raises(Exception, match=r'decoder_layer: expected .* self_qkv \(E -> 3E\)'):
    jax.block_until_ready(cpu_kernels.decoder_layer(x, shared, own, norms, swapped, bias, heads,
                                                    None, None, 1e-5))


@pytest.mark.parametrize('shape', [(1, 10, 256), (28, 10, 256), (3, 7)])
def test_layer_norm_equals_flax(shape):
  rng = np.random.default_rng(4)
  x = jnp.asarray((3 + 2 * rng.standard_normal(shape)).astype(np.float32))
  params = {'scale': jnp.asarray(rng.standard_normal(shape[-1:]).astype(np.float32)),
            'bias': jnp.asarray(rng.standard_normal(shape[-1:]).astype(np.float32))}
  got = jax.jit(cpu_kernels.layer_norm, static_argnums=3)(x, params['scale'], params['bias'],
                                                          1e-5)
  expected = flax.linen.LayerNorm(epsilon=1e-5).apply({'params': params}, x)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=2e-5)
  with pytest.raises(ValueError, match=r'scale and bias \(E,\), got x float32'):
    cpu_kernels.layer_norm(x, params['scale'][1:], params['bias'], 1e-5)


def _conv_float64(x_padded, kernel, stride):
  """Valid convolution as a sum over kernel taps of float64 matmuls (numpy)."""
  kh, kw, _, c_out = kernel.shape
  n, hp, wp, _ = x_padded.shape
  ho, wo = (hp - kh) // stride + 1, (wp - kw) // stride + 1
  out = np.zeros((n, ho, wo, c_out))
  for i in range(kh):
    for j in range(kw):
      window = x_padded[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out += window.astype(np.float64) @ kernel[i, j].astype(np.float64)
  return out


def _conv_kernel_grad_float64(x_padded, grad, kernel_shape, stride):
  kh, kw = kernel_shape[:2]
  ho, wo = grad.shape[1:3]
  out = np.zeros(kernel_shape)
  for i in range(kh):
    for j in range(kw):
      window = x_padded[:, i:i + stride * (ho - 1) + 1:stride, j:j + stride * (wo - 1) + 1:stride]
      out[i, j] = np.einsum('nyxc,nyxo->co', window.astype(np.float64), grad.astype(np.float64))
  return out


@pytest.mark.parametrize('image_shape,kernel_shape,stride,pad', [
    ((2, 76, 76, 3), (7, 7, 3, 64), 2, 3),  # The ResNet stem on 76×76 crops.
    ((3, 19, 19, 64), (3, 3, 64, 64), 1, 1),  # Stage 1; 1,083 pixels: not a multiple of 12 or 96.
    ((2, 19, 19, 64), (3, 3, 64, 128), 2, 1),  # Stage 2's first conv.
    ((2, 19, 19, 64), (1, 1, 64, 128), 2, 0),  # Its 1×1 downsample.
    ((1, 5, 5, 256), (3, 3, 256, 32), 1, 1),  # 25 pixels: fewer than a task, one panel.
    ((5, 2, 4, 40), (3, 3, 40, 96), 1, 1),  # Non-square maps; C not a multiple of 12 or 32.
    # Small maps, processed position by position with the border taps skipped.
    ((13, 3, 3, 512), (3, 3, 512, 64), 1, 1),  # Stage 4: a block of 12 images plus one.
    ((14, 5, 5, 128), (3, 3, 128, 64), 1, 1),  # Stage 3.
    ((12, 10, 10, 64), (3, 3, 64, 64), 2, 1),  # Stride 2 onto 5×5.
    ((3, 5, 6, 32), (3, 3, 32, 32), 2, 1),  # Odd and even sides: 3×3 output, unequal borders.
    # More images than a kernel-gradient block (512); 12-value blocks of dw spanning two taps.
    ((520, 2, 2, 8), (3, 3, 8, 32), 1, 1),
])
def test_conv_and_its_kernel_gradient_equal_float64_sums(image_shape, kernel_shape, stride, pad):
  rng = np.random.default_rng(0)
  image = rng.standard_normal(image_shape).astype(np.float32)
  x = np.pad(image, ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  kernel = rng.standard_normal(kernel_shape).astype(np.float32)
  expected = _conv_float64(x, kernel, stride)
  grad = rng.standard_normal(expected.shape).astype(np.float32)
  expected_grad = _conv_kernel_grad_float64(x, grad, kernel_shape, stride)
  depth = np.prod(kernel_shape[:3])
  # Told the true border, the kernels skip the taps in it; told 0, they compute every tap.
  for told_pad in sorted({pad, 0}):
    got = jax.jit(cpu_kernels.conv, static_argnums=(2, 3))(
        jnp.asarray(x), jnp.asarray(kernel), stride, told_pad)
    assert got.shape == expected.shape and got.dtype == jnp.float32
    np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * np.sqrt(depth))
    got_grad = jax.jit(cpu_kernels.conv_kernel_grad, static_argnums=(2, 3, 4))(
        jnp.asarray(x), jnp.asarray(grad), kernel_shape, stride, told_pad)
    assert got_grad.shape == kernel_shape
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5,
                               atol=1e-5 * np.sqrt(grad.size / kernel_shape[-1]))


@pytest.mark.parametrize('image_shape,c_out', [
    ((3, 7, 9, 16), 32),  # Odd sides: the last tiles half outside the map.
    # 125 tiles: ten full tasks of 12 and a last one of 5; two kernel-gradient chunks.
    ((5, 9, 10, 32), 64),
    ((1, 8, 8, 48), 96),  # C not a multiple of 32; three panels.
])
def test_winograd_conv_and_kernel_gradient_equal_float64_sums(image_shape, c_out):
  rng = np.random.default_rng(3)
  x = np.pad(rng.standard_normal(image_shape).astype(np.float32),
             ((0, 0), (1, 1), (1, 1), (0, 0)))
  kernel = rng.standard_normal((3, 3, image_shape[-1], c_out)).astype(np.float32)
  assert cpu_kernels.winograd_supported(image_shape, kernel.shape, 1, jnp.float32)
  got = jax.jit(cpu_kernels.winograd_conv)(jnp.asarray(x), cpu_kernels.winograd_panels(kernel))
  assert got.shape == image_shape[:3] + (c_out,)
  scale = np.sqrt(9 * image_shape[-1])
  np.testing.assert_allclose(got, _conv_float64(x, kernel, 1), rtol=1e-5, atol=1e-5 * scale)
  grad = rng.standard_normal(image_shape[:3] + (c_out,)).astype(np.float32)
  got_grad = jax.jit(cpu_kernels.winograd_kernel_grad)(jnp.asarray(x), jnp.asarray(grad))
  np.testing.assert_allclose(got_grad, _conv_kernel_grad_float64(x, grad, kernel.shape, 1),
                             rtol=1e-5, atol=1e-5 * np.sqrt(grad.size / c_out))
  # Mirrored: the input gradient's convolution, of C_out channels back to C.
  grad = np.pad(grad, ((0, 0), (1, 1), (1, 1), (0, 0)))
  mirrored = np.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
  if image_shape[-1] % cpu_kernels.PANEL_WIDTH == 0:
    got = cpu_kernels.winograd_conv(jnp.asarray(grad),
                                    cpu_kernels.winograd_panels(kernel, mirror=True))
    np.testing.assert_allclose(got, _conv_float64(grad, mirrored, 1), rtol=1e-5,
                               atol=1e-5 * np.sqrt(9 * c_out))


def test_winograd_panels_are_the_textbook_kernel_transform():
  kernel = np.random.default_rng(4).standard_normal((3, 3, 64, 32)).astype(np.float32)
  g = np.array([[1, 0, 0], [0.5, 0.5, 0.5], [0.5, -0.5, 0.5], [0, 0, 1]])  # Lavin & Gray's G.
  for mirror, oracle in ((False, kernel), (True, np.flip(kernel, (0, 1)).transpose(0, 1, 3, 2))):
    transformed = np.einsum('ai,ijcd,bj->abcd', g, oracle.astype(np.float64), g)
    c, c_out = oracle.shape[2:]
    # Element 4a + b, panel p, row ci, lane i = transformed[a, b, ci, 32 p + i].
    expected = transformed.reshape(16, c, c_out // 32, 32).transpose(0, 2, 1, 3)
    np.testing.assert_allclose(cpu_kernels.winograd_panels(jnp.asarray(kernel), mirror),
                               expected, rtol=1e-6, atol=1e-6)


def test_winograd_only_where_it_pays_and_refuses_bad_operands():
  supported = functools.partial(cpu_kernels.winograd_supported, dtype=jnp.float32)
  assert supported((128, 19, 19, 64), (3, 3, 64, 64), 1)
  assert supported((128, 10, 10, 128), (3, 3, 128, 128), 1)
  assert not supported((128, 5, 5, 256), (3, 3, 256, 256), 1)  # Position-major maps.
  assert not supported((128, 19, 19, 64), (3, 3, 64, 128), 2)
  assert not supported((128, 19, 19, 64), (1, 1, 64, 128), 1)
  assert not supported((128, 19, 19, 64), (3, 3, 64, 48), 1)
  assert not supported((128, 19, 19, 8), (3, 3, 8, 64), 1)
  assert not cpu_kernels.winograd_supported((128, 19, 19, 64), (3, 3, 64, 64), 1, jnp.bfloat16)
  with pytest.raises(ValueError, match=r'C_out \(C if mirrored\) a multiple of 32, got '
                                       r'\(3, 3, 48, 64\) \(mirror=True\)'):
    cpu_kernels.winograd_panels(jnp.ones((3, 3, 48, 64)), mirror=True)
  with pytest.raises(ValueError, match=r'panels \(16, C_out / 32, C, 32\), got x float32 '
                                       r'\(1, 5, 5, 32\) and panels \(16, 1, 16, 32\)'):
    cpu_kernels.winograd_conv(jnp.ones((1, 5, 5, 32)), jnp.ones((16, 1, 16, 32)))
  with pytest.raises(ValueError, match=r'grad \(N, Hp - 2, Wp - 2, C_out\), C_out a multiple '
                                       r'of 32, got x float32 \(1, 5, 5, 16\) and grad float32 '
                                       r'\(1, 3, 4, 32\)'):
    cpu_kernels.winograd_kernel_grad(jnp.ones((1, 5, 5, 16)), jnp.ones((1, 3, 4, 32)))
  call = jax.ffi.ffi_call(cpu_kernels._WINOGRAD_CONV_TARGET,  # pylint: disable=protected-access
                          jax.ShapeDtypeStruct((1, 4, 3, 32), jnp.float32))
  with pytest.raises(Exception, match=r'y \(N, Hp - 2, Wp - 2, C_out\)'):
    jax.block_until_ready(call(jnp.ones((1, 5, 5, 16)), jnp.ones((16, 1, 16, 32))))


@pytest.mark.parametrize('x_shape,kernel_shape,stride', [
    ((2, 17, 17, 64), (3, 3, 64, 64), 1),  # Winograd forward and input gradient.
    ((2, 17, 17, 64), (3, 3, 64, 128), 2),  # Input gradient from XLA's transposed conv.
    ((2, 76, 76, 3), (7, 7, 3, 64), 2),
    ((2, 9, 9, 64), (1, 1, 64, 128), 2),
    ((2, 17, 17, 16), (3, 3, 16, 16), 1),  # Half a panel (zeros added); input gradient XLA's.
    ((2, 20, 20, 3), (7, 7, 3, 48), 2),  # One and a half panels.
])
def test_conv2d_cpu_kernels_matches_xla_forward_and_gradients(x_shape, kernel_shape, stride):
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal(x_shape).astype(np.float32))
  kernel = jnp.asarray(rng.standard_normal(kernel_shape).astype(np.float32))
  outputs, grads = [], []
  for method in ('cpu_kernels', 'xla'):
    conv = lambda x, kernel, method=method: conv_ops.conv2d(x, kernel, stride, method)
    y, vjp = jax.vjp(jax.jit(conv), x, kernel)
    cotangent = jnp.asarray(np.random.default_rng(2).standard_normal(y.shape), jnp.float32)
    outputs.append(y)
    grads.append(vjp(cotangent))
  jaxpr = str(jax.make_jaxpr(jax.grad(lambda k: conv_ops.conv2d(
      x, k, stride, 'cpu_kernels').sum()))(kernel))
  winograd = cpu_kernels.winograd_supported(x.shape, kernel_shape, stride, jnp.float32)
  assert (cpu_kernels._WINOGRAD_KERNEL_GRAD_TARGET if winograd else
          cpu_kernels._CONV_KERNEL_GRAD_TARGET) in jaxpr
  scale = lambda a: float(jnp.max(jnp.abs(a)))
  np.testing.assert_allclose(outputs[0], outputs[1], atol=1e-5 * scale(outputs[1]))
  # Packed ahead (sampling): the same kernel on the same panels.
  packed = conv_ops.packed_kernel(kernel, x.shape, stride, jnp.float32)
  np.testing.assert_array_equal(conv_ops.conv2d_packed(x, packed, kernel_shape, stride),
                                outputs[0])
  if winograd:
    def forward_and_gradients(x, kernel):
      y, vjp = jax.vjp(lambda *a: conv_ops.conv2d(*a, stride, 'cpu_kernels'), x, kernel)
      return y, vjp(cotangent)
    jaxpr = str(jax.make_jaxpr(forward_and_gradients)(x, kernel))
    assert jaxpr.count(cpu_kernels._WINOGRAD_CONV_TARGET) == 2
    assert jaxpr.count(cpu_kernels._WINOGRAD_KERNEL_GRAD_TARGET) == 1
  for ours, xla in zip(*grads):
    np.testing.assert_allclose(ours, xla, atol=1e-5 * scale(xla))


# pylint: disable-next=protected-access
@pytest.mark.skipif(not cpu_kernels._bf16_dense_enabled(), reason='CPU without AVX512-BF16')
@pytest.mark.parametrize('x_shape,kernel_shape,stride', [
    ((3, 19, 19, 64), (3, 3, 64, 64), 1),  # Stage 1; an odd number of images.
    ((2, 10, 10, 64), (3, 3, 64, 128), 2),
    ((5, 10, 10, 64), (1, 1, 64, 128), 2),
    ((13, 3, 3, 512), (3, 3, 512, 64), 1),  # Tiny maps: taps skipped position by position.
    ((2, 9, 9, 6), (1, 1, 6, 32), 1),  # Input gradient from XLA: 6 channels.
    ((3, 20, 20, 3), (7, 7, 3, 64), 2),  # The stem: RGB, one zero channel added.
    ((2, 19, 19, 16), (3, 3, 16, 16), 1),  # conv2d only: half a panel of output channels.
    # 16 images or more: on AMX tiles where the CPU has them (blocks of 16 images and a rest;
    # the kernel gradient's pairs in blocks of 16, the last one short, summed in 4 chunks).
    ((35, 17, 17, 32), (3, 3, 32, 64), 1),
    ((18, 9, 9, 64), (3, 3, 64, 32), 2),
    ((3, 5, 3, 48), (1, 1, 48, 64), 1),  # 45 pixels as images; 48 channels: a lone row tile.
    ((16, 12, 12, 3), (7, 7, 3, 32), 2),  # The stem as 7 x 8 x 4 on AMX tiles (a zero tap).
])
def test_bfloat16_conv_and_gradients_sum_exact_products(x_shape, kernel_shape, stride):
  """bfloat16 operands: their products are exact in float32, so the kernels' float32 sums equal
  float64 sums to float32 rounding (the kernel gradient's; the conv's are rounded once to
  bfloat16); through conv2d the output and both gradients are float32 results for the same
  bfloat16 numbers, rounded once to bfloat16."""
  rng = np.random.default_rng(6)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  kernel = jnp.asarray(0.1 * rng.standard_normal(kernel_shape), jnp.bfloat16)
  assert cpu_kernels.conv_supported(x_shape, kernel_shape, stride, jnp.bfloat16)
  pad = kernel_shape[0] // 2
  x_padded = np.pad(np.asarray(x, np.float32), ((0, 0), (pad, pad), (pad, pad), (0, 0)))
  expected = _conv_float64(x_padded, np.asarray(kernel, np.float32), stride)
  cotangent = jnp.asarray(rng.standard_normal(expected.shape), jnp.bfloat16)
  expected_grad = _conv_kernel_grad_float64(x_padded, np.asarray(cotangent, np.float32),
                                            kernel_shape, stride)
  bf16_padded = jnp.asarray(x_padded, jnp.bfloat16)
  if kernel_shape[-1] % 32 == 0:  # The kernels themselves; conv2d fills up narrower panels.
    if x_shape[-1] % 2 == 0:
      got = jax.jit(cpu_kernels.conv, static_argnums=(2, 3))(bf16_padded, kernel, stride, pad)
      assert got.dtype == jnp.bfloat16
      np.testing.assert_allclose(np.asarray(got, np.float32), expected, rtol=2**-8,
                                 atol=1e-5 * np.abs(expected).max())
    got_grad = jax.jit(cpu_kernels.conv_kernel_grad, static_argnums=(2, 3, 4))(
        bf16_padded, cotangent, kernel_shape, stride, pad)
    np.testing.assert_allclose(got_grad, expected_grad, rtol=1e-5,
                               atol=1e-5 * np.abs(expected_grad).max())

  conv = jax.jit(lambda x, kernel: conv_ops.conv2d(x, kernel, stride, 'cpu_kernels'))
  y, vjp = jax.vjp(conv, x, kernel)
  grads = vjp(cotangent)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  packed = conv_ops.packed_kernel(f32(kernel), x.shape, stride, jnp.bfloat16)
  np.testing.assert_array_equal(f32(conv_ops.conv2d_packed(x, packed, kernel_shape, stride)),
                                f32(y))
  jaxpr = str(jax.make_jaxpr(vjp)(cotangent))
  assert cpu_kernels._CONV_KERNEL_GRAD_BF16_TARGET in jaxpr
  # The same bfloat16 numbers in float32 (XLA), rounded to bfloat16 once.
  y32, vjp32 = jax.vjp(lambda x, kernel: conv_ops.conv2d(x, kernel, stride), f32(x), f32(kernel))
  for ours, reference in zip((y, *grads), (y32, *vjp32(f32(cotangent)))):
    assert ours.dtype == jnp.bfloat16 and ours.shape == reference.shape
    # At most one bfloat16 step apart (2^-7 relative), where float32 sums round differently.
    np.testing.assert_allclose(f32(ours), f32(reference.astype(jnp.bfloat16)),
                               rtol=2**-7, atol=1e-6 * float(jnp.abs(reference).max()))


# pylint: disable-next=protected-access
@pytest.mark.skipif(not cpu_kernels._bf16_dense_enabled(), reason='CPU without AVX512-BF16')
@pytest.mark.parametrize('x_shape,n', [((64, 10, 256), 768), ((3, 7), 64), ((5, 256), 16),
                                         ((5, 256), 8)])
def test_bfloat16_matmul_on_the_conv_kernels(x_shape, n):
  """conv_ops.matmul in bfloat16: the kernels' 1×1 convolution where N is a multiple of 16 (an
  odd K included), XLA's dot otherwise; both with float32 results for the same bfloat16 numbers,
  rounded once."""
  rng = np.random.default_rng(7)
  x = jnp.asarray(rng.standard_normal(x_shape), jnp.bfloat16)
  kernel = jnp.asarray(0.1 * rng.standard_normal((x_shape[-1], n)), jnp.bfloat16)
  cotangent = jnp.asarray(rng.standard_normal(x_shape[:-1] + (n,)), jnp.bfloat16)
  y, vjp = jax.vjp(jax.jit(conv_ops.matmul), x, kernel)
  on_kernels = cpu_kernels._CONV_KERNEL_GRAD_BF16_TARGET in str(jax.make_jaxpr(vjp)(cotangent))
  assert on_kernels == (n % 16 == 0)
  f32 = lambda a: jnp.asarray(a, jnp.float32)
  y32, vjp32 = jax.vjp(lambda x, kernel: x @ kernel, f32(x), f32(kernel))
  for ours, reference in zip((y, *vjp(cotangent)), (y32, *vjp32(f32(cotangent)))):
    assert ours.dtype == jnp.bfloat16 and ours.shape == reference.shape
    np.testing.assert_allclose(f32(ours), f32(reference.astype(jnp.bfloat16)), rtol=2**-7,
                               atol=1e-6 * float(jnp.abs(reference).max()))


def test_conv_refuses_what_it_cannot_run():
  assert cpu_kernels.conv_supported((2, 9, 9, 64), (3, 3, 64, 64), 1, jnp.float32)
  assert not cpu_kernels.conv_supported((2, 9, 9, 64), (3, 3, 64, 40), 1, jnp.float32)
  with pytest.raises(ValueError, match=r'expected float32 or bfloat16 padded x .* got x float16'):
    cpu_kernels.conv(jnp.ones((1, 5, 5, 64), jnp.float16), jnp.ones((3, 3, 64, 64)), 1, 1)
  with pytest.raises(ValueError, match=r'C even for a bfloat16 conv\), got x bfloat16'):
    cpu_kernels.conv(jnp.ones((1, 5, 5, 3), jnp.bfloat16), jnp.ones((3, 3, 3, 64)), 1, 1)
  assert cpu_kernels.conv_supported((2, 9, 9, 16), (3, 3, 16, 16), 1, jnp.float32)
  # bfloat16: where the CPU has AVX512-BF16, any C (conv_ops pads an odd one).
  for c in (64, 3):
    assert cpu_kernels.conv_supported((2, 9, 9, c), (3, 3, c, 64), 1, jnp.bfloat16) == (
        cpu_kernels._bf16_dense_enabled())  # pylint: disable=protected-access
  with pytest.raises(ValueError, match=r"'cpu_kernels' cannot run x float32 \(2, 9, 9, 64\) "
                                       r'with kernel \(3, 3, 64, 40\)'):
    conv_ops.conv2d(jnp.ones((2, 9, 9, 64)), jnp.ones((3, 3, 64, 40)), 1, 'cpu_kernels')
  with pytest.raises(ValueError, match=r'panels float32 \(2, 576, 32\) are not those of kernel '
                                       r'\(3, 3, 64, 32\) for float32 \(expected float32 '
                                       r'\(1, 576, 32\)\)'):
    cpu_kernels.conv(jnp.ones((1, 5, 5, 64)), jnp.ones((3, 3, 64, 32)), 1, 1,
                     panels=jnp.ones((2, 576, 32)))
  with pytest.raises(ValueError, match=r'C_out a multiple of 32 for kernel \(3, 3, 8, 16\)'):
    cpu_kernels.conv(jnp.ones((1, 5, 5, 8)), jnp.ones((3, 3, 8, 16)), 1, 1)
  with pytest.raises(ValueError, match=r'expected float32 grad \(1, 3, 3, 32\)'):
    cpu_kernels.conv_kernel_grad(jnp.ones((1, 5, 5, 8)), jnp.ones((1, 4, 4, 32)),
                                 (3, 3, 8, 32), 1, 1)
  with pytest.raises(ValueError, match=r'expected bfloat16 grad \(1, 3, 3, 32\), got float32'):
    cpu_kernels.conv_kernel_grad(jnp.ones((1, 5, 5, 8), jnp.bfloat16), jnp.ones((1, 3, 3, 32)),
                                 (3, 3, 8, 32), 1, 1)
  # The C++ handler checks its operands itself: here an output larger than the input allows.
  call = jax.ffi.ffi_call(cpu_kernels._CONV_TARGET,
                          jax.ShapeDtypeStruct((1, 4, 4, 32), jnp.float32))
  with pytest.raises(Exception, match=r'an output \(N, Ho, Wo, C_out\) inside it'):
    jax.block_until_ready(call(jnp.ones((1, 5, 5, 8)), jnp.ones((1, 72, 32)), kh=np.int64(3),
                               kw=np.int64(3), stride=np.int64(1), pad=np.int64(1)))


def test_max_pool_records_the_first_maximum_and_refuses_bad_operands():
  # Values against torch (ties included) are in test_conv_ops; here the recorded argmax itself,
  # in the vector lanes (channels 0, 1) and the channels after the last 16 (16, 17).
  x = np.zeros((1, 4, 4, 18), np.float32)
  x[0, 1, 2, [0, 16]] = 5.0  # Window (row 1, col 1) spans rows 1-3, cols 1-3: offset (0, 1) = 1.
  x[0, 3, 3, [1, 17]] = 1.0  # Channel 1: ties at 0 elsewhere, 1.0 at offset (2, 2) = 8.
  pooled, argmax = jax.jit(cpu_kernels.max_pool)(jnp.asarray(x))
  assert pooled.shape == argmax.shape == (1, 2, 2, 18) and argmax.dtype == jnp.int8
  for c in (0, 16):
    assert pooled[0, 1, 1, c] == 5.0 and argmax[0, 1, 1, c] == 1
    assert pooled[0, 1, 1, c + 1] == 1.0 and argmax[0, 1, 1, c + 1] == 8
    assert argmax[0, 0, 0, c + 1] == 4  # All zeros: the first in-image offset, (1, 1).
  x[0, 0, 0, [0, 16]] = np.nan  # A NaN wins its windows, as in torch and XLA's max.
  pooled, argmax = jax.jit(cpu_kernels.max_pool)(jnp.asarray(x))
  for c in (0, 16):
    assert np.isnan(pooled[0, 0, 0, c]) and argmax[0, 0, 0, c] == 4
    assert pooled[0, 1, 1, c] == 5.0
  with pytest.raises(ValueError, match=r'expected int8 argmax and float32 grad \(1, 2, 2, 2\)'):
    cpu_kernels.max_pool_grad(argmax[..., :2], jnp.ones((1, 2, 2, 3)), (1, 4, 4, 2))
  with pytest.raises(ValueError, match=r'expected float32 x \(N, H, W, C\), got float32 \(4, 4\)'):
    cpu_kernels.max_pool(jnp.ones((4, 4)))


def test_disabled_traces_with_xla_ops_and_no_trace_crosses_it():
  kernel, bias = _layer(16, 64)
  packed_shape = lambda: jax.eval_shape(
      lambda k, b: cpu_kernels.pack_dense(k, b, jnp.float32), kernel, bias).kernel.shape
  assert packed_shape() == (2, 16, 32)
  with cpu_kernels.disabled():
    assert not cpu_kernels.enabled(jnp.float32) and packed_shape() == (16, 64)
    with cpu_kernels.disabled():  # Nests.
      assert not cpu_kernels.enabled(jnp.float32)
    assert not cpu_kernels.enabled(jnp.float32)
  assert cpu_kernels.enabled(jnp.float32) and packed_shape() == (2, 16, 32)
  # One jitted function: traced anew inside, and anew again outside.
  pool = jax.jit(lambda x: conv_ops.max_pool_3x3_stride2(x))
  images = jnp.ones((1, 4, 4, 2))
  assert 'dpjax_max_pool' in pool.lower(images).as_text()
  with cpu_kernels.disabled():
    assert 'dpjax_max_pool' not in pool.lower(images).as_text()
  assert 'dpjax_max_pool' in pool.lower(images).as_text()


@pytest.mark.parametrize('kernel_shape', [(3, 3, 64, 96), (7, 7, 3, 64), (1, 1, 256, 32)])
def test_conv_kernel_packing_matches_the_numpy_layouts(kernel_shape):
  kernel = np.random.default_rng(0).standard_normal(kernel_shape).astype(np.float32)
  kh, kw, c, c_out = kernel_shape
  pack = jax.jit(cpu_kernels._pack_conv_kernel, static_argnums=1)  # pylint: disable=protected-access
  # Panel p, row (ky, kx, ci), lane i = kernel[ky, kx, ci, 32 p + i].
  plain = kernel.reshape(kh * kw * c, c_out // 32, 32).transpose(1, 0, 2)
  np.testing.assert_array_equal(pack(jnp.asarray(kernel), False), plain)
  if c % 32 == 0:
    # The input gradient's kernel: mirrored in space, channel axes swapped.
    swapped = np.flip(kernel, (0, 1)).transpose(0, 1, 3, 2)
    mirrored = swapped.reshape(kh * kw * c_out, c // 32, 32).transpose(1, 0, 2)
    np.testing.assert_array_equal(pack(jnp.asarray(kernel), True), mirrored)
