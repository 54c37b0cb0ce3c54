"""`load_policy` on damaged exports and checkpoints: one error naming the file, nothing else."""

import json
import os

import jax
import jax.numpy as jnp
import pytest

from configs import lift
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.training import checkpointing, train_state
from dpjax.training.checkpointing import PolicyLoadError
# pylint: disable-next=g-bad-import-order
from test_training_checkpointing import smoke_normalizer


@pytest.fixture(scope='module')
def policy_parts():
  config = lift.get_config('smoke')
  normalizer = smoke_normalizer(config)
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  params = DiffusionPolicy(config, shape_meta, normalizer).init(jax.random.PRNGKey(0))['params']
  return config, normalizer, params


@pytest.fixture
def export(tmp_path, policy_parts):
  config, normalizer, params = policy_parts
  return checkpointing.export_policy(tmp_path / 'policy', ema_params=params, config=config,
                                     normalizer=normalizer)


def test_the_intact_export_loads(export):
  assert checkpointing.is_policy_export(export)
  config, _, _ = checkpointing.load_policy(export)
  assert config.name == 'lift_smoke'


@pytest.mark.parametrize('name', ['config.json', 'normalizer.json'])
def test_a_truncated_json_file_is_named(export, name):
  text = (export / name).read_text()
  (export / name).write_text(text[:len(text) // 2])
  with pytest.raises(PolicyLoadError, match=rf'{name}: not valid JSON .*corrupt or truncated'):
    checkpointing.load_policy(export)


def test_a_missing_normalizer_is_named(export):
  os.remove(export / 'normalizer.json')
  with pytest.raises(PolicyLoadError, match=r'normalizer.json: missing; a policy export holds'):
    checkpointing.load_policy(export)


def test_a_config_without_a_group_names_its_fields(export):
  data = json.loads((export / 'config.json').read_text())
  del data['task']
  (export / 'config.json').write_text(json.dumps(data))
  with pytest.raises(PolicyLoadError, match=r'(?s)config.json: not a valid dpjax config.*'
                     r'task.horizon: missing'):
    checkpointing.load_policy(export)


def test_a_config_that_builds_other_shapes_is_refused_before_sampling(export):
  data = json.loads((export / 'config.json').read_text())
  data['model']['n_emb'] *= 2
  (export / 'config.json').write_text(json.dumps(data))
  with pytest.raises(PolicyLoadError, match=r'params: the saved parameters do not match the '
                     r'saved config \(.*: shape \(\d+, \d+\) in the checkpoint, \(\d+, \d+\) in the '
                     r'network the saved config builds'):
    checkpointing.load_policy(export)


@pytest.mark.parametrize('which', ['largest array file', 'every file of a d/ folder'])
def test_damaged_parameter_files_are_named(export, which):
  files = [os.path.join(d, f) for d, _, names in os.walk(export / 'params') for f in names
           if os.path.basename(d) == 'd']
  if which == 'largest array file':
    files = [max(files, key=os.path.getsize)]
  for path in files:
    with open(path, 'r+b') as f:
      f.truncate(os.path.getsize(path) // 2)
  with pytest.raises(PolicyLoadError,
                     match=r'params: the parameters cannot be read \(.+\); the export is damaged'):
    checkpointing.load_policy(export)


def test_a_damaged_checkpoint_step_is_named(tmp_path, policy_parts):
  config, normalizer, params = policy_parts
  state = train_state.TrainState(step=jnp.asarray(3, jnp.int32), params=params,
                                 ema_params=params, opt_state=(), rng=jax.random.PRNGKey(0))
  checkpointer = checkpointing.Checkpointer(tmp_path / 'checkpoints', topk=1)
  checkpointer.save(state, progress={'epoch': 1, 'batch_in_epoch': 0}, config=config,
                    normalizer=normalizer)
  checkpointer.close()
  os.remove(tmp_path / 'checkpoints' / '3' / 'config' / 'metadata')
  with pytest.raises(PolicyLoadError, match=r'checkpoints/3: the checkpoint cannot be read'):
    checkpointing.load_policy(tmp_path)
