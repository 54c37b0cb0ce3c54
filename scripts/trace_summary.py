"""What a device did during a profiled call: kernels, busy and idle time, the costliest kernels.

    python scripts/trace_summary.py TRACE_FILE  # one perfetto_trace.json.gz → its summary
    python scripts/trace_summary.py TRACE_DIR   # every one below → {relative path: summary}

`scripts/benchmark.py --trace DIR` traces one call of each `predict_action` figure with
`jax.profiler.trace(DIR/<figure>, create_perfetto_trace=True)` and stores the summary of the
newest trace below DIR/<figure> in the figure; given DIR itself, this script summarises them all.
Batch-1 sampling on a GPU is bound by how its ≈ 4,000–14,000 small kernels follow each other,
not by their arithmetic (docs/performance.md): a call's time splits into the kernels' own
durations (`busy_us`) and the gaps between them (`idle_us`, launch and dependency latency), which
is what decides between fewer kernels and faster ones.

Kernel events are those on a device's stream lines (processes named `/device:GPU:0` and the like,
threads named `Stream #…`, as JAX's profiler exports CUPTI's records); `lines` lists every
device line seen with its event count, so a trace whose lines are named otherwise still says
what it holds. A CPU trace has no device process: its summary has zero kernels.
"""

import argparse
import collections
import glob
import gzip
import json
import os
import re
import sys
import zlib
from typing import Any, Iterable

# Runnable as a plain script from a checkout: the package lives one directory up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable-next=g-import-not-at-top,wrong-import-position
from dpjax.errors import InputError, report_user_errors

TOP_KERNELS = 15
_DEVICE_PROCESS = re.compile(r'^/device:')
_STREAM_LINE = re.compile(r'^Stream\b')


def _traces_below(directory: str) -> list[str]:
  """Every perfetto_trace.json.gz below `directory`, sorted by path; at least one."""
  if not os.path.exists(directory):
    raise FileNotFoundError(f'trace_summary: {directory}: no such file or directory')
  found = glob.glob(os.path.join(directory, '**', 'perfetto_trace.json.gz'), recursive=True)
  if not found:
    raise FileNotFoundError(f'trace_summary: no perfetto_trace.json.gz below {directory} (made '
                            'by jax.profiler.trace(..., create_perfetto_trace=True))')
  return sorted(found)


def find_trace(path: str) -> str:
  """`path` itself if it is a file, else the newest perfetto_trace.json.gz below it."""
  if os.path.isfile(path):
    return path
  return max(_traces_below(path), key=os.path.getmtime)


def _union_us(intervals: Iterable[tuple[float, float]]) -> float:
  """Total length of the union of [start, end) intervals."""
  total, current_start, current_end = 0.0, None, None
  for start, end in sorted(intervals):
    if current_end is None or start > current_end:
      if current_end is not None:
        total += current_end - current_start
      current_start, current_end = start, end
    else:
      current_end = max(current_end, end)
  if current_end is not None:
    total += current_end - current_start
  return total


def _kernel_name(name: str) -> str:
  """A kernel's name without the numbered suffix XLA gives each copy (`loop_add_fusion.12`)."""
  return re.sub(r'(\.\d+)+$', '', name)


def summarize_events(events: list[dict[str, Any]]) -> dict[str, Any]:
  """Trace-event-format events (perfetto JSON's traceEvents) → the device's kernel summary."""
  process_names, thread_names = {}, {}
  for event in events:
    if event.get('ph') == 'M' and event.get('name') == 'process_name':
      process_names[event.get('pid')] = event.get('args', {}).get('name', '')
    elif event.get('ph') == 'M' and event.get('name') == 'thread_name':
      thread_names[(event.get('pid'), event.get('tid'))] = event.get('args', {}).get('name', '')
  device_pids = {pid for pid, name in process_names.items() if _DEVICE_PROCESS.match(name)}
  complete = [e for e in events if e.get('ph') == 'X' and e.get('pid') in device_pids and
              'dur' in e]
  line_of = lambda e: (f"{process_names[e['pid']]} "
                       f"{thread_names.get((e['pid'], e.get('tid')), e.get('tid'))}")
  lines = collections.Counter(line_of(e) for e in complete)
  kernels = [e for e in complete
             if _STREAM_LINE.match(str(thread_names.get((e['pid'], e.get('tid')), '')))]
  intervals = [(float(e['ts']), float(e['ts']) + float(e['dur'])) for e in kernels]
  busy_us = _union_us(intervals)
  span_us = (max(end for _, end in intervals) - min(start for start, _ in intervals)
             if intervals else 0.0)
  by_name = collections.defaultdict(list)
  for event in kernels:
    by_name[_kernel_name(str(event.get('name', '')))].append(float(event['dur']))
  top = sorted(by_name.items(), key=lambda item: -sum(item[1]))[:TOP_KERNELS]
  return {
      'kernels': len(kernels),
      'kernel_us': sum(float(e['dur']) for e in kernels),
      'span_us': span_us,
      'busy_us': busy_us,
      'idle_us': span_us - busy_us,
      'top_kernels': [{'name': name, 'count': len(durations), 'total_us': sum(durations),
                       'mean_us': sum(durations) / len(durations)} for name, durations in top],
      'lines': dict(lines.most_common()),
  }


def summarize(path: str) -> dict[str, Any]:
  """The kernel summary of a perfetto_trace.json.gz (or the newest one below a directory)."""
  trace_file = find_trace(path)
  try:
    with gzip.open(trace_file, 'rt') as f:
      trace = json.load(f)
  # Not gzip, cut short, corrupt, not text, not JSON.
  except (gzip.BadGzipFile, EOFError, zlib.error, ValueError) as e:
    raise InputError(f'trace_summary: {trace_file}: not a perfetto trace (gzipped JSON, such as '
                     f'perfetto_trace.json.gz): {e}') from None
  events = trace.get('traceEvents', []) if isinstance(trace, dict) else trace
  return dict(summarize_events([e for e in events if isinstance(e, dict)]), file=trace_file)


def summarize_tree(directory: str) -> dict[str, dict[str, Any]]:
  """The summary of every perfetto_trace.json.gz below `directory` (such as the root folder of
  `benchmark.py --trace DIR`, one subfolder per figure), keyed by its path relative to it."""
  return {os.path.relpath(path, directory): summarize(path)
          for path in _traces_below(directory)}


def main(argv=None) -> dict[str, Any]:
  parser = argparse.ArgumentParser(description=__doc__.split('\n')[0])
  parser.add_argument('path', help='a perfetto_trace.json.gz: its summary; a directory: '
                      'the summary of every one below it, keyed by its relative path')
  path = parser.parse_args(argv).path
  summary = summarize_tree(path) if os.path.isdir(path) else summarize(path)
  print(json.dumps(summary, indent=2))
  return summary


if __name__ == '__main__':
  report_user_errors(main)()
