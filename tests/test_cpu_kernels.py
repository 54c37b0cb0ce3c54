"""The CPU sampling kernels (dpjax/models/cpu_kernels.cc): build, values against independent
formulations (float64 numpy matmul, the XLA attention of the transformer)."""

import flax.linen
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import cpu_kernels
from dpjax.models import transformer


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
  with pytest.raises(RuntimeError, match='`false .*cpu_kernels.cc.*` failed'):
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
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.bfloat16)
  assert layer.kernel.shape == (16, 8) and layer.kernel.dtype == jnp.bfloat16
  out = cpu_kernels.dense(layer, jnp.ones((2, 16), jnp.float32))
  assert out.dtype == jnp.bfloat16
  np.testing.assert_allclose(out.astype(np.float32), np.broadcast_to(kernel.sum(0) + bias, (2, 8)),
                             rtol=2e-2, atol=0.1)


def test_bad_shapes_are_refused():
  kernel, bias = _layer(16, 8)
  with pytest.raises(ValueError, match=r'kernel \(K, N\) and bias \(N,\), got \(16, 8\) and '
                                       r'\(9,\)'):
    cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.zeros(9), jnp.float32)
  layer = cpu_kernels.pack_dense(jnp.asarray(kernel), jnp.asarray(bias), jnp.float32)
  with pytest.raises(ValueError, match=r'float32 x \(\.\.\., 16\).*\(2, 15\)'):
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
