"""configs/lift.py variants, the start-of-run validation (config_checks) and what a resume may
change (resume_checks)."""

import pytest

from configs import lift
from dpjax.training import checkpointing, resume_checks
from dpjax.training.config_checks import ConfigError, check_config


@pytest.mark.parametrize('variant', lift.VARIANTS)
def test_every_variant_is_valid(variant):
  check_config(lift.get_config(variant), num_devices=1, num_processes=1)


def test_user_values_and_paper_schedule():
  config = lift.get_config()
  assert (config.task.horizon, config.task.n_obs_steps, config.task.n_action_steps) == (10, 2, 8)
  assert config.data.batch_size == 64 and config.optimizer.lr == 1e-4
  assert tuple(config.optimizer.betas) == (0.9, 0.95)
  assert config.training.num_epochs == 100 and config.optimizer.lr_warmup_steps == 10
  paper = lift.get_config('paper')
  assert paper.training.num_epochs == 3050 and paper.optimizer.lr_warmup_steps == 1000
  assert paper.training.rollout_every == 50 and paper.training.checkpoint_every == 50


def test_shared_values_are_field_references():
  config = lift.get_config('smoke')
  config.task.horizon = 16
  config.task.n_action_steps = 4
  assert config.data.horizon == 16 and config.data.n_action_steps == 4
  config.data.crop_shape = (64, 64)
  assert tuple(config.model.crop_shape) == (64, 64)


def test_unknown_variant_is_rejected():
  with pytest.raises(ValueError, match=r"unknown variant 'fast'"):
    lift.get_config('fast')


@pytest.mark.parametrize('field, value, message', [
    ('task.horizon', 8, r'task\.horizon=8: must be >= n_obs_steps \+ n_action_steps - 1 = 9'),
    ('data.dataset_path', '/no/such/demos.hdf5', r"data\.dataset_path='/no/such/demos\.hdf5': "
     r'no such file; expected a robomimic hdf5 file'),
    ('data.filter_key', '', r"data\.filter_key='': expected the name of a mask/<filter_key> list"),
    ('data.crop_shape', (90, 90), r"data\.crop_shape=\(90, 90\): larger than the images of "
     r"'agentview_image' \(84x84\)"),
    ('data.batch_size', 5, r'data\.batch_size=5: the global batch must divide by the 2 devices'),
    ('diffusion.sampler', 'dpm', r"diffusion\.sampler='dpm': expected one of \('ddpm', 'ddim'\)"),
    ('diffusion.beta_schedule', 'cosine', r"diffusion\.beta_schedule='cosine': expected one of"),
    ('diffusion.num_inference_steps', 200,
     r'diffusion\.num_inference_steps=200: must be <= diffusion\.num_train_timesteps=100'),
    ('optimizer.lr_schedule', 'step', r"optimizer\.lr_schedule='step': expected one of"),
    ('optimizer.lr', 0.0, r'optimizer\.lr=0\.0: expected a number in \(0\.0, inf\)'),
    ('optimizer.lr', float('inf'), r'optimizer\.lr=inf: expected a number in \(0\.0, inf\)'),
    ('optimizer.eps', float('nan'), r'optimizer\.eps=nan: expected a number in \(0\.0, inf\)'),
    ('optimizer.betas', (0.9, 1.5), r'optimizer\.betas=\(0\.9, 1\.5\): expected two numbers'),
    ('ema.max_value', 1.5, r'ema\.max_value=1\.5: expected a number in \[0\.0, 1\.0\]'),
    ('model.n_head', 3, r'model\.n_emb=256: must divide by model\.n_head=3'),
    ('model.obs_encoder_group_norm', False, r'obs_encoder_group_norm=False: must be True'),
    # The network's own checks, before any data is generated: one line each, field named.
    ('model.n_emb', 6, r'model\.n_emb=6: must divide by model\.n_head=4'),
    ('model.resnet_width', 56, r'model\.resnet_width=56: stage 1: .*56 channels cannot be '
     r'split into 3 GroupNorm groups'),
    ('model.time_as_cond', False, r'model\.time_as_cond=False: encoder-only mode takes no '
     r'observation tokens: it needs model\.obs_as_cond=False'),
    ('diffusion.ddim_eta', 1.5, r'diffusion\.ddim_eta=1\.5: must be <= 1'),
    ('training.gradient_accumulate_every', 0,
     r'training\.gradient_accumulate_every=0: expected an integer >= 1'),
    ('training.max_train_steps', -1, r'training\.max_train_steps=-1: expected an integer >= 1 '
     r'or None'),
    ('training.rollout_every', -1, r'training\.rollout_every=-1: expected an integer >= 0'),
    ('data.num_demos', 1, r'data\.num_demos=1: expected an integer >= 2'),
    ('data.split_seed', -1, r'data\.split_seed=-1: expected an integer >= 0'),
    ('data.demo_seed', -3, r'data\.demo_seed=-3: expected an integer >= 0'),
    ('data.num_gen_workers', -2, r'data\.num_gen_workers=-2: expected an integer >= 0'),
    ('eval.video_episodes', -1, r'eval\.video_episodes=-1: expected an integer >= 0'),
    ('data.crop_shape', (32, 40), r'data\.crop_shape=\(32, 40\): sides must be >= 33: '
     r'ResNet-18 downsamples 32x'),
    # The default config rolls out every 10 epochs.
    ('eval.num_episodes', 0, r'eval\.num_episodes=0: rollouts are on \(training\.rollout_every'
     r'=10\), so at least 1 test episode is needed'),
])
def test_bad_values_are_rejected_with_the_field_named(field, value, message):
  config = lift.get_config()
  group, name = field.split('.')
  config[group][name] = value
  with pytest.raises(ConfigError, match=message):
    check_config(config, num_devices=2, num_processes=1)


@pytest.mark.parametrize('overrides, message', [
    (dict(n_emb=2, n_head=1), r'model\.n_emb=2: must be even and >= 4'),
    (dict(pred_action_steps_only=True, obs_as_cond=False),
     r'model\.pred_action_steps_only=True: needs model\.obs_as_cond=True'),
    (dict(pallas_decoder=True, n_emb=64, n_head=8),
     r'model\.pallas_decoder=True: needs the cached decoder .* n_emb=64, n_head=8'),
])
def test_model_combinations_the_network_refuses_are_refused_first(overrides, message):
  config = lift.get_config()
  config.model.update(overrides)
  with pytest.raises(ConfigError, match=message):
    check_config(config, num_devices=1, num_processes=1)
  config = lift.get_config()
  config.model.pallas_decoder = True  # The default sizes are the kernels'.
  check_config(config, num_devices=1, num_processes=1)


def test_run_seed_must_be_a_non_negative_integer():
  config = lift.get_config()
  config.seed = -1
  with pytest.raises(ConfigError, match=r'seed=-1: expected an integer >= 0'):
    check_config(config)


def test_no_test_episodes_are_fine_without_rollouts():
  config = lift.get_config()
  config.training.rollout_every = 0
  config.eval.num_episodes = 0
  check_config(config)


def test_all_problems_are_reported_at_once():
  config = lift.get_config()
  config.task.horizon = 4
  config.diffusion.sampler = 'x'
  with pytest.raises(ConfigError) as info:
    check_config(config)
  text = str(info.value)
  assert 'task.horizon=4' in text and "diffusion.sampler='x'" in text


def test_another_accumulation_count_is_not_resumable():
  """From 2 to 4 micro-batches per update: the EMA and LR schedule count updates as steps // k,
  so the checkpoint's progress would be re-read with the wrong k (the on/off rule missed it)."""
  saved, current = lift.get_config(), lift.get_config()
  saved.training.gradient_accumulate_every = 2
  current.training.gradient_accumulate_every = 4
  differences = resume_checks.resume_differences(checkpointing.config_to_dict(saved),
                                                 checkpointing.config_to_dict(current))
  assert differences == [('training.gradient_accumulate_every', 2, 4)]
  current.training.gradient_accumulate_every = 2
  current.training.num_epochs = 200  # Training fields otherwise stay free.
  assert not resume_checks.resume_differences(checkpointing.config_to_dict(saved),
                                              checkpointing.config_to_dict(current))
