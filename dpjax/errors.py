"""Errors that stop a run with a message saying all a user needs, and how commands print them.

A `UserFacingError` names the file, flag, config field or value at fault and what was expected;
its traceback would add nothing but noise, so `launch.py` and the scripts print its message
alone (`report_user_errors`), as they do for a missing, existing or unwritable path (the OS
errors, whose messages name the path). Any other exception keeps its traceback: it is a bug to
report.
"""

import functools
import signal
import sys
from collections.abc import Callable
from typing import TypeVar

T = TypeVar('T')


class UserFacingError(Exception):
  """An expected stop: bad input, or a run that cannot go on (a diverged loss)."""


class InputError(UserFacingError, ValueError):
  """Bad input: a config value, a command-line flag, a file's contents."""


_PATH_ERRORS = (FileNotFoundError, FileExistsError, IsADirectoryError, NotADirectoryError,
                PermissionError)


def root_cause(error: BaseException) -> str:
  """The innermost exception of `error`'s chain, in one line: libraries such as orbax wrap a
  precise message ("Error reading <array> ...: Requested byte range ...") in generic ones."""
  while (error.__cause__ or error.__context__) is not None:
    error = error.__cause__ or error.__context__
  lines = str(error).strip().splitlines()
  return f'{type(error).__name__}: {lines[0][:300] if lines else "no message"}'


def _exit(signum: int, _) -> None:
  raise SystemExit(128 + signum)


def report_user_errors(main: Callable[..., T]) -> Callable[..., T]:
  """`main` for a command line: a `UserFacingError` or a path error becomes its message on
  stderr and exit status 1 instead of a traceback. SIGTERM (a scheduler's or `timeout`'s stop)
  exits as Ctrl-C does, through the `finally` blocks: temporary files are removed, checkpoint
  writes finish."""

  @functools.wraps(main)
  def wrapped(*args, **kwargs):
    previous = signal.signal(signal.SIGTERM, _exit)
    try:
      return main(*args, **kwargs)
    except (UserFacingError, *_PATH_ERRORS) as e:
      print(f'error: {e}', file=sys.stderr, flush=True)
      sys.exit(1)
    finally:
      signal.signal(signal.SIGTERM, previous)

  return wrapped
