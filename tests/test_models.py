"""Tests for dpjax/models: masks, causality, parameter counts, PyTorch parity, crops, groups."""

import contextlib
import functools
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from configs.lift import get_config
from dpjax.data.shape_meta import ShapeMeta
from dpjax.models import cpu_kernels as cpu_kernels_lib
from dpjax.models import pallas_decoder, param_groups
from dpjax.models import transformer as transformer_lib
from dpjax.models.obs_encoder import (ImageEncoder, ObservationEncoder, SpatialSoftmax,
                                      crop_images, output_dim)
from dpjax.models import resnet
from dpjax.models.resnet import ResNet18, conv_method
from dpjax.models.transformer import TransformerForDiffusion, attention_masks

LIFT = ShapeMeta.from_config(get_config().task.shape_meta)


def _count(tree) -> int:
  return sum(int(np.prod(x.shape)) for x in jax.tree_util.tree_leaves(tree))


def _random_params(shapes, seed=0):
  """Random values for an eval_shape'd parameter tree (fast: no XLA compile of initialisers).

  Kernels and embeddings ~ N(0, 1/fan_in); 1-D leaves: `scale` ~ 1 + 0.2·N, others 0.2·N, so
  every parameter (norms and biases included) visibly shapes the output.
  """
  rng = np.random.default_rng(seed)
  paths_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  values = []
  for path, leaf in paths_leaves:
    name = str(getattr(path[-1], 'key', path[-1]))
    if len(leaf.shape) == 1:
      value = (1.0 if name == 'scale' else 0.0) + 0.2 * rng.normal(size=leaf.shape)
    else:
      value = rng.normal(size=leaf.shape) / np.sqrt(np.prod(leaf.shape[:-1]))
    values.append(jnp.asarray(value, jnp.float32))
  return jax.tree_util.tree_unflatten(treedef, values)


def _small_transformer(**overrides):
  kwargs = dict(input_dim=3, output_dim=3, horizon=10, n_obs_steps=2, cond_dim=5, n_layer=2,
                n_head=2, n_emb=16, p_drop_emb=0.0, p_drop_attn=0.3)
  kwargs.update(overrides)
  return TransformerForDiffusion(**kwargs)


def _transformer_inputs(batch=2, horizon=10, input_dim=3, n_obs=2, cond_dim=5, seed=0):
  k1, k2 = jax.random.split(jax.random.key(seed))
  sample = jax.random.normal(k1, (batch, horizon, input_dim))
  cond = jax.random.normal(k2, (batch, n_obs, cond_dim)) if cond_dim else None
  return sample, jnp.array([3, 57][:batch]), cond


def _small_transformer_with_params(**overrides):
  model = _small_transformer(**overrides)
  sample, timestep, cond = _transformer_inputs(cond_dim=model.cond_dim)
  tokens = sample[:, :model.horizon - model.first_step]
  params = _random_params(jax.eval_shape(model.init, jax.random.key(0), tokens, timestep, cond))
  return model, params, (sample, timestep, cond)


def _jit_apply(model):
  # Compiled once per test: eager op-by-op dispatch costs far more on a small CPU.
  return jax.jit(model.apply, static_argnames='train')


def _dropout_rngs(seed):
  # 'unsafe_rbg' keys compile much faster than threefry on CPU; dropout semantics are equal.
  return {'dropout': jax.random.key(seed, impl='unsafe_rbg')}


# ---------------------------------------------------------------------------------------------
# Masks and causality.

def test_attention_masks_equal_reference_patterns():
  self_mask, memory_mask = attention_masks(10, 3)
  expected_self = np.array([[c == '1' for c in row] for row in [
      '1000000000',
      '1100000000',
      '1110000000',
      '1111000000',
      '1111100000',
      '1111110000',
      '1111111000',
      '1111111100',
      '1111111110',
      '1111111111',
  ]])
  # Condition tokens: [time, obs 0, obs 1]; action token 0 sees time and obs 0 only.
  expected_memory = np.array([[c == '1' for c in row] for row in
                              ['110'] + ['111'] * 9])
  assert self_mask.dtype == bool and memory_mask.dtype == bool
  np.testing.assert_array_equal(self_mask, expected_self)
  np.testing.assert_array_equal(memory_mask, expected_memory)


def _dependencies(model, params, inputs, train):
  """max |∂ out[0, t] / ∂ sample[0, s]| as (T, T) and |∂ out[0, t] / ∂ cond[0, s]| as (T, To)."""
  sample, timestep, cond = inputs
  rngs = _dropout_rngs(7) if train else None
  f = lambda s, c: model.apply(params, s, timestep, c, train=train, rngs=rngs)[0]
  jacobians = jax.jit(jax.jacobian(f, argnums=(0, 1)))(sample, cond)  # (T, Do, B, T_in, D)
  return [np.asarray(jnp.max(jnp.abs(j[:, :, 0]), axis=(1, 3))) for j in jacobians]


@pytest.mark.parametrize('train', [False, True])
def test_future_actions_and_late_obs_do_not_reach_earlier_outputs(train):
  model, params, inputs = _small_transformer_with_params()
  dep, dep_cond = _dependencies(model, params, inputs, train)
  causal = np.tril(np.ones((10, 10), bool))
  assert np.all(dep[~causal] == 0.0), 'an output depends on a future action token'
  assert np.all(dep[causal] > 0.0), 'an output ignores a past action token'
  # Memory mask: output token 0 must not see observation step 1 (condition token 2).
  assert dep_cond[0, 1] == 0.0
  assert dep_cond[0, 0] > 0.0 and np.all(dep_cond[1:] > 0.0)


def test_executed_actions_only_see_every_observation_from_the_first():
  """pred_action_steps_only: the 8 tokens are steps To − 1 … of the horizon, so the first one
  (the action executed now) sees the newest observation; the tokens stay causal among
  themselves."""
  model, params, (sample, timestep, cond) = _small_transformer_with_params(first_step=1)
  dep, dep_cond = _dependencies(model, params, (sample[:, :8], timestep, cond), False)
  assert np.all(dep_cond > 0.0), 'an executed action ignores an observation'
  causal = np.tril(np.ones((8, 8), bool))
  assert np.all(dep[~causal] == 0.0) and np.all(dep[causal] > 0.0)
  with pytest.raises(ValueError, match=r'T ≤ 9, 3\) \(horizon 10 from step 1'):
    model.apply(params, sample, timestep, cond)


def test_without_causal_attention_the_future_leaks():
  model, params, inputs = _small_transformer_with_params(causal_attn=False)
  dep, dep_cond = _dependencies(model, params, inputs, False)
  assert np.all(dep > 0.0) and np.all(dep_cond > 0.0)


def test_shorter_sample_equals_prefix_of_causal_output():
  # pred_action_steps_only feeds t < horizon tokens; with causal masks the first t outputs
  # cannot depend on the missing tail.
  model, params, (sample, timestep, cond) = _small_transformer_with_params()
  apply = _jit_apply(model)
  full = apply(params, sample, timestep, cond)
  short = apply(params, sample[:, :8], timestep, cond)
  np.testing.assert_allclose(short, full[:, :8], atol=1e-6)


# ---------------------------------------------------------------------------------------------
# Dropout, timestep broadcasting, configuration errors, dtype.

def test_dropout_only_in_training():
  model, params, (sample, timestep, cond) = _small_transformer_with_params(p_drop_emb=0.1)
  apply = _jit_apply(model)
  eval_a = apply(params, sample, timestep, cond, train=False)
  eval_b = apply(params, sample, timestep, cond, train=False, rngs=_dropout_rngs(5))
  np.testing.assert_array_equal(eval_a, eval_b)
  train = lambda k: apply(params, sample, timestep, cond, train=True, rngs=_dropout_rngs(k))
  np.testing.assert_array_equal(train(1), train(1))
  assert np.max(np.abs(train(1) - train(2))) > 1e-4
  assert np.max(np.abs(train(1) - eval_a)) > 1e-4


def test_scalar_timestep_broadcasts():
  model, params, (sample, _, cond) = _small_transformer_with_params()
  apply = _jit_apply(model)
  scalar = apply(params, sample, 42, cond)
  vector = apply(params, sample, jnp.array([42, 42]), cond)
  np.testing.assert_allclose(scalar, vector, atol=1e-6)
  with pytest.raises(ValueError, match='timestep'):
    model.apply(params, sample, jnp.array([1, 2, 3]), cond)


@pytest.mark.parametrize('overrides, match', [
    (dict(cond_dim=0), 'cond_dim > 0'),
    (dict(obs_as_cond=False), 'cond_dim must be 0'),
    (dict(time_as_cond=False), 'encoder-only'),
    (dict(n_head=3), 'divisible'),
])
def test_transformer_config_errors(overrides, match):
  model = _small_transformer(**overrides)
  sample, timestep, cond = _transformer_inputs()
  with pytest.raises(ValueError, match=match):
    model.init(jax.random.key(0), sample, timestep, cond)


def test_cond_shape_is_checked():
  model = _small_transformer()
  sample, timestep, cond = _transformer_inputs()
  with pytest.raises(ValueError, match='cond must have shape'):
    model.init(jax.random.key(0), sample, timestep, cond[:, :1])


def test_bfloat16_compute_keeps_float32_params_and_output():
  model, params, (sample, timestep, cond) = _small_transformer_with_params(dtype=jnp.bfloat16)
  shapes = jax.eval_shape(model.init, jax.random.key(0), sample, timestep, cond)
  assert all(x.dtype == jnp.float32 for x in jax.tree_util.tree_leaves(shapes))
  out = _jit_apply(model)(params, sample, timestep, cond)
  reference = _jit_apply(_small_transformer())(params, sample, timestep, cond)
  assert out.dtype == jnp.float32
  assert np.max(np.abs(out - reference)) < 0.05 * np.max(np.abs(reference))


def test_transformer_init_follows_reference_scheme():
  # 'unsafe_rbg' keys only make the initialisers compile fast; the scheme is the same.
  model = _small_transformer(n_emb=64, n_layer=1)
  sample, timestep, cond = _transformer_inputs()
  params = jax.jit(model.init)(jax.random.key(0, impl='unsafe_rbg'), sample, timestep,
                               cond)['params']
  layer = params['decoder_layers_0']
  for kernel in (layer['ffn']['linear1']['kernel'], layer['self_attn']['in_proj_kernel'],
                 params['cond_encoder_fc1']['kernel'], params['pos_emb']):
    assert abs(float(jnp.std(kernel)) - 0.02) < 0.002 and abs(float(jnp.mean(kernel))) < 0.002
  for bias in (layer['ffn']['linear1']['bias'], layer['self_attn']['in_proj_bias'],
               layer['multihead_attn']['out_proj']['bias'], params['head']['bias'],
               params['ln_f']['bias'], layer['norm2']['bias']):
    np.testing.assert_array_equal(bias, 0.0)
  np.testing.assert_array_equal(layer['norm3']['scale'], 1.0)
  assert float(jnp.std(params['cond_pos_emb'])) > 0.01
  # Without observation tokens the reference leaves cond_pos_emb at its zero initial value.
  time_only = _small_transformer(obs_as_cond=False, cond_dim=0, n_layer=1)
  cond_pos_emb = jax.jit(time_only.init)(jax.random.key(0, impl='unsafe_rbg'), sample,
                                         timestep)['params']['cond_pos_emb']
  assert cond_pos_emb.shape == (1, 1, 16)
  np.testing.assert_array_equal(cond_pos_emb, 0.0)


# ---------------------------------------------------------------------------------------------
# Parity with the reference network assembled from torch.nn (weights copied from Flax).

class _TorchSinusoidalPosEmb(torch.nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.dim = dim

  def forward(self, x):
    half_dim = self.dim // 2
    emb = math.log(10000) / (half_dim - 1)
    emb = torch.exp(torch.arange(half_dim) * -emb)
    emb = x[:, None] * emb[None, :]
    return torch.cat((emb.sin(), emb.cos()), dim=-1)


class _TorchTransformerForDiffusion(torch.nn.Module):
  """The reference TransformerForDiffusion (__init__ layout and forward), dropout-free."""

  def __init__(self, input_dim, output_dim, horizon, n_obs_steps, cond_dim, n_layer, n_head,
               n_emb, causal_attn, time_as_cond, n_cond_layers):
    super().__init__()
    nn = torch.nn
    T, T_cond = horizon, 1
    if not time_as_cond:
      T, T_cond = T + 1, T_cond - 1
    obs_as_cond = cond_dim > 0
    if obs_as_cond:
      T_cond += n_obs_steps
    self.input_emb = nn.Linear(input_dim, n_emb)
    self.pos_emb = nn.Parameter(torch.zeros(1, T, n_emb))
    self.time_emb = _TorchSinusoidalPosEmb(n_emb)
    self.cond_obs_emb = nn.Linear(cond_dim, n_emb) if obs_as_cond else None
    layer_kwargs = dict(d_model=n_emb, nhead=n_head, dim_feedforward=4 * n_emb, dropout=0.0,
                        activation='gelu', batch_first=True, norm_first=True)
    self.encoder_only = T_cond == 0
    if not self.encoder_only:
      self.cond_pos_emb = nn.Parameter(torch.zeros(1, T_cond, n_emb))
      if n_cond_layers > 0:
        self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer_kwargs),
                                             n_cond_layers, enable_nested_tensor=False)
      else:
        self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(),
                                     nn.Linear(4 * n_emb, n_emb))
      self.decoder = nn.TransformerDecoder(nn.TransformerDecoderLayer(**layer_kwargs), n_layer)
    else:
      self.encoder = nn.TransformerEncoder(nn.TransformerEncoderLayer(**layer_kwargs), n_layer,
                                           enable_nested_tensor=False)
    self.mask = self.memory_mask = None
    if causal_attn:
      mask = (torch.triu(torch.ones(T, T)) == 1).transpose(0, 1)
      self.mask = mask.float().masked_fill(mask == 0, float('-inf')).masked_fill(
          mask == 1, float(0.0))
      if time_as_cond and obs_as_cond:
        t, s = torch.meshgrid(torch.arange(T), torch.arange(T_cond), indexing='ij')
        mask = t >= (s - 1)
        self.memory_mask = mask.float().masked_fill(mask == 0, float('-inf')).masked_fill(
            mask == 1, float(0.0))
    self.ln_f = nn.LayerNorm(n_emb)
    self.head = nn.Linear(n_emb, output_dim)

  def forward(self, sample, timestep, cond=None):
    time_emb = self.time_emb(timestep.expand(sample.shape[0])).unsqueeze(1)
    input_emb = self.input_emb(sample)
    if self.encoder_only:
      x = torch.cat([time_emb, input_emb], dim=1)
      x = x + self.pos_emb[:, :x.shape[1], :]
      x = self.encoder(src=x, mask=self.mask)[:, 1:, :]
    else:
      cond_embeddings = time_emb
      if self.cond_obs_emb is not None:
        cond_embeddings = torch.cat([cond_embeddings, self.cond_obs_emb(cond)], dim=1)
      memory = self.encoder(cond_embeddings + self.cond_pos_emb[:, :cond_embeddings.shape[1]])
      x = input_emb + self.pos_emb[:, :input_emb.shape[1], :]
      x = self.decoder(tgt=x, memory=memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
    return self.head(self.ln_f(x))


def _torch_state_from_flax(params):
  """Flax names/layouts → the reference's state_dict names (Linear weights transposed)."""
  state = {}

  def linear(prefix, p):
    state[f'{prefix}.weight'] = np.asarray(p['kernel']).T
    state[f'{prefix}.bias'] = np.asarray(p['bias'])

  def norm(prefix, p):
    state[f'{prefix}.weight'] = np.asarray(p['scale'])
    state[f'{prefix}.bias'] = np.asarray(p['bias'])

  def attention(prefix, p):
    state[f'{prefix}.in_proj_weight'] = np.asarray(p['in_proj_kernel']).T
    state[f'{prefix}.in_proj_bias'] = np.asarray(p['in_proj_bias'])
    linear(f'{prefix}.out_proj', p['out_proj'])

  def layer(prefix, p):
    for name, sub in p.items():
      if name.startswith('norm'):
        norm(f'{prefix}.{name}', sub)
      elif name == 'ffn':
        linear(f'{prefix}.linear1', sub['linear1'])
        linear(f'{prefix}.linear2', sub['linear2'])
      else:
        attention(f'{prefix}.{name}', sub)

  for name, p in params.items():
    if name in ('pos_emb', 'cond_pos_emb'):
      state[name] = np.asarray(p)
    elif name == 'ln_f':
      norm(name, p)
    elif name == 'cond_encoder_fc1':
      linear('encoder.0', p)
    elif name == 'cond_encoder_fc2':
      linear('encoder.2', p)
    elif name.startswith('decoder_layers_'):
      layer(f'decoder.layers.{name.rsplit("_", 1)[1]}', p)
    elif name.startswith(('cond_encoder_layers_', 'encoder_layers_')):
      layer(f'encoder.layers.{name.rsplit("_", 1)[1]}', p)
    else:
      linear(name, p)
  return {k: torch.from_numpy(np.array(v, dtype=np.float32)) for k, v in state.items()}


@pytest.mark.parametrize('overrides', [
    dict(),
    dict(n_cond_layers=1),
    dict(causal_attn=False),
    dict(time_as_cond=False, obs_as_cond=False, cond_dim=0),
], ids=['decoder_mlp_cond', 'decoder_transformer_cond', 'non_causal', 'encoder_only'])
def test_transformer_matches_torch_reference(overrides):
  model, params, (sample, timestep, cond) = _small_transformer_with_params(**overrides)
  ours = np.asarray(_jit_apply(model)(params, sample, timestep, cond))

  reference = _TorchTransformerForDiffusion(
      model.input_dim, model.output_dim, model.horizon, model.n_obs_steps, model.cond_dim,
      model.n_layer, model.n_head, model.n_emb, model.causal_attn, model.time_as_cond,
      model.n_cond_layers).eval()
  reference.load_state_dict(_torch_state_from_flax(params['params']), strict=True)
  to_torch = lambda x: None if x is None else torch.from_numpy(np.array(x))
  with torch.no_grad():
    theirs = reference(to_torch(sample), torch.from_numpy(np.array(timestep)),
                       to_torch(cond)).numpy()
  assert sum(p.numel() for p in reference.parameters()) == _count(params)
  np.testing.assert_allclose(ours, theirs, atol=2e-5, rtol=1e-5)


def test_transformer_gradients_with_its_bias_rule_equal_autodiff(monkeypatch):
  """bfloat16: the Dense layers' and attention projections' own bias gradient (a product with a
  row of ones) against autodiff of the plain addition, every parameter."""
  model, params, (sample, timestep, cond) = _small_transformer_with_params(
      n_cond_layers=1, dtype=jnp.bfloat16)
  cotangent = np.random.default_rng(0).standard_normal(sample.shape).astype(np.float32)

  def grads():
    loss = lambda p: jnp.sum(model.apply(p, sample, timestep, cond) * cotangent)
    return jax.jit(jax.grad(loss))(params)

  ours = grads()
  monkeypatch.setattr(transformer_lib, '_add_bias_by_rows_product', lambda y, bias: y + bias)
  theirs = grads()
  tolerance = 2**-7  # The bias gradients are rounded to bfloat16 once, after other sums.
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(ours),
                          jax.tree_util.tree_leaves(theirs)):
    scale = float(np.abs(b).max())
    np.testing.assert_allclose(a, b, rtol=tolerance, atol=tolerance * scale,
                               err_msg=jax.tree_util.keystr(path))


# ---------------------------------------------------------------------------------------------
# Parameter counts (eval_shape: no memory, no compute).

def test_transformer_parameter_count_equals_reference():
  model = TransformerForDiffusion(input_dim=7, output_dim=7, horizon=10, n_obs_steps=2,
                                  cond_dim=137)
  params = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 10, 7)), 0,
                          jnp.zeros((1, 2, 137)))
  e, ffn = 256, 1024
  attention = (e * 3 * e + 3 * e) + (e * e + e)  # torch in_proj + out_proj
  decoder_layer = 2 * attention + (e * ffn + ffn) + (ffn * e + e) + 3 * 2 * e
  expected = (
      (7 * e + e)            # input_emb
      + 10 * e + 3 * e       # pos_emb, cond_pos_emb
      + (137 * e + e)        # cond_obs_emb
      + (e * ffn + ffn) + (ffn * e + e)  # condition MLP
      + 8 * decoder_layer
      + 2 * e                # ln_f
      + (e * 7 + 7))         # head
  assert expected == 8_996_103  # the reference logs "number of parameters: 8.996103e+06"
  assert _count(params) == expected


def _lift_obs(n, image_size=84, seed=0):
  keys = jax.random.split(jax.random.key(seed), len(LIFT.obs))
  obs = {}
  for key, spec in zip(keys, LIFT.obs):
    shape = (n, image_size, image_size, 3) if spec.kind == 'rgb' else (n,) + spec.shape
    obs[spec.key] = jax.random.uniform(key, shape, minval=-1.0, maxval=1.0)
  return obs


def test_two_image_encoders_parameter_count():
  encoder = ObservationEncoder(LIFT, crop_shape=(76, 76))
  params = jax.eval_shape(lambda: encoder.init(jax.random.key(0), _lift_obs(2), train=False))
  w = 64
  gn = lambda c: 2 * c
  block = lambda cin, cout: 9 * cin * cout + gn(cout) + 9 * cout * cout + gn(cout) + (
      cin * cout + gn(cout) if cin != cout else 0)
  trunk = 49 * 3 * w + gn(w) + sum(
      block(cin, cout) + block(cout, cout)
      for cin, cout in [(w, w), (w, 2 * w), (2 * w, 4 * w), (4 * w, 8 * w)])
  # torchvision resnet18 has 11,689,512 parameters, of which fc holds 512·1000 + 1000.
  assert trunk == 11_689_512 - 513_000
  per_camera = trunk + (512 * 32 + 32) + (64 * 64 + 64)  # + keypoint conv + Linear
  assert 2 * per_camera == 22_394_176
  assert _count(params) == 2 * per_camera
  assert abs(_count(params) - 22.4e6) < 0.1e6


def test_full_size_encoder_shapes():
  trunk = jax.eval_shape(lambda x: ResNet18(64).init_with_output(jax.random.key(0), x)[0],
                         jnp.zeros((4, 76, 76, 3)))
  assert trunk.shape == (4, 3, 3, 512)
  encoder = ObservationEncoder(LIFT, crop_shape=(76, 76))
  obs = _lift_obs(6)
  out = jax.eval_shape(
      lambda: encoder.init_with_output({'params': jax.random.key(0), 'crop': jax.random.key(1)},
                                       obs, train=True)[0])
  assert out.shape == (6, 137) == (6, output_dim(LIFT, 64))


# ---------------------------------------------------------------------------------------------
# Observation encoder behaviour (small widths).

def _small_encoder(**overrides):
  kwargs = dict(shape_meta=LIFT, crop_shape=(76, 76), resnet_width=8, num_keypoints=4,
                feature_dim=8)
  kwargs.update(overrides)
  return ObservationEncoder(**kwargs)


def test_encoder_forward_order_crops_and_determinism():
  encoder = _small_encoder()
  obs = _lift_obs(3)
  params = _random_params(jax.eval_shape(
      functools.partial(encoder.init, train=False), jax.random.key(0), obs))
  apply = jax.jit(encoder.apply, static_argnames='train')
  out = apply(params, obs, train=False)
  assert out.shape == (3, 2 * 8 + 3 + 4 + 2) and out.dtype == jnp.float32
  assert np.all(np.asarray(out[:, :16]) >= 0.0)  # ReLU on image features
  # Low-dim keys pass through unchanged, after both cameras, in shape_meta order.
  np.testing.assert_array_equal(out[:, 16:19], obs['robot0_eef_pos'])
  np.testing.assert_array_equal(out[:, 19:23], obs['robot0_eef_quat'])
  np.testing.assert_array_equal(out[:, 23:25], obs['robot0_gripper_qpos'])
  # Evaluation crops at the centre: the same as encoding centre-sliced 76×76 images, which
  # need no crop (and no rng) even in training.
  sliced = {k: (v[:, 4:80, 4:80] if v.ndim == 4 else v) for k, v in obs.items()}
  np.testing.assert_allclose(apply(params, sliced, train=True), out, atol=1e-6)
  # Training crops at random: deterministic per key, different across keys.
  train = lambda k: apply(params, obs, train=True, rngs={'crop': jax.random.key(k)})
  np.testing.assert_array_equal(train(1), train(1))
  assert np.max(np.abs(train(1)[:, :16] - train(2)[:, :16])) > 1e-6
  with pytest.raises(ValueError, match='crop'):
    encoder.apply(params, obs, train=True)


def test_encoder_rejects_batch_norm_and_bad_inputs():
  obs = _lift_obs(2)
  with pytest.raises(ValueError, match='GroupNorm'):
    _small_encoder(group_norm=False).init(jax.random.key(0), obs, train=False)
  encoder = _small_encoder()
  with pytest.raises(ValueError, match='robot0_eef_quat'):
    encoder.init(jax.random.key(0), {k: v for k, v in obs.items() if k != 'robot0_eef_quat'},
                 train=False)
  uint8 = dict(obs, agentview_image=jnp.zeros((2, 84, 84, 3), jnp.uint8))
  with pytest.raises(ValueError, match='uint8'):
    encoder.init(jax.random.key(0), uint8, train=False)
  small = dict(obs, agentview_image=jnp.zeros((2, 64, 64, 3)))
  with pytest.raises(ValueError, match='agentview_image'):
    encoder.init(jax.random.key(0), small, train=False)


def test_crop_images_centre_random_and_noop():
  n, h, w = 16, 84, 84
  # Pixel value encodes its position, so a crop's top-left pixel reveals its offsets.
  grid = (np.arange(h)[:, None] * 1000 + np.arange(w)[None, :]).astype(np.float32)
  images = jnp.asarray(np.broadcast_to(grid[None, :, :, None], (n, h, w, 3)))
  centre = crop_images(images, (76, 76))
  np.testing.assert_array_equal(centre, images[:, 4:80, 4:80])
  assert crop_images(centre, (76, 76)) is centre

  def offsets(rng):
    crops = np.asarray(crop_images(images, (76, 76), rng))
    assert crops.shape == (n, 76, 76, 3)
    corner = crops[:, 0, 0, 0].astype(int)
    tops, lefts = corner // 1000, corner % 1000
    for i in range(n):  # each crop is an exact window of its source image
      np.testing.assert_array_equal(crops[i], images[i, tops[i]:tops[i] + 76,
                                                     lefts[i]:lefts[i] + 76])
    return tops, lefts

  tops_a, lefts_a = offsets(jax.random.key(0))
  tops_b, lefts_b = offsets(jax.random.key(1))
  # robomimic draws offsets in [0, H − crop): 0..7 for 84 → 76.
  for o in (tops_a, lefts_a, tops_b, lefts_b):
    assert o.min() >= 0 and o.max() <= 7
  assert len(set(tops_a)) > 1 and len(set(lefts_a)) > 1  # independent per image
  assert not (np.array_equal(tops_a, tops_b) and np.array_equal(lefts_a, lefts_b))
  with pytest.raises(ValueError, match='smaller'):
    crop_images(images[:, :70], (76, 76))


def test_spatial_softmax_keypoint_order_and_grid():
  h, w, k = 3, 4, 2
  identity = {'params': {'keypoints': {'kernel': jnp.eye(k).reshape(1, 1, k, k),
                                       'bias': jnp.zeros(k)}}}
  features = np.zeros((1, h, w, k), np.float32)
  features[0, 0, w - 1, 0] = 100.0  # keypoint 0 at the top-right pixel: x = 1, y = −1
  features[0, h - 1, 0, 1] = 100.0  # keypoint 1 at the bottom-left pixel: x = −1, y = 1
  out = SpatialSoftmax(k).apply(identity, jnp.asarray(features))
  np.testing.assert_allclose(out, [[1.0, -1.0, -1.0, 1.0]], atol=1e-6)
  # Random maps against a direct loop over pixels.
  features = np.random.default_rng(0).normal(size=(2, h, w, k)).astype(np.float32)
  out = np.asarray(SpatialSoftmax(k).apply(identity, jnp.asarray(features)))
  xs, ys = np.linspace(-1, 1, w), np.linspace(-1, 1, h)
  for b in range(2):
    for j in range(k):
      p = np.exp(features[b, :, :, j] - features[b, :, :, j].max())
      p /= p.sum()
      expected_x = sum(p[r, c] * xs[c] for r in range(h) for c in range(w))
      expected_y = sum(p[r, c] * ys[r] for r in range(h) for c in range(w))
      np.testing.assert_allclose(out[b, 2 * j:2 * j + 2], [expected_x, expected_y], atol=1e-6)
  # A map one pixel wide holds no position along that axis: such a crop is refused.
  with pytest.raises(ValueError, match='a 3x1 feature map gives keypoints that do not depend'):
    SpatialSoftmax(k).apply(identity, jnp.zeros((1, h, 1, k)))


def _torch_resnet18(params, images):
  """torchvision's resnet18 forward (without avgpool/fc, BatchNorm → GroupNorm C/16).

  params: our parameter tree, its leaves arrays or torch tensors (for gradients); returns the
  NHWC output as a torch tensor."""
  t = lambda a: a if isinstance(a, torch.Tensor) else torch.from_numpy(np.array(a))
  conv = lambda x, p, stride, pad: F.conv2d(x, t(p['kernel']).permute(3, 2, 0, 1),
                                            stride=stride, padding=pad)
  gn = lambda x, p: F.group_norm(x, max(1, x.shape[1] // 16), t(p['scale']), t(p['bias']),
                                 eps=1e-5)
  x = t(images).permute(0, 3, 1, 2)
  x = F.max_pool2d(F.relu(gn(conv(x, params['conv1'], 2, 3), params['norm1'])), 3, 2, 1)
  for stage in range(4):
    for block in range(2):
      p = params[f'layer{stage + 1}_{block}']
      stride = 2 if stage > 0 and block == 0 else 1
      y = F.relu(gn(conv(x, p['conv1'], stride, 1), p['norm1']))
      y = gn(conv(y, p['conv2'], 1, 1), p['norm2'])
      if 'downsample_conv' in p:
        x = gn(conv(x, p['downsample_conv'], stride, 0), p['downsample_norm'])
      x = F.relu(y + x)
  return x.permute(0, 2, 3, 1)


def test_resnet18_group_norm_matches_torch():
  # Width 16: stages of 16/32/64/128 channels → 1/2/4/8 GroupNorm groups.
  model = ResNet18(16)
  images = jax.random.uniform(jax.random.key(0), (2, 44, 44, 3), minval=-1.0, maxval=1.0)
  params = _random_params(jax.eval_shape(model.init, jax.random.key(1), images))['params']
  ours = np.asarray(jax.jit(model.apply)({'params': params}, images))
  assert ours.shape == (2, 2, 2, 128)
  np.testing.assert_allclose(ours, _torch_resnet18(params, images).numpy(), atol=1e-4,
                             rtol=1e-4)


@pytest.mark.skipif(not cpu_kernels_lib.enabled(jnp.float32), reason='no C++ kernels')
@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_group_norm_kernel_sums_match_torch(dtype, monkeypatch):
  """GroupNorm on the channel-moments kernel (statistics, and the backward pass's sums of dy
  and dy·x) against torch's GroupNorm and autograd on the same numbers in float64, and the
  bfloat16 module against its XLA formulation (same float32 arithmetic, other sums)."""
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(0.5, 2.0, (3, 7, 5, 64)), dtype)  # 35 positions: runs of 64 and less.
  cotangent = jnp.asarray(rng.standard_normal(x.shape), dtype)
  module = resnet.GroupNorm(4, dtype=dtype)
  params = {'scale': jnp.asarray(rng.uniform(0.5, 1.5, 64), jnp.float32),
            'bias': jnp.asarray(rng.standard_normal(64), jnp.float32)}

  def run():
    apply = lambda p, x: module.apply({'params': p}, x)
    y, vjp = jax.vjp(jax.jit(apply), params, x)
    return y, vjp(cotangent)

  assert 'dpjax_channel_moments' in str(jax.make_jaxpr(jax.grad(
      lambda x: module.apply({'params': params}, x).astype(jnp.float32).sum()))(x))
  y, (grad_params, grad_x) = run()
  f64 = lambda a: torch.from_numpy(np.asarray(a, np.float64))
  x_t = f64(jnp.asarray(x, jnp.float32)).permute(0, 3, 1, 2).requires_grad_()
  scale_t, bias_t = f64(params['scale']).requires_grad_(), f64(params['bias']).requires_grad_()
  y_t = F.group_norm(x_t, 4, scale_t, bias_t, eps=resnet.GROUP_NORM_EPS)
  (y_t * f64(jnp.asarray(cotangent, jnp.float32)).permute(0, 3, 1, 2)).sum().backward()
  tolerance = 1e-5 if dtype == jnp.float32 else 2**-7  # bfloat16 outputs: one rounding.
  np.testing.assert_allclose(np.asarray(y, np.float32), y_t.detach().permute(0, 2, 3, 1),
                             rtol=tolerance, atol=tolerance)
  for ours, theirs in ((grad_params['scale'], scale_t.grad), (grad_params['bias'], bias_t.grad),
                       (grad_x, x_t.grad.permute(0, 2, 3, 1))):
    scale = float(theirs.abs().max())
    np.testing.assert_allclose(np.asarray(ours, np.float32), theirs, rtol=tolerance,
                               atol=tolerance * scale)
  if dtype == jnp.bfloat16:
    monkeypatch.setattr(cpu_kernels_lib, 'moments_supported', lambda shape, dtype: False)
    y_xla, (grad_params_xla, grad_x_xla) = run()
    f32 = lambda a: np.asarray(a, np.float32)
    np.testing.assert_allclose(f32(y), f32(y_xla), rtol=2**-7, atol=2**-7)
    np.testing.assert_allclose(f32(grad_x), f32(grad_x_xla), rtol=2**-7,
                               atol=2**-7 * np.abs(f32(grad_x_xla)).max())
    for name in ('scale', 'bias'):
      np.testing.assert_allclose(grad_params[name], grad_params_xla[name], rtol=1e-4,
                                 atol=1e-4 * np.abs(grad_params_xla[name]).max())


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_resnet18_parameter_gradients_match_torch(cpu_kernels, monkeypatch):
  # Paper width, every CPU formulation: with the C++ kernels, every conv runs forward and
  # backward on them; without, stage 1 (17×17×64 here) takes the GEMM kernel gradient and stage
  # 4's stride-1 convs the tap GEMMs (allowed here for 2 images). The stem's max-pool takes the
  # first-maximum backward. Every parameter's gradient is checked against torch autograd.
  monkeypatch.setattr(resnet, 'TAP_GEMMS_MIN_IMAGES', 1)
  monkeypatch.setattr(resnet, 'CPU_KERNELS_MIN_PIXELS', 1)
  if not cpu_kernels:
    monkeypatch.setattr(cpu_kernels_lib, 'enabled', lambda dtype: False)
  model = ResNet18(64)
  # Key 1: no ReLU input of this batch lies within float rounding of 0 (with key 0 one does, and
  # a kink's gradient depends on the summation order of the convolution before it).
  images = jax.random.uniform(jax.random.key(1), (2, 68, 68, 3), minval=-1.0, maxval=1.0)
  params = _random_params(jax.eval_shape(model.init, jax.random.key(1), images))['params']
  jaxpr = str(jax.make_jaxpr(model.apply)({'params': params}, images))
  # The max-pool, and all 20 convs and 20 GroupNorms, or stage 1's 4 convs and the 2 reading
  # stage 1 (the tap GEMMs and XLA's GroupNorm are differentiated as they are).
  assert jaxpr.count('custom_vjp_call') == (1 + 20 + 20 if cpu_kernels else 1 + 6)
  # Stride-1 3×3 convs on maps larger than 6×6 (stages 1 and 2: 17×17, 9×9) by Winograd.
  assert jaxpr.count('dpjax_conv') == (13 if cpu_kernels else 0)
  assert jaxpr.count('dpjax_winograd_conv') == (7 if cpu_kernels else 0)
  cotangent = np.random.default_rng(0).normal(size=(2, 3, 3, 512)).astype(np.float32)
  grads = jax.jit(jax.grad(lambda p: jnp.sum(model.apply({'params': p}, images) * cotangent)))(
      params)

  torch_params = jax.tree_util.tree_map(
      lambda a: torch.from_numpy(np.array(a)).requires_grad_(), params)
  (_torch_resnet18(torch_params, images) * torch.from_numpy(cotangent)).sum().backward()
  for (path, ours), theirs in zip(jax.tree_util.tree_leaves_with_path(grads),
                                  jax.tree_util.tree_leaves(torch_params)):
    scale = float(np.abs(theirs.grad.numpy()).max())
    np.testing.assert_allclose(ours, theirs.grad.numpy(), atol=1e-4 * scale, rtol=1e-3,
                               err_msg=jax.tree_util.keystr(path))


@pytest.mark.parametrize('cpu_kernels', [True, False])
def test_conv_method_per_layer_of_the_lift_resnets(cpu_kernels, monkeypatch):
  # 76×76 crops: stem 76² → stage 1 at 19², stage 4 at 3². On CPU in float32, with the C++
  # kernels built, every conv of a training batch (128 images) with multiples of 16 output
  # channels runs on them; batch-1 sampling (4 images) keeps XLA's convolution on maps under 512
  # pixels in all. Without the kernels, stage-1 inputs get the GEMM kernel gradient and stage 4's
  # stride-1 convs the tap GEMMs (from 32 images on). Other backends: XLA.
  if not cpu_kernels:
    monkeypatch.setattr(cpu_kernels_lib, '_usable', lambda: False)
  f32 = jnp.float32

  def method(x_shape, c_out, kernel_size, stride, dtype=f32, backend='cpu'):
    kernel = (kernel_size, kernel_size, x_shape[-1], c_out)
    return conv_method(x_shape, kernel, stride, dtype, backend)

  kernels_or = lambda fallback: 'cpu_kernels' if cpu_kernels else fallback
  assert method((128, 76, 76, 3), 64, 7, 2) == kernels_or('xla')
  assert method((128, 19, 19, 64), 64, 3, 1) == kernels_or('gemm_kernel_grad')
  assert method((128, 19, 19, 64), 128, 3, 2) == kernels_or('gemm_kernel_grad')
  assert method((128, 19, 19, 64), 128, 1, 2) == kernels_or('gemm_kernel_grad')
  assert method((128, 10, 10, 128), 128, 3, 1) == kernels_or('xla')
  assert method((128, 5, 5, 256), 512, 3, 2) == kernels_or('xla')
  assert method((128, 3, 3, 512), 512, 3, 1) == kernels_or('tap_gemms')
  assert method((128, 3, 3, 128), 128, 3, 1) == kernels_or('tap_gemms')
  assert method((4, 19, 19, 64), 64, 3, 1) == kernels_or('gemm_kernel_grad')
  assert method((4, 10, 10, 128), 128, 3, 1) == 'xla'
  assert method((4, 3, 3, 512), 512, 3, 1) == 'xla'
  # Width 16 (cpu variant): 16 output channels fill half a panel of 32 (conv_ops adds zeros);
  # width 8 (smoke) would waste three quarters.
  assert method((128, 19, 19, 16), 16, 3, 1) == kernels_or('xla')
  assert method((128, 10, 10, 32), 32, 3, 1) == kernels_or('xla')
  assert method((128, 19, 19, 16), 32, 3, 1) == kernels_or('xla')  # Input gradient from XLA.
  assert method((128, 19, 19, 16), 32, 3, 2) == kernels_or('xla')
  assert method((128, 19, 19, 8), 8, 3, 1) == 'xla'
  # bfloat16: on the bf16 kernels where the CPU has AVX512-BF16 (the 3-channel stem too: conv_ops
  # adds a zero channel), else the same fallbacks as float32.
  # pylint: disable-next=protected-access
  bf16_kernels = cpu_kernels and cpu_kernels_lib._bf16_dense_enabled()
  bf16_or = lambda fallback: 'cpu_kernels' if bf16_kernels else fallback
  assert method((128, 19, 19, 64), 64, 3, 1, dtype=jnp.bfloat16) == bf16_or('gemm_kernel_grad')
  assert method((128, 3, 3, 512), 512, 3, 1, dtype=jnp.bfloat16) == bf16_or('tap_gemms')
  assert method((128, 76, 76, 3), 64, 7, 2, dtype=jnp.bfloat16) == bf16_or('xla')
  assert method((128, 19, 19, 16), 32, 3, 1, dtype=jnp.bfloat16) == bf16_or('xla')
  assert method((4, 3, 3, 512), 512, 3, 1, dtype=jnp.bfloat16) == 'xla'
  assert method((128, 3, 3, 512), 512, 3, 1, backend='gpu') == 'xla'
  assert method((128, 19, 19, 64), 64, 3, 1, backend='gpu') == 'xla'


def test_image_encoder_init_follows_torch_defaults():
  # torchvision convs: Kaiming normal (fan_out, ReLU); GroupNorm 1 / 0; the keypoint conv and
  # the projection Linear keep torch's default U(±1/sqrt(fan_in)). ('unsafe_rbg': fast compile.)
  params = jax.jit(ImageEncoder(resnet_width=16, num_keypoints=32, feature_dim=64).init)(
      jax.random.key(0, impl='unsafe_rbg'), jnp.zeros((1, 33, 33, 3)))['params']
  conv = params['backbone']['layer4_1']['conv2']['kernel']  # 3×3×128×128
  assert abs(float(jnp.std(conv)) / math.sqrt(2.0 / (9 * 128)) - 1.0) < 0.02
  norm = params['backbone']['layer3_0']['downsample_norm']
  np.testing.assert_array_equal(norm['scale'], 1.0)
  np.testing.assert_array_equal(norm['bias'], 0.0)
  for p, fan_in in ((params['pool']['keypoints'], 128), (params['linear'], 64)):
    bound = 1.0 / math.sqrt(fan_in)
    for x in (p['kernel'], p['bias']):
      assert float(jnp.max(jnp.abs(x))) <= bound
    assert abs(float(jnp.std(p['kernel'])) / (bound / math.sqrt(3.0)) - 1.0) < 0.1


# ---------------------------------------------------------------------------------------------
# Optimizer parameter groups.

def test_param_group_masks_follow_reference_groups():
  noise_model = TransformerForDiffusion(input_dim=7, output_dim=7, horizon=10, n_obs_steps=2,
                                        cond_dim=137)
  tf_params = jax.eval_shape(noise_model.init, jax.random.key(0), jnp.zeros((1, 10, 7)), 0,
                             jnp.zeros((1, 2, 137)))['params']
  enc_params = jax.eval_shape(lambda: _small_encoder().init(
      jax.random.key(0), _lift_obs(1), train=False))['params']
  variables = {'params': {'obs_encoder': enc_params, 'noise_model': tf_params}}

  decay = param_groups.transformer_decay_mask(variables)
  no_decay = param_groups.transformer_no_decay_mask(variables)
  encoder = param_groups.obs_encoder_mask(variables)
  assert jax.tree_util.tree_structure(decay) == jax.tree_util.tree_structure(variables)
  masked = lambda mask: sum(int(np.prod(x.shape)) for x, m in zip(
      jax.tree_util.tree_leaves(variables), jax.tree_util.tree_leaves(mask)) if m)
  # Decay: every Linear / attention weight; no decay: biases, LayerNorms, position embeddings.
  assert masked(decay) == 8_951_552
  assert masked(no_decay) == 44_551 == 8_996_103 - 8_951_552
  assert masked(encoder) == _count(enc_params)
  for a, b, c in zip(*(jax.tree_util.tree_leaves(m) for m in (decay, no_decay, encoder))):
    assert a + b + c == 1  # every leaf in exactly one group

  nm_decay, nm_no_decay = decay['params']['noise_model'], no_decay['params']['noise_model']
  layer = nm_decay['decoder_layers_0']
  assert layer['self_attn']['in_proj_kernel'] and layer['multihead_attn']['out_proj']['kernel']
  assert layer['ffn']['linear1']['kernel'] and nm_decay['cond_encoder_fc1']['kernel']
  assert not layer['self_attn']['in_proj_bias'] and not layer['norm1']['scale']
  assert nm_no_decay['pos_emb'] and nm_no_decay['cond_pos_emb'] and nm_no_decay['ln_f']['scale']
  assert not any(jax.tree_util.tree_leaves(decay['params']['obs_encoder']))

  labels = param_groups.param_group_labels(variables['params'])  # inner layout works too
  assert labels['noise_model']['head']['kernel'] == param_groups.TRANSFORMER_DECAY
  assert labels['obs_encoder']['agentview_image']['linear']['kernel'] == 'obs_encoder'
  with pytest.raises(ValueError, match='neither under'):
    param_groups.transformer_decay_mask({'params': {'unknown': {'kernel': jnp.zeros(1)}}})


@contextlib.contextmanager
def _cached_denoise_path(path, monkeypatch, cpu_kernels_switch):
  """Within: `cached_denoise` takes one of its paths — 'cpu_kernels', 'xla_cpu', 'xla_gpu' (the
  library asks jax.default_backend() which form to build) or 'pallas' (the GPU kernels, in
  Pallas' interpreter). Yields the model sizes the path needs (Triton's tiles for 'pallas')."""
  if path != 'cpu_kernels':
    monkeypatch.setattr(cpu_kernels_lib, cpu_kernels_switch, lambda *_: False)
  if path == 'xla_gpu':
    monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  if path == 'pallas':
    with pallas_decoder.interpreted():
      yield dict(n_emb=32, n_head=2)
  else:
    yield {}


@pytest.mark.parametrize('path', ['cpu_kernels', 'xla_cpu', 'xla_gpu', 'pallas'])
@pytest.mark.parametrize('obs_as_cond,causal_attn,first_step', [
    (True, True, 0), (True, False, 0), (False, True, 0), (False, False, 0),
    (True, True, 1)])  # The last: the executed actions only (pred_action_steps_only).
def test_cached_denoise_equals_the_module(obs_as_cond, causal_attn, first_step, path,
                                          monkeypatch):
  """The sampler's step-invariant cache gives the module's own eval-mode outputs, through the
  CPU kernels, through the XLA ops other backends and dtypes use (in the forms XLA:CPU and
  XLA:GPU get), and through the GPU's Pallas kernels."""
  with _cached_denoise_path(path, monkeypatch, 'enabled') as sizes:
    model, params, (sample, _, cond) = _small_transformer_with_params(
        cond_dim=5 if obs_as_cond else 0, obs_as_cond=obs_as_cond, causal_attn=causal_attn,
        first_step=first_step, **sizes)
    sample = sample[:, :8] if first_step else sample
    timesteps = jnp.array([99, 57, 3, 0])
    apply = _jit_apply(model)
    constants = transformer_lib.decoder_constants(model, params['params'], timesteps)
    obs_memory = transformer_lib.observation_memory(model, params['params'], cond,
                                                    pallas=path == 'pallas')
    assert constants.layers[0].ffn_in.kernel.ndim == (3 if path == 'cpu_kernels' else 2)
    assert transformer_lib.runs_pallas_decoder(model, constants, 10) == (path == 'pallas')
    # Jitted, as the sampler runs it: XLA's fusions, not op-by-op execution, are what is checked.
    cached_denoise = jax.jit(functools.partial(transformer_lib.cached_denoise, model,
                                               pallas=path == 'pallas'))
    for step, t in enumerate(timesteps):
      expected = apply(params, sample, jnp.full((sample.shape[0],), t), cond, train=False)
      got = cached_denoise(params['params'], constants, obs_memory, sample, jnp.int32(step))
      np.testing.assert_allclose(got, expected, atol=1e-5, rtol=1e-5)


def test_cached_denoise_needs_the_observation_memory_of_an_observation_model():
  model, params, (sample, _, cond) = _small_transformer_with_params(causal_attn=False)
  constants = transformer_lib.decoder_constants(model, params['params'], jnp.array([3]))
  with pytest.raises(ValueError, match='obs_as_cond=True takes the observation_memory'):
    transformer_lib.cached_denoise(model, params['params'], constants, None, sample,
                                   jnp.int32(0))
  obs_memory = transformer_lib.observation_memory(model, params['params'], cond)
  with pytest.raises(AssertionError):  # One per layer.
    transformer_lib.cached_denoise(model, params['params'], constants, obs_memory[:1], sample,
                                   jnp.int32(0))


@pytest.mark.parametrize('n_emb,n_head,tokens,memory_rows,expected', [
    (256, 4, 10, 3, True),  # Lift: memory tile 12 → 16 rows.
    (128, 8, 10, 3, True),  # 24 → 32 rows.
    (256, 4, 10, 33, False),  # 132 → 256 rows > 128.
    (32, 2, 10, 17, False),  # 34 → 64 rows > E: the offsets row holds E columns.
    (256, 32, 10, 3, False),  # E / H = 8 < 16.
    (256, 16, 10, 3, False),  # H · T' = 256 stacked self-attention rows > 128.
])
def test_pallas_decoder_fits(n_emb, n_head, tokens, memory_rows, expected):
  assert pallas_decoder.fits(n_emb, n_head, tokens, memory_rows) == expected


@pytest.mark.parametrize('dtype', [jnp.float32, jnp.bfloat16])
def test_pallas_decoder_lowers_to_triton_kernels(dtype, monkeypatch):
  """Lowered for CUDA (no GPU needed), each decoder layer is four Triton kernels: the Triton
  lowering, which Pallas' interpreter skips, takes every operation of the kernels. The FFN
  out-projection's loop (2 chunks of its 4E = 512 rows here) is software-pipelined."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  model, params, (sample, _, cond) = _small_transformer_with_params(n_emb=128, n_head=2,
                                                                    dtype=dtype)
  constants = transformer_lib.decoder_constants(model, params['params'], jnp.array([99, 3]))
  obs_memory = transformer_lib.observation_memory(model, params['params'], cond, pallas=True)
  step = jax.jit(functools.partial(transformer_lib.cached_denoise, model, pallas=True))
  lowered = step.trace(params['params'], constants, obs_memory, sample, jnp.int32(1)).lower(
      lowering_platforms=('cuda',))
  calls = re.findall(r'__gpu\$xla\.gpu\.triton.*', lowered.as_text())
  assert len(calls) == 4 * model.n_layer
  ffn_out = [call for call in calls if 'name = "_ffn_out_kernel"' in call]
  assert len(ffn_out) == model.n_layer and all('num_stages = 2' in call for call in ffn_out)


@pytest.mark.parametrize('path', ['cpu_kernels', 'xla_cpu', 'xla_gpu', 'pallas'])
def test_cached_denoise_in_bfloat16_follows_the_module(path, monkeypatch):
  """Mixed precision: the cache's step (the decoder layer kernel on bfloat16 weights where the
  CPU has AVX512-BF16; else XLA's matmuls, beside the float32 attention and LayerNorm kernels
  where the kernels run; or the GPU's Pallas kernels on bfloat16 weights) stays within bfloat16
  rounding of the module's bfloat16 eval-mode outputs, and of float32."""
  cpu_kernels = path == 'cpu_kernels'
  with _cached_denoise_path(path, monkeypatch, '_usable') as sizes:
    outputs = {}
    for dtype in (jnp.float32, jnp.bfloat16):
      model, params, (sample, _, cond) = _small_transformer_with_params(cond_dim=5, dtype=dtype,
                                                                        **sizes)
      timesteps = jnp.array([99, 3])
      constants = transformer_lib.decoder_constants(model, params['params'], timesteps)
      obs_memory = transformer_lib.observation_memory(model, params['params'], cond,
                                                      pallas=path == 'pallas')
      cached_denoise = jax.jit(functools.partial(transformer_lib.cached_denoise, model,
                                                 pallas=path == 'pallas'))
      outputs[dtype] = [
          (_jit_apply(model)(params, sample, jnp.full((sample.shape[0],), t), cond, train=False),
           cached_denoise(params['params'], constants, obs_memory, sample, jnp.int32(step)))
          for step, t in enumerate(timesteps)]
    # pylint: disable-next=protected-access
    uses_bf16_kernel = cpu_kernels and cpu_kernels_lib._bf16_dense_enabled()
    assert constants.layers[0].ffn_in.kernel.ndim == (4 if uses_bf16_kernel else 2)
    assert transformer_lib.runs_pallas_decoder(model, constants, 10) == (path == 'pallas')
    for (module_f32, _), (module_bf16, cached_bf16) in zip(*outputs.values()):
      assert cached_bf16.dtype == jnp.float32
      np.testing.assert_allclose(cached_bf16, module_bf16, atol=0.05)
      np.testing.assert_allclose(cached_bf16, module_f32, atol=0.05)
