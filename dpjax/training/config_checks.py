"""Validates a run's config before anything expensive starts; one error lists every problem.

Each problem names the config field, its value and what was expected, e.g.
  task.horizon=8: must be >= n_obs_steps + n_action_steps - 1 = 9
"""

import math
import numbers
import os

import ml_collections

from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.ddpm import PREDICTION_TYPES, VARIANCE_TYPES
from dpjax.diffusion.policy import model_problems
from dpjax.diffusion.sampling import SAMPLERS
from dpjax.diffusion.schedules import BETA_SCHEDULES
from dpjax.errors import InputError
from dpjax.models.resnet import group_norm_groups
from dpjax.training.optimizer import LR_SCHEDULES

COMPUTE_DTYPES = ('float32', 'bfloat16')
MIN_CROP = 33  # ResNet-18's stride 32 must leave the SpatialSoftmax at least 2x2 pixels.


class ConfigError(InputError):
  """A config value is out of range or inconsistent with another; `problems` lists each as
  'field=value: what was expected'."""

  def __init__(self, message: str, problems: tuple[str, ...] = ()):
    super().__init__(message)
    self.problems = problems


def _is_int(value) -> bool:
  return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _is_number(value) -> bool:
  return isinstance(value, numbers.Real) and not isinstance(value, bool)


class _Checker:
  """Collects problems so that a user fixes them all in one go."""

  def __init__(self, config: ml_collections.ConfigDict):
    self.config = config
    self.problems: list[str] = []

  def get(self, field: str):
    node = self.config
    for part in field.split('.'):
      node = node[part]
    return node

  def fail(self, field: str, message: str) -> None:
    try:
      value = self.get(field)
    except (KeyError, AttributeError):
      self.problems.append(f'{field}: missing ({message})')
      return
    self.problems.append(f'{field}={value!r}: {message}')

  def present(self, field: str) -> bool:
    try:
      self.get(field)
    except (KeyError, AttributeError):
      self.fail(field, 'the field is required')
      return False
    return True

  def int_at_least(self, field: str, minimum: int, *, optional: bool = False) -> bool:
    if not self.present(field):
      return False
    value = self.get(field)
    if optional and value is None:
      return True
    if not _is_int(value) or value < minimum:
      self.fail(field, f'expected an integer >= {minimum}' + (' or None' if optional else ''))
      return False
    return True

  def number_in(self, field: str, low: float, high: float, *, low_open: bool = False,
                high_open: bool = False) -> bool:
    """An infinite bound is always open: every field is a finite number."""
    low_open = low_open or math.isinf(low)
    high_open = high_open or math.isinf(high)
    if not self.present(field):
      return False
    value = self.get(field)
    ok = _is_number(value)
    if ok:
      ok = (value > low if low_open else value >= low) and (
          value < high if high_open else value <= high)
    if not ok:
      interval = f'{"(" if low_open else "["}{low}, {high}{")" if high_open else "]"}'
      self.fail(field, f'expected a number in {interval}')
    return ok

  def one_of(self, field: str, choices) -> bool:
    if not self.present(field):
      return False
    if self.get(field) not in choices:
      self.fail(field, f'expected one of {tuple(choices)}')
      return False
    return True


def check_config(config: ml_collections.ConfigDict, *, num_devices: int | None = None,
                 num_processes: int | None = None) -> None:
  """Raises `ConfigError` listing every invalid or inconsistent field of `config`.

  Args:
    config: a config from `configs/lift.py` (possibly with command-line overrides).
    num_devices: devices of the data-parallel mesh; the global batch must divide by it.
    num_processes: hosts in the run; each loads an equal share of the batch.
  """
  c = _Checker(config)
  inf = float('inf')

  # Seeds feed numpy's SeedSequence, which takes non-negative integers only.
  for field in ('seed', 'data.split_seed', 'data.demo_seed', 'eval.seed_start'):
    c.int_at_least(field, 0)

  # Task and windows (SPEC §2): the window must hold the observed and the executed steps.
  ok = all([c.int_at_least('task.horizon', 1), c.int_at_least('task.n_obs_steps', 1),
            c.int_at_least('task.n_action_steps', 1)])
  if ok:
    need = config.task.n_obs_steps + config.task.n_action_steps - 1
    if config.task.horizon < need:
      c.fail('task.horizon', f'must be >= n_obs_steps + n_action_steps - 1 = {need} '
             f'(n_obs_steps={config.task.n_obs_steps}, '
             f'n_action_steps={config.task.n_action_steps})')
  shape_meta = None
  if c.present('task.shape_meta'):
    try:
      shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    except (ValueError, TypeError, KeyError, AttributeError) as e:
      c.fail('task.shape_meta', str(e))

  # Data.
  if c.int_at_least('data.batch_size', 1):
    batch = config.data.batch_size
    for count, what in ((num_devices, 'devices'), (num_processes, 'processes')):
      if count and batch % count:
        c.fail('data.batch_size', f'the global batch must divide by the {count} {what} of '
               f'this run; use a multiple of {count} (or, to resume a run, which keeps its '
               f'batch size, {what} that divide {batch})')
  c.int_at_least('data.num_demos', 2)
  dataset_path = config.data.get('dataset_path')
  if dataset_path is not None and (not isinstance(dataset_path, str) or
                                   not os.path.isfile(dataset_path)):
    c.fail('data.dataset_path', 'no such file; expected a robomimic hdf5 file, or None for the '
           "scripted expert's demos")
  filter_key = config.data.get('filter_key')
  if filter_key is not None and (not isinstance(filter_key, str) or not filter_key):
    c.fail('data.filter_key', 'expected the name of a mask/<filter_key> list of the dataset, or '
           'None for all demos')
  c.int_at_least('data.num_gen_workers', 0)
  c.int_at_least('data.image_size', 1)
  c.number_in('data.val_ratio', 0.0, 1.0, high_open=True)
  c.int_at_least('data.shuffle_buffer', 1)
  crop_ok = c.present('data.crop_shape')
  if crop_ok:
    crop = config.data.crop_shape
    if (not isinstance(crop, (tuple, list)) or len(crop) != 2
        or not all(_is_int(v) and v > 0 for v in crop)):
      c.fail('data.crop_shape', 'expected (height, width), two positive integers; the image '
             'size, e.g. (84, 84), for no crop')
      crop_ok = False
  if crop_ok and min(crop) < MIN_CROP:
    c.fail('data.crop_shape', f'sides must be >= {MIN_CROP}: ResNet-18 downsamples 32x, and '
           'on a 1-pixel-wide map the SpatialSoftmax keypoints do not depend on the image')
  if crop_ok and shape_meta is not None:
    too_small = [f'{s.key!r} ({s.shape[0]}x{s.shape[1]})' for s in shape_meta.obs
                 if s.kind == 'rgb' and (crop[0] > s.shape[0] or crop[1] > s.shape[1])]
    if too_small:
      c.fail('data.crop_shape', f'larger than the images of {", ".join(too_small)} '
             '(task.shape_meta)')
  if shape_meta is not None and _is_int(config.data.get('image_size')):
    for spec in shape_meta.obs:
      if spec.kind == 'rgb' and spec.shape[:2] != (config.data.image_size,) * 2:
        c.fail('data.image_size', f'the demos are rendered at this size but task.shape_meta '
               f'says {spec.key!r} is {spec.shape[0]}x{spec.shape[1]}')
  if c.present('model.crop_shape') and crop_ok:
    if tuple(config.model.crop_shape) != tuple(config.data.crop_shape):
      c.fail('model.crop_shape', f'must equal data.crop_shape={tuple(config.data.crop_shape)}')

  # Model: the network's own checks too, here before any data is generated.
  sizes_ok = c.int_at_least('model.n_emb', 1) and c.int_at_least('model.n_head', 1)
  if sizes_ok and config.model.n_emb % config.model.n_head:
    c.fail('model.n_emb', f'must divide by model.n_head={config.model.n_head}')
    sizes_ok = False
  if sizes_ok and (config.model.n_emb % 2 or config.model.n_emb < 4):
    c.fail('model.n_emb', 'must be even and >= 4: the sinusoidal time embedding has n_emb / 2 '
           'frequencies')
    sizes_ok = False
  c.int_at_least('model.n_layer', 1)
  sizes_ok &= c.int_at_least('model.n_cond_layers', 0)
  if c.int_at_least('model.resnet_width', 1):
    for stage in range(4):  # ResNet-18's stages double the channels.
      try:
        group_norm_groups(config.model.resnet_width * 2**stage)
      except ValueError as e:
        c.fail('model.resnet_width', f'stage {stage + 1}: {e}')
        break
  fields = ('model.time_as_cond', 'model.obs_as_cond', 'model.pred_action_steps_only',
            'task.horizon', 'task.n_obs_steps')
  if (sizes_ok and all(c.present(field) for field in fields)
      and _is_int(config.task.horizon) and _is_int(config.task.n_obs_steps)):
    for field, problem in model_problems(config.model, config.task.horizon,
                                         config.task.n_obs_steps):
      c.fail(f'model.{field}', problem)
  c.int_at_least('model.num_keypoints', 1)
  c.int_at_least('model.image_feature_dim', 1)
  c.number_in('model.p_drop_emb', 0.0, 1.0, high_open=True)
  c.number_in('model.p_drop_attn', 0.0, 1.0, high_open=True)
  c.one_of('model.compute_dtype', COMPUTE_DTYPES)
  if c.present('model.obs_encoder_group_norm') and not config.model.obs_encoder_group_norm:
    c.fail('model.obs_encoder_group_norm', 'must be True: BatchNorm statistics do not mix '
           'with EMA parameters (SPEC §10), so the encoder uses GroupNorm')

  # Diffusion (SPEC §6).
  c.one_of('diffusion.sampler', SAMPLERS)
  c.one_of('diffusion.beta_schedule', BETA_SCHEDULES)
  c.one_of('diffusion.variance_type', VARIANCE_TYPES)
  c.one_of('diffusion.prediction_type', PREDICTION_TYPES)
  if c.int_at_least('diffusion.num_train_timesteps', 1) and c.int_at_least(
      'diffusion.num_inference_steps', 1):
    if config.diffusion.num_inference_steps > config.diffusion.num_train_timesteps:
      c.fail('diffusion.num_inference_steps', 'must be <= diffusion.num_train_timesteps='
             f'{config.diffusion.num_train_timesteps}')
  if (c.number_in('diffusion.beta_start', 0.0, 1.0, low_open=True, high_open=True)
      and c.number_in('diffusion.beta_end', 0.0, 1.0, low_open=True, high_open=True)):
    if config.diffusion.beta_start >= config.diffusion.beta_end:
      c.fail('diffusion.beta_start', f'must be < diffusion.beta_end={config.diffusion.beta_end}')
  if c.number_in('diffusion.ddim_eta', 0.0, inf) and config.diffusion.ddim_eta > 1.0:
    c.fail('diffusion.ddim_eta', 'must be <= 1 (0: deterministic DDIM, 1: DDPM-like noise); '
           'above 1 the noise exceeds what a step can hold and the samples turn NaN')

  # Optimiser (SPEC §7).
  c.number_in('optimizer.lr', 0.0, inf, low_open=True)
  if c.present('optimizer.betas'):
    betas = config.optimizer.betas
    if (not isinstance(betas, (tuple, list)) or len(betas) != 2
        or not all(_is_number(b) and 0.0 <= b < 1.0 for b in betas)):
      c.fail('optimizer.betas', 'expected two numbers in [0, 1)')
  c.number_in('optimizer.eps', 0.0, inf, low_open=True)
  c.number_in('optimizer.transformer_weight_decay', 0.0, inf)
  c.number_in('optimizer.obs_encoder_weight_decay', 0.0, inf)
  c.one_of('optimizer.lr_schedule', LR_SCHEDULES)
  c.int_at_least('optimizer.lr_warmup_steps', 0)
  c.number_in('optimizer.grad_clip_norm', 0.0, inf)

  # EMA (SPEC §7).
  c.int_at_least('ema.update_after_step', 0)
  c.number_in('ema.inv_gamma', 0.0, inf, low_open=True)
  c.number_in('ema.power', 0.0, inf, low_open=True)
  if c.number_in('ema.min_value', 0.0, 1.0) and c.number_in('ema.max_value', 0.0, 1.0):
    if config.ema.min_value > config.ema.max_value:
      c.fail('ema.min_value', f'must be <= ema.max_value={config.ema.max_value}')

  # Training loop; intervals are in epochs and 0 means never.
  c.int_at_least('training.num_epochs', 1)
  c.int_at_least('training.gradient_accumulate_every', 1)
  for name in ('val_every', 'sample_every', 'rollout_every', 'checkpoint_every'):
    c.int_at_least(f'training.{name}', 0)
  c.int_at_least('training.checkpoint_every_steps', 0)
  c.int_at_least('training.max_train_steps', 1, optional=True)
  c.int_at_least('training.max_val_steps', 1, optional=True)
  c.int_at_least('training.checkpoint_topk', 1)
  c.int_at_least('training.log_every_steps', 1)
  c.number_in('training.progress_refresh_s', 0.0, inf)

  # Evaluation.
  if c.int_at_least('eval.num_episodes', 0) and _is_int(config.training.get('rollout_every')):
    if config.training.rollout_every > 0 and config.eval.num_episodes < 1:
      c.fail('eval.num_episodes', 'rollouts are on (training.rollout_every='
             f'{config.training.rollout_every}), so at least 1 test episode is needed; set '
             'training.rollout_every=0 to train without rollouts')
  c.int_at_least('eval.num_train_episodes', 0)
  c.int_at_least('eval.num_envs', 0)
  c.int_at_least('eval.max_steps', 1)
  c.int_at_least('eval.video_episodes', 0)

  if c.problems:
    raise ConfigError('invalid config (configs/lift.py and --config.* overrides):\n  '
                      + '\n  '.join(c.problems), tuple(c.problems))
