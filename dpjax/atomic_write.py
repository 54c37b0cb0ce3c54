"""Atomic file writes: a temp file in the target's folder, then a rename.

A crash or kill mid-write leaves the previous file (or none), never a partial one.
"""

import json
import os
import tempfile
from typing import Any


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  path = os.fspath(path)
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=f'.{os.path.basename(path)}.', suffix='.tmp')
  try:
    with os.fdopen(fd, 'w', encoding='utf-8') as f:
      f.write(text)
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
  write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
