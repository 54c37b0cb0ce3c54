"""Diffusion Policy (transformer, hybrid image encoder): training loss and action sampling.

Mirrors the reference `DiffusionTransformerHybridImagePolicy` (SPEC §4–§6, §10):

* observations are normalised in-graph (uint8 images → [−1, 1]) and only the first To frames
  are encoded, as one flat batch of B·To, into per-step features (B, To, D_obs);
* `obs_as_cond=True`: the features condition the transformer through cross-attention;
  `obs_as_cond=False`: they are inpainted into the trajectory [actions, features] (condition
  mask), and the loss is masked to the free entries, the actions;
* `pred_action_steps_only`: the trajectory is the n_action_steps executed actions, starting at
  step To − 1, instead of the whole horizon.

Two departures in the inpainting mode, because only To observation frames exist here (the data
pipeline and the environment provide no more): the reference encodes all T frames, so its
trajectory holds real features on steps ≥ To and its loss covers them, and its inference
reshape fails with To < T frames. Here the feature entries of steps ≥ To are conditioned on
zeros, in training and in sampling alike: untrained, they would otherwise be generated from
predictions no loss ever shaped, and reach the actions through the input embedding. The
reference also detaches the features (its encoder gets no gradient in this mode); here the
encoder trains through the inpainted entries, which are never loss targets, so features
cannot collapse.

Parameters: `{'params': {'obs_encoder': ..., 'noise_model': ...}}`.
"""

import logging
from typing import Any, Mapping, Optional

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from dpjax.data.normalizer import ACTION_KEY, Normalizer
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion import ddpm, sampling
from dpjax.diffusion.schedules import make_noise_schedule
from dpjax.models.obs_encoder import ObservationEncoder, output_dim, stack_camera_params
from dpjax.models import pallas_decoder, resnet, transformer
from dpjax.models.transformer import TransformerForDiffusion
from dpjax.tree_shapes import shape_differences, summarize

COMPUTE_DTYPES = ('float32', 'bfloat16', 'float16')
# The `sampling_variables` entry holding the decoder's `transformer.DecoderConstants`.
DECODER_CONSTANTS = 'decoder_constants'
# The `sampling_variables` entry holding the cameras' encoder parameters stacked (GPU only).
STACKED_CAMERAS = 'stacked_cameras'


class PolicyNetwork(nn.Module):
  """The two trainable parts; `encode` and `denoise` are applied separately."""
  obs_encoder: ObservationEncoder
  noise_model: TransformerForDiffusion

  def encode(self, obs: Mapping[str, jax.Array], train: bool,
             stacked_cameras: Optional[Any] = None) -> jax.Array:
    """{key: (N, ...)} normalised observations → (N, D_obs) (`stacked_cameras`: as
    `ObservationEncoder`'s)."""
    return self.obs_encoder(obs, train=train, stacked_cameras=stacked_cameras)

  def denoise(self, sample: jax.Array, timesteps: jax.Array, cond: Optional[jax.Array],
              train: bool) -> jax.Array:
    """sample (B, T', Din), timesteps (B,), cond (B, To, D_obs) or None → (B, T', Din)."""
    return self.noise_model(sample, timesteps, cond, train=train)

  def __call__(self, obs, sample, timesteps, cond, train: bool = False):
    """Touches both parts (for `init`)."""
    return self.encode(obs, train), self.denoise(sample, timesteps, cond, train)


class DiffusionPolicy:
  """Pure functions of a variables dict; holds no parameters or state itself.

  `predict_action` is jitted once per policy (it compiles once per observation shapes and
  dtypes); `compute_loss` is meant to be traced inside the caller's jitted train step.
  """

  def __init__(self, config: ml_collections.ConfigDict, shape_meta: ShapeMeta,
               normalizer: Normalizer):
    model, diffusion, task = config.model, config.diffusion, config.task
    self.shape_meta = shape_meta
    self.normalizer = normalizer
    normalizer.check_covers(shape_meta, 'DiffusionPolicy normaliser')
    self.horizon = int(task.horizon)
    self.n_obs_steps = int(task.n_obs_steps)
    self.n_action_steps = int(task.n_action_steps)
    self.action_dim = shape_meta.action_dim
    self.obs_as_cond = bool(model.obs_as_cond)
    self.pred_action_steps_only = bool(model.pred_action_steps_only)
    # Absent from the configs of checkpoints saved before the option existed.
    self._pallas_decoder = bool(model.get('pallas_decoder', False))
    self._check_config(model, diffusion)

    self.obs_feature_dim = output_dim(shape_meta, int(model.image_feature_dim))
    dtype = jnp.dtype(model.compute_dtype)
    trajectory_dim = self.action_dim + (0 if self.obs_as_cond else self.obs_feature_dim)
    self.network = PolicyNetwork(
        obs_encoder=ObservationEncoder(
            shape_meta=shape_meta,
            crop_shape=None if model.crop_shape is None else tuple(model.crop_shape),
            resnet_width=int(model.resnet_width),
            num_keypoints=int(model.num_keypoints),
            feature_dim=int(model.image_feature_dim),
            group_norm=bool(model.obs_encoder_group_norm),
            dtype=dtype),
        noise_model=TransformerForDiffusion(
            input_dim=trajectory_dim,
            output_dim=trajectory_dim,
            horizon=self.horizon,
            n_obs_steps=self.n_obs_steps,
            cond_dim=self.obs_feature_dim if self.obs_as_cond else 0,
            n_layer=int(model.n_layer),
            n_head=int(model.n_head),
            n_emb=int(model.n_emb),
            p_drop_emb=float(model.p_drop_emb),
            p_drop_attn=float(model.p_drop_attn),
            causal_attn=bool(model.causal_attn),
            time_as_cond=bool(model.time_as_cond),
            obs_as_cond=self.obs_as_cond,
            n_cond_layers=int(model.n_cond_layers),
            dtype=dtype,
            first_step=self.n_obs_steps - 1 if self.pred_action_steps_only else 0))

    self.schedule = make_noise_schedule(diffusion.beta_schedule,
                                        int(diffusion.num_train_timesteps),
                                        float(diffusion.beta_start), float(diffusion.beta_end))
    self.prediction_type = diffusion.prediction_type
    self.sampler = diffusion.sampler
    self.num_inference_steps = int(diffusion.num_inference_steps or
                                   diffusion.num_train_timesteps)
    self.step_kwargs = dict(clip_sample=bool(diffusion.clip_sample),
                            prediction_type=diffusion.prediction_type)
    if self.sampler == 'ddpm':
      self.step_kwargs['variance_type'] = diffusion.variance_type
    else:
      self.step_kwargs['eta'] = float(diffusion.ddim_eta)
    # Fails now, not at the first call, on a bad sampler or step count.
    self._timesteps, _ = sampling.inference_timesteps(
        self.sampler, self.schedule.num_train_timesteps, self.num_inference_steps)
    self._param_shapes = None  # `param_shapes()`, when a trace first needs it.
    # The compiled program behind `predict_action` (public for `.lower()` in benchmarks); it
    # takes exactly the shape_meta observation keys.
    self.predict_action_jit = jax.jit(self._predict_action)
    self._sampling_variables_jit = jax.jit(self._sampling_variables)

  def _check_config(self, model, diffusion) -> None:
    if model.compute_dtype not in COMPUTE_DTYPES:
      raise ValueError(f'config.model.compute_dtype: {model.compute_dtype!r} is not one of '
                       f'{COMPUTE_DTYPES}')
    ddpm.check_prediction_type(diffusion.prediction_type)
    if diffusion.sampler == 'ddpm' and diffusion.variance_type not in ddpm.VARIANCE_TYPES:
      raise ValueError(f'config.diffusion.variance_type: {diffusion.variance_type!r} is not one '
                       f'of {ddpm.VARIANCE_TYPES}')
    if not 1 <= self.n_obs_steps <= self.horizon:
      raise ValueError(f'config.task: n_obs_steps {self.n_obs_steps} must be in [1, horizon '
                       f'{self.horizon}]')
    if self.n_action_steps < 1:
      raise ValueError(f'config.task: n_action_steps {self.n_action_steps} must be >= 1')
    if self.n_obs_steps - 1 + self.n_action_steps > self.horizon:
      raise ValueError(
          f'config.task: the executed actions [n_obs_steps − 1, n_obs_steps − 1 + '
          f'n_action_steps) = [{self.n_obs_steps - 1}, '
          f'{self.n_obs_steps - 1 + self.n_action_steps}) must fit in horizon {self.horizon}')
    for field, problem in model_problems(model, self.horizon, self.n_obs_steps)[:1]:
      raise ValueError(f'config.model.{field}={model[field]}: {problem}')
    if self._pallas_decoder and not pallas_decoder.runs_here():
      logging.warning('config.model.pallas_decoder=True: the Pallas kernels run on a single GPU '
                      'only; sampling on %s × %d runs as without the option',
                      jax.default_backend(), jax.device_count())

  @property
  def trajectory_shape(self) -> tuple[int, int]:
    """(T', D) of one sampled trajectory: T' = n_action_steps or horizon, D = Da (+ D_obs)."""
    length = self.n_action_steps if self.pred_action_steps_only else self.horizon
    return length, self.network.noise_model.input_dim

  def _init_params(self, rng: jax.Array) -> dict:
    to, (length, dim) = self.n_obs_steps, self.trajectory_shape
    obs = {s.key: jnp.zeros((to,) + s.shape, jnp.float32) for s in self.shape_meta.obs}
    cond = jnp.zeros((1, to, self.obs_feature_dim)) if self.obs_as_cond else None
    return self.network.init({'params': rng}, obs, jnp.zeros((1, length, dim)),
                             jnp.zeros((1,), jnp.int32), cond)['params']

  def init(self, rng: jax.Array) -> dict:
    """Fresh variables `{'params': {'obs_encoder': ..., 'noise_model': ...}}`."""
    # Runs once: XLA's optimisations would only slow down compiling the ~100 random
    # initialisers (threefry kernels), which dominates the time of `init` on a CPU.
    compiled = jax.jit(self._init_params).lower(rng).compile(
        {'xla_backend_optimization_level': 0})
    return {'params': compiled(rng)}

  def param_shapes(self) -> dict:
    """`init(...)['params']` as `jax.ShapeDtypeStruct`s, computing nothing."""
    return jax.eval_shape(self._init_params, jax.random.key(0))

  def _encode_obs(self, variables, obs: Mapping[str, jax.Array], train: bool,
                  rng: Optional[jax.Array]) -> jax.Array:
    """Raw {key: (B, ≥To, ...)} → normalised, first To frames encoded → (B, To, D_obs)."""
    to = self.n_obs_steps
    batch_size = None
    flat = {}
    for spec in self.shape_meta.obs:
      if spec.key not in obs:
        raise ValueError(f'DiffusionPolicy: observation {spec.key!r} is missing; got keys '
                         f'{sorted(obs)}')
      x = obs[spec.key]
      if spec.kind == 'rgb':
        # The normaliser maps [0, 255] to [-1, 1]: float images in [0, 1] would pass as black.
        # Rendered images, or the pipeline's crops of them; another size sees another view.
        sizes = {spec.shape[:2], self.network.obs_encoder.crop_shape} - {None}
        expected = (f'(B, ≥{to}, H, W, 3) uint8 with (H, W) in '
                    f'{sorted(sizes, reverse=True)}')
        ok = x.ndim == 5 and x.shape[2:4] in sizes and x.shape[4] == 3 and x.dtype == jnp.uint8
      else:
        expected, ok = f'(B, ≥{to}, {spec.shape[0]})', x.shape[2:] == spec.shape
      if not ok or x.shape[1] < to or (batch_size is not None and x.shape[0] != batch_size):
        raise ValueError(f'DiffusionPolicy: obs[{spec.key!r}] has shape {x.shape} and dtype '
                         f'{x.dtype}; expected {expected} with one B for all keys')
      batch_size = x.shape[0]
      x = self.normalizer.normalize(spec.key, x[:, :to])
      flat[spec.key] = x.reshape((batch_size * to,) + x.shape[2:])
    rngs = {'crop': rng} if rng is not None else {}
    encoder_variables = {name: variables[name] for name in ('params', resnet.PACKED_KERNELS)
                         if name in variables}
    features = self.network.apply(encoder_variables, flat, train,
                                  variables.get(STACKED_CAMERAS), rngs=rngs,
                                  method=PolicyNetwork.encode)
    return features.reshape(batch_size, to, -1)

  def _inpainting(self, features: jax.Array) -> tuple[jax.Array, jax.Array]:
    """(condition_data (B, T, Da + D_obs), condition_mask (T, Da + D_obs)): every feature entry
    is conditioned, on the features for the first To steps and on zeros after them."""
    batch_size, to, _ = features.shape
    data = jnp.zeros((batch_size,) + self.trajectory_shape, jnp.float32)
    data = data.at[:, :to, self.action_dim:].set(features.astype(jnp.float32))
    mask = np.zeros(self.trajectory_shape, bool)
    mask[:, self.action_dim:] = True
    return data, jnp.asarray(mask)

  def compute_loss(self, variables, batch: Mapping[str, Any], rng: jax.Array,
                   train: bool = True) -> tuple[jax.Array, dict]:
    """Diffusion training loss on a raw batch.

    Args:
      variables: policy variables.
      batch: {'obs': {key: (B, ≥To, ...)} raw (uint8 images), 'action': (B, T, Da) raw}.
      rng: key for crops, dropout, noise and timesteps.
      train: random crops and dropout when True.

    Returns:
      (scalar loss, {'loss': loss}).
    """
    _check_variables(variables, 'compute_loss')
    crop_rng, dropout_rng, noise_rng, t_rng = jax.random.split(rng, 4)
    action = batch[ACTION_KEY]
    chex.assert_shape(action, (None, self.horizon, self.action_dim))
    batch_size = action.shape[0]
    for spec in self.shape_meta.obs:
      rows = batch['obs'][spec.key].shape[0] if spec.key in batch['obs'] else batch_size
      if rows != batch_size:
        raise ValueError(f'DiffusionPolicy.compute_loss: batch["obs"][{spec.key!r}] has {rows} '
                         f'rows, batch["action"] {batch_size}; they must be the same windows')
    nactions = self.normalizer.normalize(ACTION_KEY, action)
    features = self._encode_obs(variables, batch['obs'], train, crop_rng if train else None)

    cond = None
    if self.obs_as_cond:
      cond = features
      trajectory = nactions
      if self.pred_action_steps_only:
        start = self.n_obs_steps - 1
        trajectory = nactions[:, start:start + self.n_action_steps]
      condition_mask = jnp.zeros(self.trajectory_shape, bool)
      loss_mask = jnp.ones(self.trajectory_shape, jnp.float32)
    else:
      condition_data, condition_mask = self._inpainting(features)
      trajectory = condition_data.at[:, :, :self.action_dim].set(nactions)
      # The reference's rule: the loss covers what is not conditioned, here the actions.
      loss_mask = jnp.logical_not(condition_mask).astype(jnp.float32)

    noise = jax.random.normal(noise_rng, trajectory.shape, jnp.float32)
    timesteps = jax.random.randint(t_rng, (batch_size,), 0, self.schedule.num_train_timesteps)
    noisy = ddpm.add_noise(self.schedule, trajectory, noise, timesteps)
    noisy = jnp.where(condition_mask, trajectory, noisy)
    pred = self.network.apply(variables, noisy, timesteps, cond, train,
                              rngs={'dropout': dropout_rng} if train else {},
                              method=PolicyNetwork.denoise)
    target = noise if self.prediction_type == 'epsilon' else trajectory
    # As the reference: masked squared error averaged over every entry.
    loss = jnp.mean(jnp.square(pred.astype(jnp.float32) - target) * loss_mask)
    return loss, {'loss': loss}

  def predict_action(self, variables, obs: Mapping[str, jax.Array],
                     rng: jax.Array) -> dict[str, jax.Array]:
    """Samples actions for a batch of observation histories: one jitted program.

    Encodes the observations once, then runs the whole reverse process as one `lax.scan`.

    Args:
      variables: policy variables (the EMA parameters at evaluation), or their
        `sampling_variables` for repeated calls.
      obs: raw {key: (B, ≥To, ...)}: uint8 images of shape_meta's size (centre-cropped to
        crop_shape) or already cropped to it, finite low-dim floats; extra keys are ignored and
        only the first To frames are used.
      rng: key of the reverse process.

    Returns:
      {'action': (B, n_action_steps, Da), 'action_pred': (B, T', Da)}, unnormalised float32;
      T' = horizon (n_action_steps with pred_action_steps_only), and `action` is steps
      [To − 1, To − 1 + n_action_steps) of `action_pred`.
    """
    _check_variables(variables, 'predict_action')
    obs = {spec.key: obs[spec.key] for spec in self.shape_meta.obs if spec.key in obs}
    for key in self.shape_meta.low_dim_keys:
      # Host arrays only: checking device arrays would wait for them.
      x = obs.get(key)
      if isinstance(x, np.ndarray) and not np.isfinite(x).all():
        rows = np.unique(np.nonzero(~np.isfinite(x))[0]).tolist()
        raise ValueError(f'DiffusionPolicy.predict_action: obs[{key!r}] holds NaN or inf '
                         f'(batch rows {rows})')
    return self.predict_action_jit(variables, obs, rng)

  def sampling_variables(self, variables) -> dict:
    """`variables` with what `predict_action` derives from the parameters alone, computed once.

    Adds the encoders' convolution kernels packed for the CPU kernels (`resnet.PACKED_KERNELS`,
    where they run), on a GPU the cameras' encoder parameters stacked for one vmapped encoder
    (`STACKED_CAMERAS`: half the launches per call), and the decoder's packed weights and
    timestep table (`transformer.DecoderConstants`, for this policy's sampler). Passing the
    result to `predict_action` instead of `variables` gives the same actions (up to float
    summation order) without that work per call: for repeated sampling with fixed parameters
    (evaluation rollouts). It is for this policy's sampler settings only, and not for training.
    """
    _check_variables(variables, 'sampling_variables')
    return self._sampling_variables_jit(variables)

  def _sampling_variables(self, variables) -> dict:
    # The encoders run once on zeros, for each Conv to store its kernel packed (resnet.Conv).
    obs = {s.key: jnp.zeros((self.n_obs_steps,) + s.shape, jnp.float32)
           for s in self.shape_meta.obs}
    _, packed = self.network.apply({'params': variables['params']}, obs, False,
                                   method=PolicyNetwork.encode, mutable=[resnet.PACKED_KERNELS])
    result = {'params': variables['params'], **packed}
    encoder = self.network.obs_encoder
    # On CPU the C++ kernels run each camera's layers; a vmapped convolution would not be one.
    if jax.default_backend() == 'gpu' and encoder.stacks_cameras:
      result[STACKED_CAMERAS] = stack_camera_params(variables['params']['obs_encoder'],
                                                    encoder.camera_keys)
    noise_model = self.network.noise_model
    if transformer.supports_cached_denoise(noise_model):
      result[DECODER_CONSTANTS] = transformer.decoder_constants(
          noise_model, variables['params']['noise_model'], self._timesteps)
    return result

  def _check_params(self, params) -> None:
    """At trace time: parameters of another network would run (as sampling variables) or fail
    deep inside a layer."""
    if self._param_shapes is None:
      self._param_shapes = self.param_shapes()
    problems = shape_differences(params, self._param_shapes, got_name='the variables',
                                 expected_name="this policy's network")
    if problems:
      raise ValueError('DiffusionPolicy: the variables\' parameters are not those of this '
                       f'policy\'s config ({summarize(problems)})')

  def _predict_action(self, variables, obs: Mapping[str, jax.Array],
                      rng: jax.Array) -> dict[str, jax.Array]:
    self._check_params(variables['params'])
    features = self._encode_obs(variables, obs, train=False, rng=None)
    batch_size = features.shape[0]
    shape = (batch_size,) + self.trajectory_shape
    cond, condition_data, condition_mask = None, None, None
    if self.obs_as_cond:
      cond = features
    else:
      condition_data, condition_mask = self._inpainting(features)
      condition_mask = jnp.broadcast_to(condition_mask, shape)

    noise_model = self.network.noise_model
    if transformer.supports_cached_denoise(noise_model):
      # Condition memory, its folded cross-attention rows and the time embeddings are the same
      # at every step: computed once here (or ahead, by `sampling_variables`), the loop body
      # is only the decoder stack.
      params = variables['params']['noise_model']
      constants = variables.get(DECODER_CONSTANTS)
      if constants is None:
        constants = transformer.decoder_constants(noise_model, params, self._timesteps)
      elif constants.timesteps != tuple(self._timesteps.tolist()):
        raise ValueError(
            f'DiffusionPolicy.predict_action: variables[{DECODER_CONSTANTS!r}] are for '
            f'{_describe_timesteps(constants.timesteps)}, this policy visits '
            f'{_describe_timesteps(self._timesteps)}; make them with this policy\'s '
            'sampling_variables')
      pallas = self._pallas_decoder and transformer.runs_pallas_decoder(noise_model, constants,
                                                                        shape[1])
      obs_memory = transformer.observation_memory(noise_model, params, cond, pallas)
      step_of = np.zeros(self.schedule.num_train_timesteps, np.int32)
      step_of[self._timesteps] = np.arange(len(self._timesteps))

      def denoise(x, t):
        return transformer.cached_denoise(noise_model, params, constants, obs_memory, x,
                                          jnp.asarray(step_of)[t], pallas)
    else:

      def denoise(x, t):
        timesteps = jnp.broadcast_to(t, (batch_size,))
        return self.network.apply({'params': variables['params']}, x, timesteps, cond, False,
                                  method=PolicyNetwork.denoise)

    nsample = sampling.sample(denoise, self.schedule, shape=shape, rng=rng,
                              sampler=self.sampler, num_inference_steps=self.num_inference_steps,
                              condition_data=condition_data, condition_mask=condition_mask,
                              **self.step_kwargs)
    action_pred = self.normalizer.unnormalize(ACTION_KEY, nsample[..., :self.action_dim])
    if self.pred_action_steps_only:
      action = action_pred
    else:
      start = self.n_obs_steps - 1
      action = action_pred[:, start:start + self.n_action_steps]
    return {'action': action, 'action_pred': action_pred}


def model_problems(model: ml_collections.ConfigDict, horizon: int,
                   n_obs_steps: int) -> list[tuple[str, str]]:
  """(config.model field, why) for each combination of modes this policy cannot build; the
  policy refuses the first, `config_checks.check_config` lists them all before any data."""
  problems = []
  if not model.time_as_cond and model.obs_as_cond:
    problems.append(('time_as_cond', 'encoder-only mode takes no observation tokens: it needs '
                     'model.obs_as_cond=False, as the reference requires'))
  if model.pred_action_steps_only and not model.obs_as_cond:
    problems.append(('pred_action_steps_only', 'needs model.obs_as_cond=True (the inpainting '
                     'mode conditions on the first n_obs_steps of the full horizon)'))
  memory_rows = 1 + (n_obs_steps if model.obs_as_cond else 0)
  if model.get('pallas_decoder') and not (
      model.time_as_cond and model.n_cond_layers == 0 and pallas_decoder.fits(
          int(model.n_emb), int(model.n_head), int(horizon), memory_rows)):
    problems.append(('pallas_decoder', 'needs the cached decoder (time_as_cond=True, '
                     'n_cond_layers=0) and sizes its kernels take: n_emb ≥ 32 and n_emb / n_head '
                     '≥ 16, powers of two, n_head · horizon and n_head · (1 + n_obs_steps) (each '
                     'padded to a power of two ≥ 16) ≤ min(n_emb, 128); got time_as_cond='
                     f'{model.time_as_cond}, n_cond_layers={model.n_cond_layers}, n_emb='
                     f'{model.n_emb}, n_head={model.n_head}, horizon={horizon}, n_obs_steps='
                     f'{n_obs_steps}'))
  return problems


def _check_variables(variables, where: str) -> None:
  if not isinstance(variables, Mapping) or 'params' not in variables:
    got = (f'a mapping of {sorted(map(str, variables))}' if isinstance(variables, Mapping)
           else type(variables).__name__)
    raise ValueError(f'DiffusionPolicy.{where}: variables must be {{"params": ...}} as `init` '
                     'returns them (a TrainState\'s parameters go in as {"params": '
                     f'state.ema_params}}), got {got}')


def _describe_timesteps(timesteps) -> str:
  timesteps = list(timesteps)
  shown = ', '.join(map(str, timesteps[:3])) + (', …' if len(timesteps) > 3 else '')
  return f'{len(timesteps)} sampling steps (timesteps {shown})'
