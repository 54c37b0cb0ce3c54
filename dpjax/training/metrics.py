"""Run metrics to TensorBoard (tensorboardX) and `metrics.jsonl` in the workdir.

Each `write` is one JSON line `{"step": s, "time": t, "name": value, ...}` (names like
'train/loss', 'epoch/val_loss', 'rollout/test/success_rate') and the same scalars as TensorBoard
summaries. Only process 0 writes; the others get a writer that does nothing, so the loop needs no
branches. A resumed run appends to the same file, after dropping what the run before it wrote
past the checkpoint it resumes from (it measures those steps again).
"""

import json
import math
import os
import time
from typing import Mapping

import numpy as np
import tensorboardX
from absl import logging

from dpjax.atomic_write import write_text_atomic

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """Appends scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True,
               start_step: int | None = None):
    """`start_step`: the step training starts from (0, or a resumed checkpoint's); records of
    later steps, written by a run killed after its last checkpoint, are dropped from both
    outputs. None: everything there is kept."""
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    path = os.path.join(workdir, METRICS_FILE)
    if start_step is not None and os.path.exists(path):
      _drop_records_after(path, start_step)
    self._jsonl = open(path, 'a', encoding='utf-8')
    if _ends_mid_line(path):  # A run killed while writing: its last record stays on its own.
      self._jsonl.write('\n')
    # TensorBoard hides the earlier events from purge_step on.
    self._tb = tensorboardX.SummaryWriter(
        os.path.join(workdir, TENSORBOARD_DIR),
        purge_step=None if start_step is None else start_step + 1)

  def write(self, step: int, scalars: Mapping[str, float]) -> None:
    """Records `scalars` at `step`; non-finite values are written as JSON null."""
    if not self._enabled or not scalars:
      return
    values = {name: float(np.asarray(v)) for name, v in scalars.items()}
    record = {'step': int(step), 'time': round(time.time(), 3)}
    record.update({k: (v if math.isfinite(v) else None) for k, v in values.items()})
    self._jsonl.write(json.dumps(record) + '\n')
    self._jsonl.flush()
    for name, value in values.items():
      self._tb.add_scalar(name, value, int(step))

  def flush(self) -> None:
    if self._enabled:
      self._jsonl.flush()
      self._tb.flush()

  def close(self) -> None:
    if self._enabled:
      self._jsonl.close()
      self._tb.close()
      self._enabled = False


def _drop_records_after(path: str, step: int) -> None:
  with open(path, encoding='utf-8', errors='replace') as f:
    lines = f.readlines()
  records = [_parse_record(line) for line in lines]
  # A line that is no record stays: `read_metrics` reports it.
  kept = [line for line, record in zip(lines, records) if record is None or record['step'] <= step]
  if len(kept) < len(lines):
    logging.info('%s: %d records past step %d (after the checkpoint resumed from) dropped',
                 path, len(lines) - len(kept), step)
    write_text_atomic(path, ''.join(kept))


def _parse_record(line: str) -> dict | None:
  """The metrics record on `line`, or None if it is none (e.g. cut short by a kill)."""
  try:
    record = json.loads(line)
  except ValueError:
    return None
  return record if isinstance(record, dict) and isinstance(record.get('step'), int) else None


def _ends_mid_line(path: str) -> bool:
  with open(path, 'rb') as f:
    if f.seek(0, os.SEEK_END) == 0:
      return False
    f.seek(-1, os.SEEK_END)
    return f.read(1) != b'\n'


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`, in order.

  A line that is not a JSON record (cut short by a run killed while writing it) is skipped with a
  warning naming it.
  """
  path = os.path.join(workdir, METRICS_FILE)
  records = []
  with open(path, encoding='utf-8', errors='replace') as f:
    for number, line in enumerate(f, start=1):
      if not line.strip():
        continue
      record = _parse_record(line)
      if record is not None:
        records.append(record)
      else:
        logging.warning('%s line %d is not a metrics record; skipped: %.80r', path, number, line)
  return records
