"""scripts/trace_summary.py against a hand-made trace whose kernel figures are counted by hand."""

import gzip
import json
import os
import subprocess
import sys

import pytest

from dpjax.errors import InputError

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(REPO, 'scripts'))
import trace_summary  # pylint: disable=g-import-not-at-top

_METADATA = [
    {'ph': 'M', 'name': 'process_name', 'pid': 1, 'args': {'name': '/host:CPU'}},
    {'ph': 'M', 'name': 'process_name', 'pid': 2, 'args': {'name': '/device:GPU:0'}},
    {'ph': 'M', 'name': 'thread_name', 'pid': 1, 'tid': 5, 'args': {'name': 'python'}},
    {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 10,
     'args': {'name': 'Stream #13(Compute)'}},
    {'ph': 'M', 'name': 'thread_name', 'pid': 2, 'tid': 11, 'args': {'name': 'XLA Ops'}},
]


def _kernel(name, ts, dur):
  return {'ph': 'X', 'pid': 2, 'tid': 10, 'name': name, 'ts': ts, 'dur': dur}


_EVENTS = _METADATA + [
    _kernel('loop_add_fusion.1', 100, 10),  # [100, 110)
    _kernel('loop_add_fusion.2', 115, 5),   # [115, 120)
    _kernel('gemm_fusion_dot', 118, 4),     # [118, 122): overlaps the one before
    _kernel('cudnn_conv', 130, 20),         # [130, 150)
    {'ph': 'X', 'pid': 2, 'tid': 11, 'name': 'add.1', 'ts': 100, 'dur': 50},  # not a stream
    {'ph': 'X', 'pid': 1, 'tid': 5, 'name': 'PjitFunction', 'ts': 90, 'dur': 70},  # host
    {},  # JAX's export can end in an empty event
]


def _write_trace(path, events):
  path.parent.mkdir(parents=True)
  with gzip.open(path, 'wt') as f:
    json.dump({'traceEvents': events}, f)


def test_kernels_busy_and_idle_time_counted_by_hand():
  summary = trace_summary.summarize_events(_EVENTS)
  assert summary['kernels'] == 4
  assert summary['kernel_us'] == 39  # 10 + 5 + 4 + 20
  assert summary['span_us'] == 50  # 100 → 150
  assert summary['busy_us'] == 37  # [100, 110) + [115, 122) + [130, 150)
  assert summary['idle_us'] == 13
  assert summary['top_kernels'] == [
      {'name': 'cudnn_conv', 'count': 1, 'total_us': 20, 'mean_us': 20},
      {'name': 'loop_add_fusion', 'count': 2, 'total_us': 15, 'mean_us': 7.5},
      {'name': 'gemm_fusion_dot', 'count': 1, 'total_us': 4, 'mean_us': 4}]
  assert summary['lines'] == {'/device:GPU:0 Stream #13(Compute)': 4, '/device:GPU:0 XLA Ops': 1}


def test_a_trace_without_a_device_has_no_kernels():
  summary = trace_summary.summarize_events(_METADATA[:1] + _METADATA[2:3] + _EVENTS[-2:])
  assert (summary['kernels'], summary['busy_us'], summary['span_us']) == (0, 0.0, 0.0)
  assert summary['top_kernels'] == [] and summary['lines'] == {}


def test_summarize_reads_the_newest_trace_below_a_directory_as_benchmark_asks(tmp_path):
  for age, (run, events) in enumerate((('2026_01_01', _METADATA), ('2026_01_02', _EVENTS))):
    path = tmp_path / 'plugins' / 'profile' / run / 'perfetto_trace.json.gz'
    _write_trace(path, events)
    os.utime(path, (1e9 + age, 1e9 + age))
  summary = trace_summary.summarize(str(tmp_path))
  assert summary['kernels'] == 4 and summary['file'].endswith(
      os.path.join('2026_01_02', 'perfetto_trace.json.gz'))


def test_the_command_summarises_every_trace_below_a_directory_and_one_file_alone(tmp_path,
                                                                                 capsys):
  # benchmark.py --trace DIR: one subfolder per figure, the profiler's folders below each.
  relative = {figure: os.path.join(figure, 'plugins', 'profile', '2026_01_01',
                                   'perfetto_trace.json.gz') for figure in ('b1', 'b8')}
  _write_trace(tmp_path / relative['b1'], _EVENTS)
  _write_trace(tmp_path / relative['b8'], _METADATA)
  summaries = trace_summary.main([str(tmp_path)])
  assert {name: s['kernels'] for name, s in summaries.items()} == {relative['b1']: 4,
                                                                   relative['b8']: 0}
  assert json.loads(capsys.readouterr().out) == summaries
  assert trace_summary.main([str(tmp_path / relative['b1'])])['kernels'] == 4


def test_a_directory_without_a_trace_is_named(tmp_path):
  with pytest.raises(FileNotFoundError, match=str(tmp_path)):
    trace_summary.summarize(str(tmp_path))


@pytest.mark.parametrize('name, message', [
    ('nope', 'nope: no such file or directory'),
    ('README.md', 'README.md: not a perfetto trace (gzipped JSON, such as '
     "perfetto_trace.json.gz): Not a gzipped file (b'# ')"),
])
def test_a_missing_path_or_a_file_that_is_no_trace_is_one_message(name, message):
  proc = subprocess.run([sys.executable, os.path.join(REPO, 'scripts', 'trace_summary.py'),
                         name], cwd=REPO, capture_output=True, text=True, timeout=60)
  assert proc.returncode == 1
  assert proc.stderr.strip() == f'error: trace_summary: {message}'


def test_a_gzipped_file_that_is_not_json_is_named(tmp_path):
  path = tmp_path / 'trace.json.gz'
  with gzip.open(path, 'wt') as f:
    f.write('not json')
  with pytest.raises(InputError, match=rf'{path}: not a perfetto trace'):
    trace_summary.summarize(str(path))
