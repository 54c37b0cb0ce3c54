"""Commands print a user-facing error as one message; anything else keeps its traceback."""

import os
import signal
import subprocess
import sys

import pytest

from dpjax.atomic_write import temporary_files
from dpjax.errors import InputError, report_user_errors

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _raising(error):
  def main():
    raise error
  return report_user_errors(main)


@pytest.mark.parametrize('error', [InputError('config.seed=-1: must be >= 0'),
                                   FileNotFoundError('runs/x: no such policy export')])
def test_user_errors_become_one_message_and_status_1(error, capsys):
  with pytest.raises(SystemExit) as exit_info:
    _raising(error)()
  assert exit_info.value.code == 1
  assert capsys.readouterr().err == f'error: {error}\n'


def test_other_errors_keep_their_traceback():
  with pytest.raises(ZeroDivisionError):
    _raising(ZeroDivisionError('a bug'))()


def test_a_script_reports_bad_input_without_a_traceback(tmp_path):
  (tmp_path / 'a_file').write_text('')
  run = subprocess.run(
      [sys.executable, os.path.join(REPO, 'scripts', 'eval.py'), '--policy', 'expert',
       '--no_cameras', '--output_dir', str(tmp_path / 'a_file' / 'eval')],
      cwd=tmp_path, capture_output=True, text=True, timeout=300, check=False)
  assert run.returncode == 1
  assert 'Traceback' not in run.stderr
  assert run.stderr.strip().splitlines()[-1] == (
      f"error: [Errno 20] Not a directory: '{tmp_path}/a_file/eval'")


_WRITER = """
import sys, time
from dpjax.atomic_write import atomic_path
from dpjax.errors import report_user_errors

def main():
  with atomic_path(sys.argv[1]) as tmp:
    open(tmp, 'w').write('half of it')
    print('writing', flush=True)
    time.sleep(60)

report_user_errors(main)()
"""


def test_sigterm_stops_a_command_through_its_cleanup(tmp_path):
  target = tmp_path / 'demos.hdf5'
  proc = subprocess.Popen([sys.executable, '-c', _WRITER, str(target)], cwd=REPO,
                          env=dict(os.environ, PYTHONPATH=REPO), stdout=subprocess.PIPE,
                          text=True)
  try:
    assert proc.stdout.readline() == 'writing\n'
    assert len(temporary_files(target)) == 1
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(timeout=30) == 128 + signal.SIGTERM
  finally:
    proc.kill()
  assert not target.exists() and temporary_files(target) == []
