"""`scripts/benchmark.py --quick` runs end to end and reports every figure (no time is asserted)."""

import ctypes.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_quick_benchmark_reports_every_field(tmp_path):
  output = tmp_path / 'bench.json'
  env = dict(os.environ, MUJOCO_GL=os.environ.get('MUJOCO_GL', 'egl'))
  figures = 'predict,train,encoder,pipeline,env,precision,torch_reference'
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'), '--quick',
                  '--only', figures, '--output', str(output)],
                 check=True, cwd=tmp_path, env=env, timeout=900)
  report = json.loads(output.read_text())

  assert report['quick'] is True
  assert report['pallas_decoder'] is False  # Not asked for (and its kernels need a GPU).
  for key in ('device_kind', 'platform', 'device_count', 'jax', 'jaxlib', 'cpu', 'cpu_count',
              'threads', 'cpu_kernels', 'host_allocator'):
    assert key in report['system'], key
  preloaded = 'tcmalloc' if 'tcmalloc' in os.environ.get('LD_PRELOAD', '') else 'system'
  assert report['system']['host_allocator'] == preloaded

  predict = report['predict']['results']
  assert {r['sampler'] for r in predict.values()} == {'ddpm', 'ddim'}
  assert {r['batch_size'] for r in predict.values()} == {1, 2}
  assert {(r['batch_size'], r['variables']) for r in predict.values()} == {
      (1, 'sampling'), (1, 'plain'), (2, 'sampling')}
  for name, result in predict.items():
    assert result['median_s'] > 0 and result['compile_s'] > 0, name
    assert result['flops'] > 0 and result['flops_per_s'] > 0, name
    assert result['temp_bytes'] is not None, name
  assert set(report['predict']['sampling_variables_s']) == {'ddpm4', 'ddim2'}
  assert min(report['predict']['sampling_variables_s'].values()) > 0

  train = report['train']['results']
  assert train, 'no training-step figure'
  for name, result in train.items():
    assert result['median_s'] > 0 and result['samples_per_s'] > 0, name
    assert result['flops'] > 0, name

  for name in ('forward', 'forward_backward'):
    assert report['encoder'][name]['median_s'] > 0 and report['encoder'][name]['flops'] > 0, name
  assert report['pipeline']['batches_per_s'] > 0
  assert report['env']['env_steps_per_s'] > 0 and report['env']['env_steps'] > 0
  assert report['memory']['host_max_rss_bytes'] > 0

  precision = report['precision']
  for dtype in ('float32', 'bfloat16'):
    run = precision['results'][dtype]
    assert len(run['losses']) == precision['steps'] and run['steps_s'] > 0, dtype
    assert all(loss > 0 for loss in run['losses']), dtype
  # The same parameters, batches and keys: the curves differ only by bfloat16 rounding.
  assert 0 < precision['max_relative_difference'] < 0.05

  torch_reference = report['torch_reference']
  assert torch_reference['num_params'] > 0 and torch_reference['threads'] >= 1
  for name in ('predict_ddpm10_batch1', 'predict_ddpm10_batch2', 'train_batch4',
               'encoder_forward', 'encoder_forward_backward'):
    assert torch_reference[name]['median_s'] > 0, name


def test_quick_benchmark_in_mixed_precision_with_traces(tmp_path):
  output = tmp_path / 'bench.json'
  subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'), '--quick',
                  '--only', 'predict', '--compute-dtype', 'bfloat16', '--trace', 'traces',
                  '--output', str(output)],
                 check=True, cwd=tmp_path, timeout=900)
  report = json.loads(output.read_text())
  assert report['compute_dtype'] == 'bfloat16'
  for name, result in report['predict']['results'].items():
    assert result['median_s'] > 0 and result['flops'] > 0, name
    if result['variables'] == 'plain':
      assert 'trace' not in result, name
      continue
    trace = result['trace']
    # A CPU trace has no device timeline: no kernels (tests/test_trace_summary.py has some).
    assert trace['kernels'] == 0 and trace['call_s'] > 0, name
    assert (tmp_path / trace['file']).is_file(), name
    assert trace['file'].startswith(os.path.join('traces', name, '')), name


def test_a_dataset_that_is_not_there_is_one_message(tmp_path):
  missing = tmp_path / 'no_dataset'
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'benchmark.py'),
                         '--quick', '--only', 'pipeline', '--dataset', str(missing),
                         '--output', str(tmp_path / 'bench.json')],
                        cwd=tmp_path, capture_output=True, text=True, timeout=300)
  assert proc.returncode != 0
  assert str(missing) in proc.stderr and 'Traceback' not in proc.stderr


_TCMALLOC = ctypes.util.find_library('tcmalloc_minimal')


@pytest.mark.skipif(_TCMALLOC is None, reason='libtcmalloc-minimal4 is not installed')
def test_host_allocator_names_the_preloaded_malloc():
  probe = ('import sys; sys.path.insert(0, "scripts"); import benchmark; '
           'print(benchmark.host_allocator())')
  env = {k: v for k, v in os.environ.items() if k != 'LD_PRELOAD'}
  names = [subprocess.run([sys.executable, '-c', probe], cwd=REPO, env=e, check=True,
                          capture_output=True, text=True).stdout.split()[-1]
           for e in (env, dict(env, LD_PRELOAD=_TCMALLOC))]
  assert names == ['system', 'tcmalloc']


@pytest.mark.parametrize('argv, message', [
    (['--repeats', '0'], '--repeats: must be >= 1, got 0'),
    (['--only', ''], '--only: no figure named'),
    (['--only', 'predict,fly'], "--only: unknown figure(s) ['fly']"),
    (['--output', '.'], '--output .: is a folder'),
    (['--output', 'README.md/bench.json'], f'--output README.md/bench.json: {REPO}/README.md '
     'cannot be made a folder (File exists)'),
    (['--dataset', 'no_dataset'], '--dataset no_dataset: not a prepared TFDS dataset directory'),
    (['--dataset', 'docs'], '--dataset docs: not a prepared TFDS dataset directory'),
])
def test_bad_flags_stop_before_any_figure_runs(monkeypatch, capsys, argv, message):
  monkeypatch.chdir(REPO)
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))
  import benchmark  # pylint: disable=g-import-not-at-top
  monkeypatch.setattr(benchmark, 'system_info', None)  # Reaching it would be a TypeError.
  with pytest.raises(SystemExit):
    benchmark.main(argv)
  assert message in capsys.readouterr().err


def test_help_shows_the_usage_examples_and_every_flag(monkeypatch, capsys):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))
  import benchmark  # pylint: disable=g-import-not-at-top
  with pytest.raises(SystemExit):
    benchmark.main(['--help'])
  out = capsys.readouterr().out
  assert 'python scripts/benchmark.py --only predict,train  # a selection' in out
  assert '# all but precision, torch_reference' in out
  assert 'JSON file the report (also printed) is written to' in out


def test_flags_take_underscores_as_the_config_fields_do(monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))
  import benchmark  # pylint: disable=g-import-not-at-top
  seen = []
  monkeypatch.setattr(benchmark, 'bench_predict', lambda args: seen.append(args) or {})
  report = benchmark.main(['--only', 'predict', '--compute_dtype', 'bfloat16',
                           '--pallas_decoder', '--output', str(tmp_path / 'bench.json')])
  assert report['compute_dtype'] == 'bfloat16'
  assert (seen[0].compute_dtype, seen[0].pallas_decoder) == ('bfloat16', True)


def test_a_failing_profiler_leaves_an_error_in_the_trace_not_a_crash(monkeypatch, tmp_path):
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))
  import benchmark  # pylint: disable=g-import-not-at-top

  def no_profiler(*args, **kwargs):
    raise RuntimeError('CUPTI unavailable')
  monkeypatch.setattr(benchmark.jax.profiler, 'trace', no_profiler)
  assert benchmark._traced_call(lambda: 0, str(tmp_path)) == {  # pylint: disable=protected-access
      'error': "RuntimeError('CUPTI unavailable')"}


def test_a_denoising_step_counts_the_same_flops_in_mixed_precision(monkeypatch):
  """bfloat16 Dense layers run on the CPU kernels (AVX512-BF16) even from plain variables; their
  products are counted all the same, as XLA's ops would count them (the bfloat16 program also
  counts its conversions: ≈ 2 % more at paper size and batch 28, 15 % at batch 1)."""
  monkeypatch.syspath_prepend(os.path.join(REPO, 'scripts'))
  import benchmark  # pylint: disable=g-import-not-at-top
  from configs import lift  # pylint: disable=g-import-not-at-top
  from dpjax.data.shape_meta import ShapeMeta  # pylint: disable=g-import-not-at-top
  from dpjax.diffusion.policy import DiffusionPolicy  # pylint: disable=g-import-not-at-top

  flops = {}
  for dtype in ('float32', 'bfloat16'):
    config = lift.get_config('default')
    config.model.compute_dtype = dtype
    shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    policy = DiffusionPolicy(config, shape_meta,
                             benchmark._synthetic_normalizer(shape_meta))  # pylint: disable=protected-access
    variables = policy.init(benchmark.jax.random.key(0))
    flops[dtype] = benchmark._denoise_step_flops(policy, variables, 28)  # pylint: disable=protected-access
  assert flops['float32'] > 0
  assert abs(flops['bfloat16'] / flops['float32'] - 1) < 0.05, flops
