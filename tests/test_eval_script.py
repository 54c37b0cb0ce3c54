"""scripts/eval.py's command line: where results go by default, and flags refused up front."""

import importlib.util
import json
import os
import re

import jax
import pytest

from configs import lift
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.errors import InputError
from dpjax.training import checkpointing
# pylint: disable-next=g-bad-import-order
from test_training_checkpointing import smoke_normalizer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope='module')
def eval_script():
  spec = importlib.util.spec_from_file_location('eval_script',
                                                os.path.join(REPO, 'scripts', 'eval.py'))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def test_results_go_beside_what_training_replaces_or_prunes(eval_script, tmp_path):
  run = tmp_path / 'run'
  (run / 'policy' / 'params').mkdir(parents=True)
  (run / 'policy' / 'config.json').write_text('{}')
  (run / 'checkpoints' / '400').mkdir(parents=True)
  expected = {run: run / 'eval', run / 'checkpoints': run / 'eval',
              run / 'checkpoints' / '400': run / 'eval_step_400',
              run / 'policy': run / 'eval_policy'}
  for source, output_dir in expected.items():
    assert eval_script.default_output_dir(str(source)) == str(output_dir), source


def test_another_sampling_seed_does_not_overwrite_seed_0s_results(eval_script, tmp_path):
  run = tmp_path / 'run'
  (run / 'policy' / 'params').mkdir(parents=True)
  (run / 'policy' / 'config.json').write_text('{}')
  expected = {run: run / 'eval_seed1', run / 'checkpoints' / '400': run / 'eval_step_400_seed1',
              run / 'policy': run / 'eval_policy_seed1'}
  for source, output_dir in expected.items():
    assert eval_script.default_output_dir(str(source), seed=1) == str(output_dir), source


def test_eval_json_records_the_seed_and_its_default_folder_names_it(eval_script, tmp_path,
                                                                    monkeypatch):
  monkeypatch.chdir(tmp_path)
  eval_script.main(['--policy', 'expert', '--no_cameras', '--num_episodes', '1', '--num_envs',
                    '1', '--seed', '3', '--no_progress'])
  result = json.loads((tmp_path / 'runs' / 'eval_expert_seed3' / 'eval.json').read_text())
  assert result['settings']['seed'] == 3


@pytest.mark.parametrize('flag', ['--n_action_steps', '--num_inference_steps'])
def test_zero_counts_are_refused_not_replaced_by_the_checkpoints(eval_script, flag, capsys):
  with pytest.raises(SystemExit):
    eval_script.parse_args(['--workdir', 'runs/x', flag, '0'])
  assert f'{flag}: must be >= 1, got 0' in capsys.readouterr().err


@pytest.fixture(scope='module')
def smoke_export(tmp_path_factory):
  """An exported smoke policy of untrained parameters: horizon 10, 2 observed steps, 10
  diffusion steps."""
  config = lift.get_config('smoke')
  normalizer = smoke_normalizer(config)
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  params = DiffusionPolicy(config, shape_meta, normalizer).init(jax.random.key(0))['params']
  return checkpointing.export_policy(tmp_path_factory.mktemp('run') / 'policy',
                                     ema_params=params, config=config, normalizer=normalizer)


@pytest.mark.parametrize('flag, value, message', [
    ('--n_action_steps', '100', 'n_action_steps=100: must be in [1, 9]'),
    ('--num_inference_steps', '5000', 'num_inference_steps=5000: must be in [1, 10]'),
])
def test_step_counts_the_checkpoint_cannot_take_stop_before_any_folder_is_made(
    eval_script, smoke_export, tmp_path, flag, value, message):
  output_dir = tmp_path / 'eval'
  with pytest.raises(InputError, match=re.escape(message)):
    eval_script.main(['--checkpoint', str(smoke_export), flag, value,
                      '--output_dir', str(output_dir)])
  assert not output_dir.exists()


def test_an_unwritable_output_folder_stops_before_any_episode(eval_script, tmp_path):
  (tmp_path / 'a_file').write_text('')
  with pytest.raises(NotADirectoryError, match=r'a_file/eval'):
    eval_script.main(['--policy', 'expert', '--no_cameras', '--num_episodes', '1',
                      '--output_dir', str(tmp_path / 'a_file' / 'eval')])


def test_an_unknown_config_variant_is_refused_before_any_folder_is_made(eval_script, tmp_path,
                                                                        monkeypatch, capsys):
  monkeypatch.chdir(tmp_path)
  with pytest.raises(SystemExit):
    eval_script.main(['--policy', 'expert', '--config_variant', 'foo'])
  assert "--config_variant: invalid choice: 'foo'" in capsys.readouterr().err
  assert not (tmp_path / 'runs').exists()


def test_config_variant_is_refused_with_a_diffusion_policy(eval_script, capsys):
  with pytest.raises(SystemExit):
    eval_script.parse_args(['--workdir', 'runs/x', '--config_variant', 'cpu'])
  assert '--config_variant is for --policy expert only' in capsys.readouterr().err


def test_help_shows_the_defaults_of_seeds_envs_and_variant(eval_script, capsys):
  with pytest.raises(SystemExit):
    eval_script.parse_args(['--help'])
  text = ' '.join(capsys.readouterr().out.split())
  defaults = lift.get_config().eval
  for fragment in ['style seed (default: 0)', f'(default: config, {defaults.num_envs} in',
                   f'(default: config, {defaults.seed_start} in', '--policy expert (default: '
                   'default)', '--checkpoint is another name for it']:
    assert fragment in text, fragment
