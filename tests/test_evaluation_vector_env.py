"""Worker-process vector env on a fake env: parallel results, crashes, no orphan processes."""

import functools
import os
import signal
import subprocess
import sys
import textwrap
import time

import numpy as np
import pytest

from dpjax.evaluation.multistep import MultiStepWrapper
from dpjax.evaluation.vector_env import StepResult, VectorEnv, WorkerCrash, WrapperSpec

RAISE_SEED = 13
DIE_SEED = 17


class FakeEnv:
  """obs: the reset seed, the step count and the worker's pid. Succeeds at step seed % 5 + 2.

  Stepping an episode reset from RAISE_SEED raises; from DIE_SEED the process dies outright.
  """

  def __init__(self, step_sleep_s=0.0):
    self.step_sleep_s = step_sleep_s
    self.seed = 0
    self.t = 0

  def _obs(self):
    return {'seed': np.array([self.seed], np.float64), 'count': np.array([self.t], np.float64),
            'pid': np.array([os.getpid()])}

  def reset(self, seed=None):
    self.seed, self.t = seed, 0
    return self._obs()

  def reset_to_state(self, state):
    return self.reset(seed=int(state[0]))

  def step(self, action):
    if self.seed == RAISE_SEED:
      raise RuntimeError('fake env failure')
    if self.seed == DIE_SEED:
      os._exit(3)
    time.sleep(self.step_sleep_s)
    self.t += 1
    return self._obs(), float(self.is_success()), False, {}

  def is_success(self):
    return self.t >= self.seed % 5 + 2


SPEC = WrapperSpec(n_obs_steps=2, n_action_steps=2, max_steps=6)


def _alive(pid):
  """True unless the process is gone or a zombie."""
  try:
    with open(f'/proc/{pid}/stat', encoding='utf-8') as f:
      return f.read().rsplit(')', 1)[1].split()[0] != 'Z'
  except FileNotFoundError:
    return False


def _step(slot_count):
  return {s: ('step', np.zeros((2, 7), np.float32)) for s in range(slot_count)}


def test_workers_match_the_in_process_wrapper():
  with VectorEnv(FakeEnv, 2, SPEC, headless_rendering=False) as vec:
    replies = vec.run({0: ('reset', (3, None, ())), 1: ('reset', (4, None, ()))})
    serial = {}
    for slot, seed in ((0, 3), (1, 4)):
      serial[slot] = MultiStepWrapper(FakeEnv(), 2, 2, 6)
      expected = serial[slot].reset(seed=seed)
      np.testing.assert_array_equal(replies[slot]['count'], expected['count'])
    assert replies[0]['pid'][0, 0] != replies[1]['pid'][0, 0] != os.getpid()
    for _ in range(2):
      replies = vec.run(_step(2))
      for slot in (0, 1):
        obs, reward, done, info = serial[slot].step(np.zeros((2, 7), np.float32))
        reply = replies[slot]
        assert isinstance(reply, StepResult)
        np.testing.assert_array_equal(reply.obs['count'], obs['count'])
        assert (reply.reward, reply.done, reply.success, reply.steps) == (
            reward, done, info['success'], info['steps'])
    pids = vec.worker_pids()
  assert not any(_alive(p) for p in pids)


@pytest.mark.parametrize('bad_seed,expected', [(RAISE_SEED, 'fake env failure'),
                                               (DIE_SEED, 'exit code 3')])
def test_crashed_worker_is_reported_restarted_and_others_go_on(bad_seed, expected):
  with VectorEnv(FakeEnv, 2, SPEC, headless_rendering=False) as vec:
    vec.run({0: ('reset', (bad_seed, None, ())), 1: ('reset', (1, None, ()))})
    replies = vec.run(_step(2))
    assert isinstance(replies[0], WorkerCrash) and expected in replies[0].reason
    assert isinstance(replies[1], StepResult) and replies[1].steps == 2
    # The crashed slot comes back with a fresh worker on its next command.
    replies = vec.run({0: ('reset', (2, None, ())), 1: ('step', np.zeros((2, 7)))})
    assert replies[0]['count'][-1, 0] == 0 and replies[1].steps == 3
    assert vec.live_slots == [0, 1]


def test_a_slot_that_keeps_crashing_is_retired():
  with VectorEnv(FakeEnv, 1, SPEC, headless_rendering=False) as vec:
    for attempt in range(3):
      assert vec.live_slots == [0], attempt
      vec.run({0: ('reset', (DIE_SEED, None, ()))})
      assert isinstance(vec.run(_step(1))[0], WorkerCrash)
    assert vec.live_slots == [] and vec.retired == {0}
    with pytest.raises(ValueError, match='slot 0 is not live'):
      vec.run(_step(1))


def test_factory_failure_stops_with_the_traceback():
  with pytest.raises(RuntimeError, match=r'could not build its env(.|\n)*TypeError'):
    VectorEnv(functools.partial(FakeEnv, no_such_argument=1), 1, SPEC,
              headless_rendering=False)


def test_exception_in_the_parent_leaves_no_workers():
  with pytest.raises(KeyError):
    with VectorEnv(FakeEnv, 2, SPEC, headless_rendering=False) as vec:
      pids = vec.worker_pids()
      assert len(pids) == 2 and all(_alive(p) for p in pids)
      raise KeyError('parent failure')
  assert not any(_alive(p) for p in pids)


def test_ctrl_c_leaves_no_orphans(tmp_path):
  script = tmp_path / 'evaluate_forever.py'
  script.write_text(textwrap.dedent('''
      import functools, signal, sys
      import numpy as np
      from dpjax.evaluation.vector_env import VectorEnv, WrapperSpec
      from test_evaluation_vector_env import FakeEnv
      if __name__ == '__main__':
        # As in a terminal's foreground: a suite started as a background job (`make test &`)
        # hands its children SIGINT ignored, and Python then installs no handler for it.
        signal.signal(signal.SIGINT, signal.default_int_handler)
        # Episodes that never end (no success stop, no step limit in reach): the parent is
        # stepping live workers when the interrupt comes, not restarting crashed ones.
        spec = WrapperSpec(n_obs_steps=1, n_action_steps=1, max_steps=10**9,
                           terminate_on_success=False)
        with VectorEnv(functools.partial(FakeEnv, step_sleep_s=0.01), 2, spec,
                       headless_rendering=False) as vec:
          vec.run({0: ('reset', (0, None, ())), 1: ('reset', (1, None, ()))})
          print(*vec.worker_pids(), flush=True)
          while True:
            vec.run({s: ('step', np.zeros((1, 7))) for s in (0, 1)})
  '''))
  tests_dir = os.path.dirname(os.path.abspath(__file__))
  env = dict(os.environ, PYTHONPATH=os.pathsep.join(
      [os.path.dirname(tests_dir), tests_dir, os.environ.get('PYTHONPATH', '')]))
  process = subprocess.Popen([sys.executable, str(script)], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=env)
  try:
    pids = [int(p) for p in process.stdout.readline().split()]
    assert len(pids) == 2 and all(_alive(p) for p in pids), process.stderr.read()
    time.sleep(0.3)  # Inside the stepping loop.
    process.send_signal(signal.SIGINT)
    _, stderr = process.communicate(timeout=30)
  finally:
    if process.poll() is None:
      process.kill()
  assert 'KeyboardInterrupt' in stderr
  deadline = time.monotonic() + 5
  while any(_alive(p) for p in pids) and time.monotonic() < deadline:
    time.sleep(0.05)
  assert not any(_alive(p) for p in pids)
