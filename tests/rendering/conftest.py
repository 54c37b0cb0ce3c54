"""Tests that render robosuite in the test process itself run here, in their own pytest process.

MuJoCo's software (Mesa llvmpipe) rendering segfaults in a process that has loaded TensorFlow,
and the other test modules import it at collection. `make test` therefore runs this folder
first, as a separate `pytest` invocation; the main invocation ignores it.
"""

import sys

import pytest


@pytest.fixture(autouse=True)
def _no_tensorflow_in_this_process():
  if 'tensorflow' in sys.modules:
    pytest.fail('tests/rendering must run in a pytest process without TensorFlow (MuJoCo '
                'rendering crashes next to it): run `pytest tests/rendering` on its own, as '
                '`make test` does')
