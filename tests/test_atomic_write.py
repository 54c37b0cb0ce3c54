"""Atomic writes: all or nothing, with the permissions of any file the user creates."""

import os
import stat

import pytest

from dpjax.atomic_write import atomic_path, write_json_atomic


def test_written_files_follow_the_umask(tmp_path):
  old_umask = os.umask(0o022)
  try:
    write_json_atomic(tmp_path / 'a.json', {'x': 1})
  finally:
    os.umask(old_umask)
  assert stat.S_IMODE(os.stat(tmp_path / 'a.json').st_mode) == 0o644


def test_a_failed_write_leaves_the_previous_file_and_no_temporary(tmp_path):
  path = tmp_path / 'a.txt'
  path.write_text('previous')
  with pytest.raises(RuntimeError, match='stopped'):
    with atomic_path(path) as tmp:
      with open(tmp, 'w', encoding='utf-8') as f:
        f.write('half')
      raise RuntimeError('stopped')
  assert path.read_text() == 'previous'
  assert os.listdir(tmp_path) == ['a.txt']


def test_a_folder_is_refused_before_the_block_runs(tmp_path):
  with pytest.raises(IsADirectoryError, match='is a folder; expected the path of a file'):
    with atomic_path(tmp_path):
      pytest.fail('the block ran')
