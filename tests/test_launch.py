"""End to end through launch.py with the smoke config: train, checkpoint, restore, sample; evaluate
the trained run with scripts/eval.py in rendered robosuite; resume after SIGKILL; two processes
with jax.distributed; bad config values. In this process, on copies of that run: resumes that are
refused (another model or dataset, corrupt checkpoints) and leave the workdir untouched, a
finished run's rerun, and a diverged run that saves nothing.

One module-scoped run (A) starts from an empty data_dir, so it also generates the demos and
builds the dataset; the other runs reuse that data_dir. All runs share a persistent XLA cache
and compile without backend optimisations, which keeps the module to a few minutes on 2 cores.
"""

import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import types

import h5py
import imageio.v2 as imageio
import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from configs import lift
from dpjax.data import pipeline, prepare
from dpjax.data.shape_meta import ShapeMeta
from dpjax.training import checkpointing, config_checks, metrics, resume_checks, trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# Three epochs of two batches, a checkpoint after every step (mid-epoch ones included).
RUN_FLAGS = ['--config', 'configs/lift.py:smoke', '--config.training.num_epochs=3',
             '--config.training.checkpoint_every_steps=1']
FINAL_STEP = 6


def _env(root) -> dict:
  return dict(os.environ, PYTHONPATH=REPO, JAX_PLATFORMS='cpu',
              XLA_FLAGS='--xla_backend_optimization_level=0',
              JAX_COMPILATION_CACHE_DIR=str(root / 'jax_cache'),
              JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS='0')


def _launch(root, workdir, *extra, timeout=900):
  return subprocess.run(
      [sys.executable, 'launch.py', *RUN_FLAGS, f'--workdir={workdir}',
       f'--config.data.data_dir={root / "data"}', *extra],
      cwd=REPO, env=_env(root), capture_output=True, text=True, timeout=timeout)


@pytest.fixture(scope='module')
def run_a(tmp_path_factory):
  root = tmp_path_factory.mktemp('launch')
  # One short rollout after the last epoch ranks the final checkpoint.
  proc = _launch(root, root / 'run_a', '--config.training.rollout_every=3',
                 '--config.eval.num_episodes=1', '--config.eval.max_steps=16')
  assert proc.returncode == 0, proc.stderr[-5000:]
  return types.SimpleNamespace(root=root, workdir=root / 'run_a', stdout=proc.stdout,
                               stderr=proc.stderr)


def _smoke_config(root):
  config = lift.get_config('smoke')
  config.data.data_dir = str(root / 'data')
  return config


def _saved_state(step_dir) -> dict:
  """A checkpoint's full train state as numpy arrays (no target structure needed)."""
  with ocp.PyTreeCheckpointer() as checkpointer:
    metadata = checkpointer.metadata(step_dir / 'state').item_metadata.tree
    restore_args = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), metadata)
    return checkpointer.restore(step_dir / 'state', args=ocp.args.PyTreeRestore(
        item=metadata, restore_args=restore_args))


def _flat(tree) -> dict:
  return {jax.tree_util.keystr(path): np.asarray(leaf)
          for path, leaf in jax.tree_util.tree_leaves_with_path(tree)}


def test_launch_trains_checkpoints_restores_and_samples(run_a):
  workdir = run_a.workdir
  assert 'Generating 3 Lift demos' in run_a.stdout + run_a.stderr  # Data built on first use.
  assert json.loads((workdir / 'config.json').read_text())['training']['num_epochs'] == 3
  records = metrics.read_metrics(workdir)
  train_steps = [r['step'] for r in records if 'train/loss' in r]
  assert train_steps == list(range(1, FINAL_STEP + 1))
  epochs = [r for r in records if 'epoch/val_loss' in r]
  assert len(epochs) == 3
  assert all(np.isfinite(r['epoch/val_loss']) and np.isfinite(r['epoch/train_action_mse'])
             for r in epochs)
  assert any(r.get('train/lr', 0) > 0 for r in records)
  assert any(name.startswith('events.out.tfevents') for name in
             os.listdir(workdir / 'tensorboard'))
  rollouts = [r for r in records if 'rollout/test/success_rate' in r]
  assert [r['step'] for r in rollouts] == [FINAL_STEP]
  assert 0.0 <= rollouts[0]['rollout/test/success_rate'] <= 1.0
  assert any(name.endswith('.mp4') for name in os.listdir(workdir / 'videos' / 'epoch_0002'))
  summary = json.loads((workdir / 'summary.json').read_text())
  assert summary['step'] == FINAL_STEP and summary['checkpoint'].endswith(f'/{FINAL_STEP}')
  assert summary['success_rate'] == rollouts[0]['rollout/test/success_rate']
  step_metrics = json.loads((workdir / 'checkpoints' / str(FINAL_STEP) / 'metrics' /
                             'metrics').read_text())
  assert step_metrics == {'success_rate': summary['success_rate']}  # Ranked for the top-k.

  # Restore: the exported policy equals the latest checkpoint's EMA parameters...
  config, policy, variables = checkpointing.load_policy(workdir / 'policy')
  _, _, from_checkpoint = checkpointing.load_policy(workdir)
  exported, restored = _flat(variables), _flat(from_checkpoint)
  assert exported.keys() == restored.keys()
  for key in exported:
    np.testing.assert_array_equal(exported[key], restored[key], err_msg=key)
  state = _saved_state(workdir / 'checkpoints' / str(FINAL_STEP))
  assert int(state['step']) == FINAL_STEP
  for key, value in _flat({'params': state['ema_params']}).items():
    np.testing.assert_array_equal(value, exported[key], err_msg=key)

  # ...and samples actions for real validation observations.
  prepared = prepare.prepare_dataset(_smoke_config(run_a.root), log=lambda _: None)
  shape_meta = ShapeMeta.from_config(config.task.shape_meta)
  kwargs = pipeline.pipeline_kwargs(config, 'val')
  kwargs.update(process_index=0, process_count=1, repeat=False)
  batch = next(pipeline.make_dataset(prepared.builder, shape_meta, **kwargs))
  result = policy.predict_action(variables, batch['obs'], jax.random.PRNGKey(0))
  batch_size = config.data.batch_size
  assert result['action'].shape == (batch_size, 8, 7)
  assert result['action_pred'].shape == (batch_size, 10, 7)
  action = np.asarray(result['action'])
  assert np.isfinite(action).all() and np.abs(action).max() <= 1.0 + 1e-5


# subprocess forks (then execs at once) from a process where JAX's threads run: safe.
@pytest.mark.filterwarnings('ignore:os.fork.. was called:RuntimeWarning')
def test_eval_script_on_the_trained_run(run_a, tmp_path):
  output_dir = tmp_path / 'eval'
  proc = subprocess.run(
      [sys.executable, 'scripts/eval.py', '--workdir', str(run_a.workdir), '--num_episodes', '1',
       '--num_envs', '1', '--video_episodes', '1', '--sampler', 'ddim',
       '--num_inference_steps', '2', '--n_action_steps', '4', '--output_dir', str(output_dir),
       '--no_progress'],
      cwd=REPO, env=_env(run_a.root), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 0, proc.stderr[-4000:]

  assert 'evaluation of lift_smoke (diffusion, 1 envs)' in proc.stdout
  result = json.loads((output_dir / 'eval.json').read_text())
  assert result['config_name'] == 'lift_smoke'
  assert result['checkpoint_step'] == FINAL_STEP
  assert result['settings']['sampler'] == 'ddim'
  assert result['settings']['num_inference_steps'] == 2
  assert result['settings']['n_action_steps'] == 4  # The checkpoint's config says 8.
  (episode,) = result['episodes']
  assert episode['seed'] == 100000 and not episode['crashed']
  assert 0 < episode['steps'] <= 16  # The run's config.eval.max_steps.
  assert result['test']['num_episodes'] == 1
  assert result['test']['success_rate'] == float(episode['success'])
  low, high = result['test']['success_ci95']
  assert 0.0 <= low <= result['test']['success_rate'] <= high <= 1.0
  assert result['timing']['env_steps'] == episode['steps']
  assert result['timing']['policy_calls'] == -(-episode['steps'] // 4)
  assert set(result['scalars']) >= {'test/success_rate', 'eval/env_steps_per_s',
                                    'eval/policy_share'}

  outcome = 'success' if episode['success'] else 'failure'
  assert os.listdir(output_dir / 'videos') == [f'test_100000_{outcome}.mp4']
  assert episode['video'] == str(output_dir / 'videos' / f'test_100000_{outcome}.mp4')
  frames = imageio.mimread(episode['video'], memtest=False)
  # One frame per observation (reset + each step): agentview and wrist view side by side, 2x.
  assert len(frames) == episode['steps'] + 1
  assert frames[0].shape == (168, 336, 3)
  # Both halves show a rendered scene, not a blank frame.
  assert frames[0][:, :168].std() > 5 and frames[0][:, 168:].std() > 5


def test_resume_after_sigkill_matches_the_uninterrupted_run(run_a):
  root, workdir = run_a.root, run_a.root / 'run_b'
  command = [sys.executable, 'launch.py', *RUN_FLAGS, f'--workdir={workdir}',
             f'--config.data.data_dir={root / "data"}']
  proc = subprocess.Popen(command, cwd=REPO, env=_env(root), stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
  checkpoints = workdir / 'checkpoints'
  killed_after = None
  try:
    deadline = time.time() + 600
    while time.time() < deadline and proc.poll() is None:
      finished = [int(n) for n in (os.listdir(checkpoints) if checkpoints.exists() else [])
                  if n.isdigit()]
      if finished:
        killed_after = max(finished)
        break
      time.sleep(0.02)
    assert proc.poll() is None, proc.stderr.read()[-5000:]
  finally:
    proc.send_signal(signal.SIGKILL)
    proc.wait()
  assert proc.returncode == -signal.SIGKILL
  assert killed_after is not None and killed_after < FINAL_STEP
  assert not (workdir / 'summary.json').exists()

  resumed = _launch(root, workdir)
  assert resumed.returncode == 0, resumed.stderr[-5000:]
  assert 'Resumed from' in resumed.stderr
  uninterrupted = _flat(_saved_state(run_a.workdir / 'checkpoints' / str(FINAL_STEP)))
  after_resume = _flat(_saved_state(workdir / 'checkpoints' / str(FINAL_STEP)))
  assert uninterrupted.keys() == after_resume.keys()
  for key in uninterrupted:  # params, EMA, optimiser moments, step and RNG.
    np.testing.assert_array_equal(after_resume[key], uninterrupted[key], err_msg=key)

  def epoch_losses(run):  # The last record of each step: after the resume, the resumed run's.
    return {r['step']: r['epoch/train_loss'] for r in metrics.read_metrics(run)
            if 'epoch/train_loss' in r}
  # An epoch the kill cut short averages the losses of its batches before the kill too.
  assert epoch_losses(workdir) == epoch_losses(run_a.workdir)


_TWO_PROCESS_DRIVER = textwrap.dedent('''
    import sys
    import jax, numpy as np
    address, process_id, data_dir, workdir = sys.argv[1:5]
    jax.distributed.initialize(coordinator_address=address, num_processes=2,
                               process_id=int(process_id))
    from configs import lift
    from dpjax.training import trainer
    config = lift.get_config('smoke')
    config.data.data_dir = data_dir
    config.training.val_every = config.training.sample_every = 0  # Training only.
    state = trainer.train_and_evaluate(config, workdir)
    host = jax.device_get(state)
    np.savez(f'{workdir}/final_process{jax.process_index()}.npz', step=host.step,
             *jax.tree.leaves((host.params, host.ema_params)))
    print('DEVICES', jax.device_count(), jax.local_device_count(), flush=True)
''')


def test_two_processes_train_to_identical_parameters(run_a):
  root, workdir = run_a.root, run_a.root / 'run_c'
  with socket.socket() as s:
    s.bind(('localhost', 0))
    port = s.getsockname()[1]
  procs = [subprocess.Popen(
      [sys.executable, '-c', _TWO_PROCESS_DRIVER, f'localhost:{port}', str(i),
       str(root / 'data'), str(workdir)],
      cwd=REPO, env=_env(root), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
           for i in range(2)]
  outputs = [p.communicate(timeout=900) for p in procs]
  for p, (out, err) in zip(procs, outputs):
    assert p.returncode == 0, err[-5000:]
    assert 'DEVICES 2 1' in out  # One global mesh over both processes' CPU devices.
  first, second = (np.load(workdir / f'final_process{i}.npz') for i in range(2))
  assert int(first['step']) == 4  # smoke: 2 epochs x 2 global batches.
  assert first.files == second.files and len(first.files) > 10
  for name in first.files:
    np.testing.assert_array_equal(first[name], second[name], err_msg=name)
  assert json.loads((workdir / 'summary.json').read_text())['step'] == 4


def test_bad_config_value_stops_launch_with_a_clear_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'configs/lift.py:smoke',
       f'--workdir={tmp_path / "run"}', f'--config.data.data_dir={tmp_path / "data"}',
       '--config.task.horizon=4', '--config.diffusion.num_inference_steps=50'],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert 'task.horizon=4: must be >= n_obs_steps + n_action_steps - 1 = 9' in proc.stderr
  assert ('diffusion.num_inference_steps=50: must be <= diffusion.num_train_timesteps=10'
          in proc.stderr)
  assert 'Traceback' not in proc.stderr  # The message alone.
  assert not (tmp_path / 'data').exists()  # Nothing was generated for a bad config.


def test_an_override_naming_no_config_field_is_one_message(tmp_path):
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'configs/lift.py:smoke',
       f'--workdir={tmp_path / "run"}', '--config.training.num_epoch=5'],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip() == ('error: a --config.* override names no field of the config: '
                                 '\'num_epoch\' Did you mean "num_epochs" instead of '
                                 '"num_epoch"?')


# Without overrides ml_collections raised the error when the config was first read; with them,
# while parsing the flags.
@pytest.mark.parametrize('flags', [['--config', 'configs/nope.py'],
                                   ['--config=configs/nope.py:cpu',
                                    '--config.training.num_epochs=5']])
def test_a_missing_config_file_is_one_message(tmp_path, flags):
  proc = subprocess.run(
      [sys.executable, 'launch.py', *flags, f'--workdir={tmp_path / "run"}'],
      cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert proc.stderr.strip() == 'error: configs/nope.py: no such config file'
  assert not (tmp_path / 'run').exists()


@pytest.mark.parametrize('flags, message', [
    (['--coordinator_address=localhost:1', '--num_processes=2', '--process_id=5'],
     '--process_id=5: expected 0 … --num_processes − 1 = 1'),
    (['--distributed'], 'No cluster environment (SLURM, Cloud TPU, ...) was recognised; pass '
     '--coordinator_address, --num_processes and --process_id instead'),
])
def test_bad_multi_process_flags_are_one_message(tmp_path, flags, message):
  env = {k: v for k, v in _env(tmp_path).items() if not k.startswith(('SLURM_', 'OMPI_'))}
  proc = subprocess.run(
      [sys.executable, 'launch.py', '--config', 'configs/lift.py:smoke',
       f'--workdir={tmp_path / "run"}', *flags],
      cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
  assert proc.returncode == 1
  assert message in proc.stderr and 'Traceback' not in proc.stderr
  assert not (tmp_path / 'run').exists()


def _train_in_process(root, workdir, **overrides):
  """`train_and_evaluate` with RUN_FLAGS' config and `overrides` {'group.field': value}."""
  config = _smoke_config(root)
  config.training.num_epochs = 3
  config.training.checkpoint_every_steps = 1
  for field, value in overrides.items():
    group, name = field.split('.')
    config[group][name] = value
  return trainer.train_and_evaluate(config, str(workdir))


def _workdir_files(workdir) -> dict:
  """Every file of a workdir with its contents: a refused run must change none."""
  files = {}
  for directory, _, names in os.walk(workdir):
    for name in names:
      path = os.path.join(directory, name)
      with open(path, 'rb') as f:
        files[os.path.relpath(path, workdir)] = f.read()
  return files


@pytest.mark.parametrize('overrides, error, message', [
    ({'training.resume': False, 'optimizer.lr': 0.5}, FileExistsError,
     r'holds checkpoints \(latest step 6\) but config\.training\.resume=False'),
    ({'model.n_head': 4}, resume_checks.ResumeError,
     r'checkpoints/6 was trained with model\.n_head=2, this run has model\.n_head=4; resume '
     r'with the same values or use a fresh --workdir'),
    ({'model.compute_dtype': 'bfloat16', 'model.p_drop_attn': 0.1, 'diffusion.sampler': 'ddim'},
     resume_checks.ResumeError,  # Sampling-only fields may change; the others are listed together.
     r"trained with model\.compute_dtype='float32', model\.p_drop_attn=0\.3, this run has "
     r"model\.compute_dtype='bfloat16', model\.p_drop_attn=0\.1;"),
    ({'training.gradient_accumulate_every': 2}, resume_checks.ResumeError,
     r'trained with training\.gradient_accumulate_every=1, this run has '
     r'training\.gradient_accumulate_every=2'),
    ({'training.num_epochs': 2}, resume_checks.ResumeError,
     r'checkpoints/6 is past the end of this run: it was saved at epoch 3 \(batch 0\), '
     r'config\.training\.num_epochs=2'),
    ({'training.gradient_accumulate_every': 7}, config_checks.ConfigError,
     r"training\.gradient_accumulate_every=7: more than the run's 6 batches "
     r'\(training\.num_epochs=3 x 2 per epoch\), so no optimiser step would ever run'),
])
def test_refused_resume_leaves_the_workdir_untouched(run_a, tmp_path, overrides, error,
                                                     message):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  before = _workdir_files(workdir)
  with pytest.raises(error, match=message):
    _train_in_process(run_a.root, workdir, **overrides)
  assert _workdir_files(workdir) == before  # config.json, metrics and events files included.


def test_resume_on_a_changed_dataset_is_refused(run_a, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  stored = workdir / 'checkpoints' / str(FINAL_STEP) / 'normalizer' / 'metadata'
  normalizer = json.loads(stored.read_text())
  normalizer['keys']['action']['offset'][0] += 0.1
  stored.write_text(json.dumps(normalizer))
  before = _workdir_files(workdir)
  with pytest.raises(resume_checks.ResumeError,
                     match=r"other normaliser statistics than this run's dataset .*'action' "
                           r'offset .*the dataset changed since these checkpoints were written'):
    _train_in_process(run_a.root, workdir)
  assert _workdir_files(workdir) == before


def test_resume_on_edited_demos_is_refused(run_a, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  data_dir = tmp_path / 'data'  # The same demos elsewhere, their actions' signs flipped.
  shutil.copytree(run_a.root / 'data', data_dir, ignore=shutil.ignore_patterns('tfds', 'stats'))
  demos = data_dir / os.path.basename(prepare.demo_path(_smoke_config(run_a.root)))
  with h5py.File(demos, 'a') as f:
    for name in f['data']:
      actions = f[f'data/{name}/actions']
      actions[...] = -actions[()]
  before = _workdir_files(workdir)
  with pytest.raises(resume_checks.ResumeError,
                     match=rf"checkpoints/6 was trained on other demos than this run's {demos} "
                           r'\(dataset digest [0-9a-f]{16}\.\.\. vs [0-9a-f]{16}\.\.\.: '):
    _train_in_process(run_a.root, workdir, **{'data.data_dir': str(data_dir)})
  assert _workdir_files(workdir) == before


def test_rerunning_a_finished_run_keeps_its_summary(run_a, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  before = _workdir_files(workdir)
  # Training, evaluation and sampling fields may change on a resume.
  state = _train_in_process(run_a.root, workdir, **{'optimizer.lr': 1e-3, 'eval.max_steps': 5,
                                                     'diffusion.num_inference_steps': 2})
  assert int(state.step) == FINAL_STEP
  assert _workdir_files(workdir) == before  # summary.json keeps the losses and success rate.


def test_a_finished_run_killed_before_its_summary_reports_what_it_measured(run_a, tmp_path):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  (workdir / 'summary.json').unlink()  # Killed after its last checkpoint, before the summary.
  with open(workdir / 'metrics.jsonl', 'a', encoding='utf-8') as f:
    f.write('{"step": 6, "epoch/val_lo')  # ... or while writing a record.
  state = _train_in_process(run_a.root, workdir)
  assert int(state.step) == FINAL_STEP
  finished = json.loads((run_a.workdir / 'summary.json').read_text())
  summary = json.loads((workdir / 'summary.json').read_text())
  fields = ['step', 'epoch', *trainer.SUMMARY_METRICS]
  assert {k: summary[k] for k in fields} == {k: finished[k] for k in fields}
  assert None not in summary.values()
  assert metrics.read_metrics(workdir) == metrics.read_metrics(run_a.workdir)


@pytest.mark.parametrize('corrupt, cause', [
    (lambda step_dir: (step_dir / 'progress' / 'metadata').unlink(), 'FileNotFoundError'),
    (lambda step_dir: shutil.rmtree(step_dir / 'state'), 'FileNotFoundError'),
    (lambda step_dir: shutil.rmtree(step_dir / 'state' / 'd'), 'ValueError'),
])
def test_corrupt_latest_checkpoint_is_named_with_the_step_to_resume_from(run_a, tmp_path,
                                                                        corrupt, cause):
  workdir = tmp_path / 'run'
  shutil.copytree(run_a.workdir, workdir)
  checkpoints = workdir / 'checkpoints'
  shutil.copytree(checkpoints / str(FINAL_STEP), checkpoints / '4')  # An earlier checkpoint.
  corrupt(checkpoints / str(FINAL_STEP))
  before = _workdir_files(workdir)
  with pytest.raises(resume_checks.ResumeError,
                     match=rf'{re.escape(str(checkpoints))}/6 cannot be restored \({cause}: '
                           rf'[^\n]+\); move it out of {re.escape(str(checkpoints))} to '
                           'resume from step 4$'):
    _train_in_process(run_a.root, workdir)
  assert _workdir_files(workdir) == before  # Nothing deleted, nothing written.


# The learning rate of 1e39 overflows float32 on purpose (numpy warns as JAX casts it).
@pytest.mark.filterwarnings('ignore:overflow encountered in cast:RuntimeWarning')
def test_diverged_parameters_are_not_checkpointed(run_a, tmp_path):
  workdir = tmp_path / 'run'
  # The one step's loss is finite; its update, at a float32 learning rate of inf, is not: only
  # the parameters show the divergence (validation and sampling are off).
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'parameters are not finite after step 1 \(epoch 1\); stopping '
                           r'without saving\. Last good checkpoint: none'):
    _train_in_process(run_a.root, workdir, **{
        'training.num_epochs': 1, 'training.max_train_steps': 1, 'optimizer.lr': 1e39,
        'optimizer.lr_warmup_steps': 0, 'training.val_every': 0, 'training.sample_every': 0})
  assert os.listdir(workdir / 'checkpoints') == []
  assert not (workdir / 'summary.json').exists() and not (workdir / 'policy').exists()
