"""DiffusionPolicy: predict_action contract, both conditioning modes, and an overfit check."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from configs import lift
from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion import policy as policy_lib
from dpjax.diffusion.policy import STACKED_CAMERAS, DiffusionPolicy, PolicyNetwork
from dpjax.models import cpu_kernels, pallas_decoder, resnet
from dpjax.models.obs_encoder import output_dim

# The smallest crop whose ResNet-18 map (2x2) lets the keypoints see the image.
IMAGE_SIZE, CROP = 40, (36, 36)
BATCH = 4
# Raw action limits of the test normaliser: not [-1, 1], so unnormalisation is visible.
ACTION_LO = np.array([-0.1, -0.1, -0.1, -0.5, -0.5, -0.5, -1.0], np.float32)
ACTION_HI = np.array([0.1, 0.3, 2.0, 0.5, 1.5, 0.5, 3.0], np.float32)


def _config(prediction_type='epsilon', **model_overrides):
  """smoke values, 40×40 images cropped to 36×36. Only the agentview camera: a second one
  would double what XLA compiles, and combining cameras is the encoder's (tested) business."""
  config = lift.get_config('smoke')
  shape_meta = lift._shape_meta(IMAGE_SIZE)
  shape_meta.obs = tuple(e for e in shape_meta.obs if e[0] != 'robot0_eye_in_hand_image')
  config.task.shape_meta = shape_meta
  config.model.crop_shape = CROP
  config.diffusion.num_train_timesteps = 100
  config.diffusion.num_inference_steps = 100
  config.diffusion.prediction_type = prediction_type
  for name, value in model_overrides.items():
    setattr(config.model, name, value)
  return config


def _normalizer(shape_meta, rng):
  low_dim = {s.key: rng.uniform(-1, 1, (64,) + s.shape).astype(np.float32)
             for s in shape_meta.obs if s.kind == 'low_dim'}
  fitted = Normalizer.fit(low_dim, shape_meta)
  scale = 2.0 / (ACTION_HI - ACTION_LO)
  return fitted.replace(
      scale={**fitted.scale, 'action': scale},
      offset={**fitted.offset, 'action': -1.0 - scale * ACTION_LO},
      modes=tuple((k, 'limits' if k == 'action' else m) for k, m in fitted.modes))


def _batch(shape_meta, rng, n_obs_steps=2):
  obs = {}
  for s in shape_meta.obs:
    if s.kind == 'rgb':
      obs[s.key] = rng.integers(0, 256, (BATCH, n_obs_steps) + s.shape, dtype=np.uint8)
    else:
      obs[s.key] = rng.uniform(-1, 1, (BATCH, n_obs_steps) + s.shape).astype(np.float32)
  action = rng.uniform(ACTION_LO, ACTION_HI, (BATCH, 10, 7)).astype(np.float32)
  return {'obs': obs, 'action': action}


def _make_policy(config):
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  return DiffusionPolicy(config, shape_meta, _normalizer(shape_meta, np.random.default_rng(0)))


@functools.lru_cache(maxsize=None)
def _base_policy():
  """No dropout (the overfit test reuses its variables)."""
  policy = _make_policy(_config(p_drop_attn=0.0))
  return policy, policy.init(jax.random.key(0))


def test_predict_action_contract():
  policy, variables = _base_policy()
  assert set(variables) == {'params'}
  assert set(variables['params']) == {'obs_encoder', 'noise_model'}
  batch = _batch(policy.shape_meta, np.random.default_rng(1))
  obs = dict(batch['obs'], object=np.zeros((BATCH, 2, 10), np.float32))  # Extra env keys.
  out = policy.predict_action(variables, obs, jax.random.key(5))
  assert out['action'].shape == (BATCH, 8, 7) and out['action'].dtype == jnp.float32
  assert out['action_pred'].shape == (BATCH, 10, 7) and out['action_pred'].dtype == jnp.float32
  np.testing.assert_array_equal(out['action'], out['action_pred'][:, 1:9])

  again = policy.predict_action(variables, obs, jax.random.key(5))
  np.testing.assert_array_equal(out['action_pred'], again['action_pred'])
  other = policy.predict_action(variables, obs, jax.random.key(6))
  assert np.max(np.abs(np.asarray(other['action_pred']) - np.asarray(out['action_pred']))) > 1e-3

  # clip_sample keeps x0 in [-1, 1], so actions stay inside the normaliser's raw limits; an
  # untrained network pushes many of them past 1, which only unnormalisation can do.
  actions = np.asarray(out['action_pred'])
  assert np.all(actions >= ACTION_LO - 1e-5) and np.all(actions <= ACTION_HI + 1e-5)
  assert np.any(actions > 1.0)


@pytest.mark.parametrize('change, message', [
    (lambda x: x.astype(np.float32) / 255.0,  # The [0, 1] convention would look black.
     r"obs\['agentview_image'\] has shape \(4, 2, 40, 40, 3\) and dtype float32; expected "
     r'\(B, ≥2, H, W, 3\) uint8 with \(H, W\) in \[\(40, 40\), \(36, 36\)\]'),
    (lambda x: np.pad(x, ((0, 0), (0, 0), (4, 4), (4, 4), (0, 0))),  # Another rendering size.
     r"obs\['agentview_image'\] has shape \(4, 2, 48, 48, 3\) and dtype uint8"),
])
def test_predict_action_rejects_images_unlike_the_training_ones(change, message):
  policy, variables = _base_policy()
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  cropped = dict(obs, agentview_image=obs['agentview_image'][:, :, 2:38, 2:38])
  policy.predict_action(variables, cropped, jax.random.key(0))  # As the pipeline gives them.
  obs['agentview_image'] = change(obs['agentview_image'])
  with pytest.raises(ValueError, match=message):
    policy.predict_action(variables, obs, jax.random.key(0))


def test_predict_action_names_non_finite_low_dim_observations():
  policy, variables = _base_policy()
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  obs['robot0_eef_pos'][2, 1, 0] = np.nan
  with pytest.raises(ValueError, match=r"obs\['robot0_eef_pos'\] holds NaN or inf "
                     r'\(batch rows \[2\]\)'):
    policy.predict_action(variables, obs, jax.random.key(0))


def test_predict_action_refuses_parameters_of_another_network():
  policy, _ = _base_policy()
  other = _make_policy(_config(p_drop_attn=0.0, n_emb=32, n_head=2))
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  # Also as sampling variables, which would otherwise run the other network as they are.
  for variables in (other.init(jax.random.key(0)),
                    other.sampling_variables(other.init(jax.random.key(0)))):
    with pytest.raises(ValueError, match=r"variables' parameters are not those of this "
                       r"policy's config \(.*: shape \(\d+,( \d+)?\) in the variables"):
      policy.predict_action(variables, obs, jax.random.key(0))


def test_bare_parameters_are_refused_with_the_form_expected():
  """A TrainState's ema_params are the inner tree: passed as they are, each entry point says
  what to pass instead of failing on a missing key."""
  policy, variables = _base_policy()
  batch = _batch(policy.shape_meta, np.random.default_rng(1))
  message = r'variables must be \{"params": \.\.\.\}.*got a mapping of \[.noise_model., .obs_enc'
  with pytest.raises(ValueError, match='predict_action: ' + message):
    policy.predict_action(variables['params'], batch['obs'], jax.random.key(0))
  with pytest.raises(ValueError, match='sampling_variables: ' + message):
    policy.sampling_variables(variables['params'])
  with pytest.raises(ValueError, match='compute_loss: ' + message):
    policy.compute_loss(variables['params'], batch, jax.random.key(0))


def test_compute_loss_refuses_observations_and_actions_of_other_windows():
  policy, variables = _base_policy()
  batch = _batch(policy.shape_meta, np.random.default_rng(1))
  batch['action'] = batch['action'][:-1]
  with pytest.raises(ValueError, match=r'batch\["obs"\]\[.agentview_image.\] has 4 rows, '
                     r'batch\["action"\] 3'):
    policy.compute_loss(variables, batch, jax.random.key(0))


def test_predict_action_rejects_short_history():
  policy, variables = _base_policy()
  obs = _batch(policy.shape_meta, np.random.default_rng(1), n_obs_steps=1)['obs']
  with pytest.raises(ValueError, match='agentview_image.*expected'):
    policy.predict_action(variables, obs, jax.random.key(0))


@pytest.mark.parametrize('compute_dtype,kernels', [('float32', True), ('bfloat16', True),
                                                   ('float32', False)])
def test_sampling_variables_give_the_same_features_and_actions(compute_dtype, kernels,
                                                               monkeypatch):
  """Packing the kernels and tabling the timesteps once moves work out of the call, not the
  results: the same encoder features (float summation order aside: the packed convolutions run
  on the C++ kernels where their plain twins, on these small maps, run XLA's) and actions;
  without the kernels (other backends), only the timestep table moves.
  64×64 images cropped to 60×60 end in 2×2 maps (on a 1×1 map SpatialSoftmax's keypoints
  would not depend on the image)."""
  if not kernels:
    monkeypatch.setattr(cpu_kernels, '_usable', lambda: False)
  config = _config(p_drop_attn=0.0, compute_dtype=compute_dtype)
  config.task.shape_meta = lift._shape_meta(64)
  config.task.shape_meta.obs = tuple(e for e in config.task.shape_meta.obs
                                     if e[0] != 'robot0_eye_in_hand_image')
  config.model.crop_shape = (60, 60)
  policy = _make_policy(config)
  variables = policy.init(jax.random.key(0))
  sampling_variables = policy.sampling_variables(variables)
  packed = sampling_variables.get(resnet.PACKED_KERNELS, {})
  # Width 8: the 16-, 32- and 64-channel layers (stages 2-4) run on the kernels.
  on_kernels = cpu_kernels.conv_supported((1, 1, 1, 8), (3, 3, 8, 16), 1,
                                          jnp.dtype(compute_dtype))
  backbone = packed.get('obs_encoder', {}).get('agentview_image', {}).get('backbone', {})
  assert sorted(backbone) == (['layer2_0', 'layer2_1', 'layer3_0', 'layer3_1', 'layer4_0',
                               'layer4_1'] if on_kernels else [])

  rng = np.random.default_rng(1)
  obs = {s.key: rng.uniform(-1, 1, (BATCH,) + s.shape).astype(np.float32)
         for s in policy.shape_meta.obs}
  encode = jax.jit(lambda v: policy.network.apply(v, obs, False, method=PolicyNetwork.encode))
  expected = encode(variables)
  got = encode({'params': variables['params'], resnet.PACKED_KERNELS: packed})
  rtol = 1e-5 if compute_dtype == 'float32' else 2**-7
  np.testing.assert_allclose(np.asarray(got, np.float32), np.asarray(expected, np.float32),
                             rtol=rtol, atol=rtol * float(jnp.abs(expected).max()))

  raw_obs = _batch(policy.shape_meta, np.random.default_rng(2))['obs']
  expected = policy.predict_action(variables, raw_obs, jax.random.key(5))['action_pred']
  got = policy.predict_action(sampling_variables, raw_obs, jax.random.key(5))['action_pred']
  np.testing.assert_allclose(got, expected, rtol=rtol, atol=rtol)


def test_stacked_cameras_give_the_same_features_and_actions(monkeypatch):
  """On a GPU `sampling_variables` stacks the cameras' encoder parameters and the encoders run
  as one vmapped program (a grouped convolution per layer: half the launches of a call). Told
  it runs on a GPU (as scripts/gpu_kernels.py does), the library does so here on XLA:CPU, and
  gives the features and actions of the cameras encoded one by one."""
  monkeypatch.setattr(jax, 'default_backend', lambda: 'gpu')
  config = _config(p_drop_attn=0.0)
  config.task.shape_meta = lift._shape_meta(IMAGE_SIZE)  # Both cameras.
  policy = _make_policy(config)
  variables = policy.init(jax.random.key(0))
  sampling_variables = policy.sampling_variables(variables)
  stacked = sampling_variables[STACKED_CAMERAS]
  cameras = variables['params']['obs_encoder']
  for index, key in enumerate(('agentview_image', 'robot0_eye_in_hand_image')):
    jax.tree.map(lambda own, all_cameras: np.testing.assert_array_equal(own, all_cameras[index]),
                 cameras[key], stacked)

  rng = np.random.default_rng(1)
  obs = {s.key: rng.uniform(-1, 1, (BATCH,) + s.shape).astype(np.float32)
         for s in policy.shape_meta.obs}
  encode = jax.jit(lambda v, stacked: policy.network.apply(v, obs, False, stacked,
                                                           method=PolicyNetwork.encode))
  expected = encode(variables, None)
  got = encode(variables, stacked)
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5 * float(jnp.abs(expected).max()))

  raw_obs = _batch(policy.shape_meta, np.random.default_rng(2))['obs']
  expected = policy.predict_action(variables, raw_obs, jax.random.key(5))['action_pred']
  got = policy.predict_action(sampling_variables, raw_obs, jax.random.key(5))['action_pred']
  np.testing.assert_allclose(got, expected, rtol=1e-5, atol=1e-5)


def _ddim_policy(num_train_timesteps):
  config = _config(p_drop_attn=0.0)
  config.diffusion.sampler, config.diffusion.num_inference_steps = 'ddim', 10
  config.diffusion.num_train_timesteps = num_train_timesteps
  return _make_policy(config)


@pytest.mark.parametrize('made_for,message', [
    ('ddpm', r'are for 100 sampling steps \(timesteps 99, 98, 97, …\), this policy visits 10 '
             r'sampling steps \(timesteps 90, 80, 70, …\)'),
    # The same number of steps over another training schedule: other time embeddings.
    ('ddim_200', r'are for 10 sampling steps \(timesteps 180, 160, 140, …\), this policy '
                 r'visits 10 sampling steps \(timesteps 90, 80, 70, …\)'),
])
def test_sampling_variables_belong_to_their_sampler(made_for, message):
  policy, variables = _base_policy()
  maker = policy if made_for == 'ddpm' else _ddim_policy(200)
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  with pytest.raises(ValueError, match=r"\['decoder_constants'\] " + message):
    _ddim_policy(100).predict_action(maker.sampling_variables(variables), obs,
                                     jax.random.key(0))


def test_pallas_decoder_samples_the_same_actions():
  """config.model.pallas_decoder: the whole sampler (its scan over the Pallas kernels, in
  Pallas' interpreter on this CPU) gives the actions of the default path."""
  config = _config(p_drop_attn=0.0, n_emb=32, n_head=2)
  config.diffusion.num_inference_steps = 5
  default = _make_policy(config)
  config.model.pallas_decoder = True
  pallas = _make_policy(config)
  variables = default.init(jax.random.key(0))
  obs = _batch(default.shape_meta, np.random.default_rng(3))['obs']
  expected = default.predict_action(variables, obs, jax.random.key(4))['action_pred']
  with cpu_kernels.disabled(), pallas_decoder.interpreted():  # Weights unpacked, as on a GPU.
    got = pallas.predict_action(variables, obs, jax.random.key(4))['action_pred']
  np.testing.assert_allclose(got, expected, rtol=1e-4, atol=1e-4)


def test_pallas_decoder_needs_sizes_its_kernels_take():
  with pytest.raises(ValueError, match=r'pallas_decoder=True: needs .* n_emb=16, n_head=2'):
    _make_policy(_config(pallas_decoder=True))  # smoke: E / H = 8


@pytest.mark.parametrize('overrides', [dict(obs_as_cond=False),
                                       dict(pred_action_steps_only=True)])
def test_other_modes_run(overrides):
  policy = _make_policy(_config(**overrides))  # Dropout on (smoke: 0.3).
  variables = policy.init(jax.random.key(0))
  batch = _batch(policy.shape_meta, np.random.default_rng(2))
  loss, metrics = jax.jit(policy.compute_loss)(variables, batch, jax.random.key(1))
  assert np.isfinite(loss) and metrics['loss'] == loss
  out = policy.predict_action(variables, batch['obs'], jax.random.key(3))
  assert out['action'].shape == (BATCH, 8, 7)
  actions = np.asarray(out['action_pred'])
  assert np.all(actions >= ACTION_LO - 1e-5) and np.all(actions <= ACTION_HI + 1e-5)
  if overrides.get('pred_action_steps_only'):
    assert actions.shape == (BATCH, 8, 7)
    np.testing.assert_array_equal(out['action'], actions)
    # Its tokens are steps To − 1 … of the horizon, for the masks.
    assert policy.network.noise_model.first_step == policy.n_obs_steps - 1
  else:
    # Inpainting: the noise model's tokens are [actions, obs features].
    assert actions.shape == (BATCH, 10, 7)
    obs_dim = output_dim(policy.shape_meta, 8)
    assert variables['params']['noise_model']['input_emb']['kernel'].shape == (7 + obs_dim, 16)


def _capture_loss_inputs(monkeypatch):
  """Records what `compute_loss` noises and feeds its network; the network's stand-in predicts
  a fixed function of its input, so the loss can be recomputed by hand."""
  seen = {}
  add_noise = policy_lib.ddpm.add_noise

  def recording_add_noise(schedule, x0, noise, t):
    seen.update(x0=np.asarray(x0), noise=np.asarray(noise), t=np.asarray(t))
    seen['noisy'] = np.asarray(add_noise(schedule, x0, noise, t))
    return add_noise(schedule, x0, noise, t)

  def stand_in(self, sample, timesteps, cond, train):
    seen['input'], seen['input_t'] = np.asarray(sample), np.asarray(timesteps)
    return 0.5 * sample + 0.1

  monkeypatch.setattr(policy_lib.ddpm, 'add_noise', recording_add_noise)
  monkeypatch.setattr(PolicyNetwork, 'denoise', stand_in)
  return seen


@pytest.mark.parametrize('prediction_type', ['epsilon', 'sample'])
@pytest.mark.parametrize('mode', ['obs_as_cond', 'pred_action_steps_only', 'inpainting'])
def test_compute_loss_against_the_reference_formula(mode, prediction_type, monkeypatch):
  """The reference's loss: x0 = normalised actions (steps To − 1 … To + Na − 2 only, or beside
  the first To observation features, which stay un-noised), x_t = add_noise(x0, noise, t), the
  masked squared error against noise or x0, averaged over every entry."""
  overrides = {'obs_as_cond': dict(), 'pred_action_steps_only': dict(pred_action_steps_only=True),
               'inpainting': dict(obs_as_cond=False)}[mode]
  policy = _make_policy(_config(prediction_type=prediction_type, **overrides))
  variables = policy.init(jax.random.key(0))
  batch = _batch(policy.shape_meta, np.random.default_rng(2))
  seen = _capture_loss_inputs(monkeypatch)
  loss, _ = policy.compute_loss(variables, batch, jax.random.key(1), train=False)

  to, da = policy.n_obs_steps, policy.action_dim
  actions = np.asarray(policy.normalizer.normalize('action', batch['action']))
  if mode == 'pred_action_steps_only':
    actions = actions[:, to - 1:to - 1 + policy.n_action_steps]
  np.testing.assert_allclose(seen['x0'][..., :da], actions, rtol=1e-6, atol=1e-6)
  np.testing.assert_array_equal(seen['input_t'], seen['t'])
  free = np.ones(seen['x0'].shape, bool)
  if mode == 'inpainting':
    free[..., da:] = False  # Conditioned: the features of the first To steps, zeros after.
    assert np.abs(seen['x0'][:, :to, da:]).max() > 0  # Features, not zeros.
    np.testing.assert_array_equal(seen['x0'][:, to:, da:], 0.0)
  np.testing.assert_array_equal(seen['input'][~free], seen['x0'][~free])
  np.testing.assert_array_equal(seen['input'][free], seen['noisy'][free])
  target = seen['noise'] if prediction_type == 'epsilon' else seen['x0']
  error = np.square(0.5 * seen['input'] + 0.1 - target)
  if mode == 'inpainting':
    error[..., da:] = 0.0  # Only To observation frames are encoded: no feature target after.
  np.testing.assert_allclose(loss, error.mean(), rtol=1e-5)


def test_training_timesteps_cover_zero_to_k_minus_one(monkeypatch):
  config = _config(p_drop_attn=0.0)
  config.diffusion.num_train_timesteps = config.diffusion.num_inference_steps = 5
  policy = _make_policy(config)
  batch = _batch(policy.shape_meta, np.random.default_rng(2))
  batch = jax.tree.map(lambda x: np.concatenate([x] * 8), batch)  # 32 rows.
  variables = policy.init(jax.random.key(0))
  seen = _capture_loss_inputs(monkeypatch)
  policy.compute_loss(variables, batch, jax.random.key(1))
  assert set(seen['t'].tolist()) == {0, 1, 2, 3, 4}


def _stand_in_denoiser(monkeypatch, x0, inputs):
  """The sampler's network predicts `x0` ('sample' prediction) whatever its input; `inputs`
  collects each step's input."""

  def cached_denoise(model, params, constants, obs_memory, x, step, pallas):
    jax.debug.callback(lambda v: inputs.append(np.asarray(v)), x)
    return jnp.broadcast_to(jnp.asarray(x0, x.dtype), x.shape)

  monkeypatch.setattr(policy_lib.transformer, 'cached_denoise', cached_denoise)


def test_sample_prediction_samples_the_predicted_trajectory(monkeypatch):
  """DDPM's last step (t = 0, ᾱ_prev = 1, no noise) returns the predicted x0 itself."""
  policy = _make_policy(_config(prediction_type='sample', p_drop_attn=0.0))
  x0 = np.random.default_rng(5).uniform(-0.9, 0.9, (BATCH,) + policy.trajectory_shape)
  _stand_in_denoiser(monkeypatch, x0, [])
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  out = policy.predict_action(policy.init(jax.random.key(0)), obs, jax.random.key(3))
  np.testing.assert_allclose(out['action_pred'],
                             policy.normalizer.unnormalize('action', x0.astype(np.float32)),
                             rtol=1e-5, atol=1e-5)


def test_inpainting_samples_with_every_feature_entry_conditioned(monkeypatch):
  policy = _make_policy(_config(obs_as_cond=False, p_drop_attn=0.0))
  inputs = []
  _stand_in_denoiser(monkeypatch, np.zeros(policy.trajectory_shape), inputs)
  obs = _batch(policy.shape_meta, np.random.default_rng(1))['obs']
  policy.predict_action(policy.init(jax.random.key(0)), obs, jax.random.key(3))
  jax.effects_barrier()
  to, da = policy.n_obs_steps, policy.action_dim
  assert len(inputs) == policy.num_inference_steps
  first = inputs[0]
  assert np.abs(first[:, :to, da:]).max() > 0  # The observation features, and zeros after
  for x in inputs:  # them (as in training), stay fixed while the actions are sampled.
    np.testing.assert_array_equal(x[..., da:], first[..., da:])
    np.testing.assert_array_equal(x[:, to:, da:], 0.0)


def test_a_longer_history_gives_the_actions_of_its_first_frames():
  policy, variables = _base_policy()
  obs = _batch(policy.shape_meta, np.random.default_rng(1), n_obs_steps=3)['obs']
  first_two = {key: x[:, :2] for key, x in obs.items()}
  np.testing.assert_array_equal(
      policy.predict_action(variables, obs, jax.random.key(5))['action_pred'],
      policy.predict_action(variables, first_two, jax.random.key(5))['action_pred'])


def test_loss_falls_tenfold_when_overfitting_one_batch():
  """EMA-free Adam on one fixed batch; the loss is averaged over 8 fixed (noise, t) draws.

  'sample' prediction: its target (the batch's actions) is fixed, so a tiny network memorises it
  in a few hundred steps (epsilon targets need a high-gain map at small t that it learns far
  more slowly); the encoder must still tell the four observations apart at large t.
  """
  _, variables = _base_policy()
  policy = _make_policy(_config(prediction_type='sample', p_drop_attn=0.0))
  batch = _batch(policy.shape_meta, np.random.default_rng(3))
  optimizer = optax.adam(3e-3)
  eval_keys = jax.random.split(jax.random.key(42), 8)

  def eval_loss(variables):
    losses = jax.vmap(lambda k: policy.compute_loss(variables, batch, k, train=False)[0])(
        eval_keys)
    return jnp.mean(losses)

  def train_step(carry, key):
    variables, opt_state = carry
    grads = jax.grad(lambda v: policy.compute_loss(v, batch, key)[0])(variables)
    updates, opt_state = optimizer.update(grads, opt_state, variables)
    return (optax.apply_updates(variables, updates), opt_state), None

  @jax.jit
  def before_and_after(variables):
    (trained, _), _ = jax.lax.scan(train_step, (variables, optimizer.init(variables)),
                                   jax.random.split(jax.random.key(0), 400))
    return eval_loss(variables), eval_loss(trained)

  before, after = before_and_after(variables)
  assert after * 10 <= before, f'loss {before:.4f} → {after:.4f}: less than a 10× drop'
