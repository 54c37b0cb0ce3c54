"""Chooses a headless OpenGL backend for MuJoCo before mujoco/robosuite are imported.

robosuite and mujoco read `MUJOCO_GL` once, at import time, so the choice must be made first:
every module that imports robosuite calls `configure_headless_rendering()` before doing so.
EGL (Mesa llvmpipe or a GPU) is preferred; OSMesa is the fallback. Each candidate is probed by
creating a tiny GL context in a child process, because a failed attempt can leave the current
process's GL state unusable.
"""

import ctypes.util
import os
import subprocess
import sys

# Backend -> (extra environment, shared library it needs, Debian packages providing it).
_BACKENDS = (
    ('egl', {'MUJOCO_GL': 'egl', 'PYOPENGL_PLATFORM': 'egl'}, 'EGL', 'libegl1 libegl-mesa0'),
    ('osmesa', {'MUJOCO_GL': 'osmesa', 'PYOPENGL_PLATFORM': 'osmesa'}, 'OSMesa', 'libosmesa6'),
)

_PROBE = ('import mujoco\n'
          'ctx = mujoco.GLContext(8, 8)\n'
          'ctx.make_current()\n'
          'ctx.free()\n')

_PROBE_TIMEOUT_S = 60


def _probe(env_vars: dict[str, str]) -> str | None:
  """Returns None if a GL context can be created with `env_vars`, else the failure text."""
  env = dict(os.environ, **env_vars)
  try:
    result = subprocess.run([sys.executable, '-c', _PROBE], env=env, capture_output=True,
                            text=True, timeout=_PROBE_TIMEOUT_S, check=False)
  except subprocess.TimeoutExpired:
    return f'timed out after {_PROBE_TIMEOUT_S} s'
  if result.returncode == 0:
    return None
  lines = result.stderr.strip().splitlines()
  return lines[-1] if lines else f'exit status {result.returncode}'


def configure_headless_rendering() -> str:
  """Sets `MUJOCO_GL` (and `PYOPENGL_PLATFORM`) to a working backend and returns its name.

  Idempotent; an existing `MUJOCO_GL` is respected (children started with `spawn` inherit
  the choice, so only the first process pays for the probe).

  Raises:
    RuntimeError: neither EGL nor OSMesa can create a context; names the missing library and
      the apt packages that provide it.
  """
  chosen = os.environ.get('MUJOCO_GL')
  if chosen:
    return chosen
  failures = []
  for name, env_vars, library, packages in _BACKENDS:
    if ctypes.util.find_library(library) is None:
      failures.append(f'{name}: system library lib{library} not found '
                      f'(install with: apt-get install {packages})')
      continue
    error = _probe(env_vars)
    if error is None:
      os.environ.update(env_vars)
      return name
    failures.append(f'{name}: creating a GL context failed: {error} '
                    f'(packages: {packages})')
  raise RuntimeError('No headless OpenGL backend for MuJoCo works; tried\n  ' +
                     '\n  '.join(failures) +
                     '\nOr set MUJOCO_GL yourself to a backend that works on this machine.')
