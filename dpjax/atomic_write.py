"""Atomic file writes: a temp file in the target's folder, then a rename.

A crash or kill mid-write leaves the previous file (or none), never a partial one.
"""

import contextlib
import glob
import json
import os
import tempfile
from collections.abc import Iterator
from typing import Any


def _process_umask() -> int:
  umask = os.umask(0)
  os.umask(umask)
  return umask


_SUFFIX = '.tmp'


def _prefix(path: str) -> str:
  return f'.{os.path.basename(path)}.'


def temporary_files(path: str | os.PathLike[str]) -> list[str]:
  """The temporary files of writes of `path` in progress, or left by processes killed while
  writing it."""
  path = os.fspath(path)
  folder = os.path.dirname(os.path.abspath(path))
  return glob.glob(os.path.join(glob.escape(folder), glob.escape(_prefix(path)) + '*' + _SUFFIX))


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike[str]) -> Iterator[str]:
  """Yields a temporary path to write `path`'s new content to; it becomes `path` when the block
  ends without an exception, and is removed otherwise.

  Fails before the block runs if `path` is a folder, so that long work writing the file (demo
  generation) is not lost at the end.
  """
  path = os.fspath(path)
  if os.path.isdir(path):
    raise IsADirectoryError(f'{path}: is a folder; expected the path of a file to write')
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=_prefix(path), suffix=_SUFFIX)
  os.close(fd)
  # mkstemp creates the file readable by its owner only; the result should have the permissions
  # of any file this user creates (an exported policy read by another account, say).
  os.chmod(tmp, 0o666 & ~_process_umask())
  try:
    yield tmp
    os.replace(tmp, path)
  finally:
    if os.path.exists(tmp):
      os.remove(tmp)


def write_text_atomic(path: str | os.PathLike[str], text: str) -> None:
  with atomic_path(path) as tmp, open(tmp, 'w', encoding='utf-8') as f:
    f.write(text)


def write_json_atomic(path: str | os.PathLike[str], data: Any) -> None:
  write_text_atomic(path, json.dumps(data, indent=2, sort_keys=True))
