"""Run metrics to TensorBoard (tensorboardX) and `metrics.jsonl` in the workdir.

Each `write` is one JSON line `{"step": s, "name": value, ...}` (names like 'train/loss',
'val/loss', 'rollout/success_rate') and the same scalars as TensorBoard summaries. Only process 0
writes; the others get a writer that does nothing, so the loop needs no branches.
"""

import json
import math
import os
import time
from typing import Mapping

import numpy as np
import tensorboardX

METRICS_FILE = 'metrics.jsonl'
TENSORBOARD_DIR = 'tensorboard'


class MetricWriter:
  """Appends scalars to `<workdir>/metrics.jsonl` and `<workdir>/tensorboard/`."""

  def __init__(self, workdir: str | os.PathLike, *, enabled: bool = True):
    self._enabled = enabled
    if not enabled:
      return
    os.makedirs(workdir, exist_ok=True)
    self._jsonl = open(os.path.join(workdir, METRICS_FILE), 'a', encoding='utf-8')
    self._tb = tensorboardX.SummaryWriter(os.path.join(workdir, TENSORBOARD_DIR))

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


def read_metrics(workdir: str | os.PathLike) -> list[dict]:
  """All records of `<workdir>/metrics.jsonl`, in order (for tests and notebooks)."""
  path = os.path.join(workdir, METRICS_FILE)
  with open(path, encoding='utf-8') as f:
    return [json.loads(line) for line in f if line.strip()]
