"""Suite-wide settings, applied before any test imports jax or robosuite.

* A persistent XLA compilation cache shared by the test process and the subprocesses it starts
  (launch.py, multi-device and multi-process runs): the same small programs are compiled by
  several tests, and compiling is most of their cost on a 2-core machine.
* Headless MuJoCo rendering through EGL unless the caller chose a backend.
* orbax's late errors after a damaged checkpoint's failed read are not test warnings.
"""

import os
import tempfile

os.environ.setdefault('JAX_COMPILATION_CACHE_DIR',
                      os.path.join(tempfile.gettempdir(), 'dpjax-test-xla-cache'))
os.environ.setdefault('JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS', '0.5')
os.environ.setdefault('MUJOCO_GL', 'egl')
os.environ.setdefault('TF_CPP_MIN_LOG_LEVEL', '2')


def pytest_configure(config):
  # orbax reads a damaged checkpoint's arrays concurrently: after the first failure (what the
  # tests of damaged checkpoints assert on), its other reads end whenever they are collected,
  # often during a later test, as "unraisable" exceptions in orbax's coroutines and callbacks.
  for message in ('(?s).*_read_array_index_and_device_put', '(?s).*Event loop is closed'):
    config.addinivalue_line('filterwarnings',
                            f'ignore:{message}:pytest.PytestUnraisableExceptionWarning')
