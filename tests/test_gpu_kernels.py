"""The GPU decoder kernels (Pallas/Triton), run in Pallas' interpreter on the CPU, against the
XLA ops of `transformer.cached_denoise` and the module itself."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.models import cpu_kernels, gpu_kernels
from dpjax.models import transformer as transformer_lib


def _denoise(model, params, sample, cond, step):
  constants = transformer_lib.decoder_constants(model, params, jnp.array([99, 3]))
  obs_kv = transformer_lib.observation_kv(model, params, constants, cond)
  return np.asarray(transformer_lib.cached_denoise(model, params, constants, obs_kv, sample,
                                                   jnp.int32(step)))


@pytest.mark.parametrize('obs_as_cond,causal_attn,dtype,atol', [
    (True, True, jnp.float32, 1e-5), (True, False, jnp.float32, 1e-5),
    (False, False, jnp.float32, 1e-5), (True, True, jnp.bfloat16, 0.05)])
def test_decoder_kernels_equal_the_module(obs_as_cond, causal_attn, dtype, atol):
  model = transformer_lib.TransformerForDiffusion(
      input_dim=7, output_dim=7, horizon=10, n_obs_steps=2, cond_dim=5 if obs_as_cond else 0,
      n_layer=2, n_head=4, n_emb=64, p_drop_emb=0.0, p_drop_attn=0.3, obs_as_cond=obs_as_cond,
      causal_attn=causal_attn, dtype=dtype)
  assert gpu_kernels.supports(model.n_emb, model.n_head, 4 * model.n_emb)
  rng = np.random.default_rng(0)
  sample = jnp.asarray(rng.normal(size=(2, 10, 7)), jnp.float32)
  cond = jnp.asarray(rng.normal(size=(2, 2, 5)), jnp.float32) if obs_as_cond else None
  variables = model.init(jax.random.key(0), sample, jnp.zeros((2,)), cond)
  params = jax.tree.map(lambda p: p + 0.1 * jax.random.normal(jax.random.key(1), p.shape),
                        variables['params'])
  expected = model.apply({'params': params}, sample, jnp.full((2,), 3), cond)
  with cpu_kernels.disabled(), gpu_kernels.interpreted():
    got = _denoise(model, params, sample, cond, 1)
  np.testing.assert_allclose(got, expected, atol=atol)
  assert np.abs(expected).max() > 0.3


def test_erf_matches_lax():
  x = jnp.linspace(-6.0, 6.0, 2001)
  # pylint: disable-next=protected-access
  np.testing.assert_allclose(gpu_kernels._erf(x), jax.lax.erf(x), atol=5e-7)


def test_supports_only_power_of_two_blocks():
  assert gpu_kernels.supports(256, 4, 1024)
  assert not gpu_kernels.supports(256, 3, 1024)
  assert not gpu_kernels.supports(96, 2, 384)
  assert not gpu_kernels.supports(32, 2, 128)
