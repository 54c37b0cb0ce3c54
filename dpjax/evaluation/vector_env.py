"""N environments, each wrapped in `MultiStepWrapper`, stepping in parallel worker processes.

Workers are started with `spawn` (EGL contexts do not survive `fork`) and talk to the parent
over pipes: the parent sends one command per slot, all workers work at once, then the parent
collects the replies. A worker that raises or dies is reported as a `WorkerCrash` for that slot
and restarted on its next command; the other slots are unaffected. Workers ignore SIGINT (a
Ctrl-C in a terminal reaches the whole process group): the parent decides, and `close()` (run by
`with`, and by a finalizer at interpreter exit) terminates them. A worker whose parent died
sees its pipe close and exits.

This module must stay light to import: every spawned worker imports it (no jax here).
"""

import dataclasses
import multiprocessing
import multiprocessing.connection
import os
import signal
import time
import traceback
import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import numpy as np

from dpjax.envs.rendering import configure_headless_rendering
from dpjax.evaluation.multistep import MultiStepWrapper

# A slot whose worker crashes this many times with no successful env step in between is
# retired: restarting it again would only repeat the crash.
MAX_CONSECUTIVE_CRASHES = 3
_CLOSE_GRACE_S = 2.0


def default_num_envs() -> int:
  """One env per CPU core this process may use."""
  if hasattr(os, 'sched_getaffinity'):
    return max(1, len(os.sched_getaffinity(0)))
  return max(1, os.cpu_count() or 1)


@dataclasses.dataclass(frozen=True)
class WrapperSpec:
  """`MultiStepWrapper` arguments, sent to every worker."""
  n_obs_steps: int
  n_action_steps: int
  max_steps: int
  terminate_on_success: bool = True
  obs_keys: tuple[str, ...] | None = None
  skip_unused_renders: bool = True


@dataclasses.dataclass(frozen=True)
class LiftEnvFactory:
  """Picklable factory of the evaluation env: `make_lift_env` with these arguments."""
  image_size: int = 84
  horizon: int = 400
  use_cameras: bool = True

  def __call__(self):
    # Imported here, in the worker, after MUJOCO_GL is set: the parent never loads robosuite.
    from dpjax.envs.lift import make_lift_env  # pylint: disable=g-import-not-at-top
    return make_lift_env(image_size=self.image_size, horizon=self.horizon,
                         use_cameras=self.use_cameras)


@dataclasses.dataclass(frozen=True)
class WorkerCrash:
  """A worker raised or died while serving a command for `slot`; `reason` says how."""
  slot: int
  reason: str


@dataclasses.dataclass(frozen=True)
class StepResult:
  """Reply to a step command; `recorded` holds the episode's frames when it was recorded and is
  over (see `MultiStepWrapper.recorded`), else None."""
  obs: dict[str, np.ndarray]
  reward: float
  done: bool
  success: bool
  steps: int
  recorded: list[dict[str, np.ndarray]] | None


def _worker(conn, env_factory: Callable[[], Any], spec: WrapperSpec,
            headless_rendering: bool) -> None:
  """Worker main loop: builds the env, then serves commands until 'close' or the pipe closes."""
  signal.signal(signal.SIGINT, signal.SIG_IGN)
  env = None
  try:
    if headless_rendering:
      # Before the factory imports robosuite: MuJoCo reads MUJOCO_GL once, at import.
      configure_headless_rendering()
    env = env_factory()
    wrapper = MultiStepWrapper(env, spec.n_obs_steps, spec.n_action_steps, spec.max_steps,
                               spec.terminate_on_success, spec.obs_keys,
                               spec.skip_unused_renders)
    conn.send(('ok', None))
    while True:
      try:
        command, args = conn.recv()
      except (EOFError, OSError):
        return  # The parent is gone.
      if command == 'close':
        return
      if command == 'reset':
        seed, state, record_keys = args
        if state is None:
          obs = wrapper.reset(seed=seed, record_keys=record_keys)
        else:
          obs = wrapper.reset_to_state(state, record_keys=record_keys)
        conn.send(('ok', obs))
      elif command == 'step':
        obs, reward, done, info = wrapper.step(args)
        recorded = wrapper.recorded if done and wrapper.recorded else None
        conn.send(('ok', StepResult(obs, reward, done, info['success'], info['steps'],
                                    recorded)))
      else:
        raise ValueError(f'vector_env worker: unknown command {command!r}')
  except Exception:  # pylint: disable=broad-except
    # Reported to the parent, which marks the episode crashed; this worker then exits since its
    # env may be in any state.
    try:
      conn.send(('error', traceback.format_exc()))
    except (BrokenPipeError, OSError):
      pass
  finally:
    if env is not None and hasattr(env, 'close'):
      try:
        env.close()
      except Exception:  # pylint: disable=broad-except
        pass  # Closing is best effort; the process exits anyway.
    conn.close()


def _shutdown(processes: list, conns: list) -> None:
  """Stops workers: polite 'close', then terminate, then kill. Safe to call repeatedly."""
  for conn in conns:
    if conn is None:
      continue
    try:
      conn.send(('close', None))
    except (BrokenPipeError, OSError):
      pass
  deadline = time.monotonic() + _CLOSE_GRACE_S
  for process in processes:
    if process is not None:
      process.join(max(0.0, deadline - time.monotonic()))
  for process in processes:
    if process is not None and process.is_alive():
      process.terminate()
      process.join(1.0)
    if process is not None and process.is_alive():
      process.kill()
      process.join()
  for conn in conns:
    if conn is not None:
      conn.close()


class VectorEnv:
  """`num_envs` wrapped envs in worker processes; use as a context manager.

  Commands are given per slot (0 .. num_envs - 1) to `run`, which executes them concurrently and
  returns each slot's reply or a `WorkerCrash`.
  """

  def __init__(self, env_factory: Callable[[], Any], num_envs: int, spec: WrapperSpec, *,
               headless_rendering: bool = True, timeout_s: float = 600.0):
    """Starts the workers and waits until every env is built.

    Args:
      env_factory: picklable callable returning a fresh env (see `MultiStepWrapper`); it runs
        in the worker, after headless rendering is configured.
      num_envs: number of worker processes.
      spec: the multi-step wrapper arguments.
      headless_rendering: configure MuJoCo's headless GL backend first (off for fake envs).
      timeout_s: a worker that takes longer than this for one command counts as crashed.

    Raises:
      RuntimeError: a worker could not build its env (with the worker's traceback).
    """
    if num_envs < 1:
      raise ValueError(f'VectorEnv: num_envs must be >= 1, got {num_envs}')
    self.num_envs = num_envs
    self._factory = env_factory
    self._spec = spec
    self._headless = headless_rendering
    self._timeout_s = timeout_s
    self._ctx = multiprocessing.get_context('spawn')
    self._processes: list[Any] = [None] * num_envs
    self._conns: list[Any] = [None] * num_envs
    self._needs_start = [True] * num_envs
    self._consecutive_crashes = [0] * num_envs
    self.retired: set[int] = set()
    # Runs at garbage collection or interpreter exit if close() was never called.
    self._finalizer = weakref.finalize(self, _shutdown, self._processes, self._conns)
    if headless_rendering:
      # Chosen once here; spawned workers inherit MUJOCO_GL and skip the probe.
      configure_headless_rendering()
    try:
      started = self._start(range(num_envs))
    except BaseException:
      self.close()
      raise
    failed = {s: r for s, r in started.items() if isinstance(r, WorkerCrash)}
    if failed:
      self.close()
      slot, crash = next(iter(failed.items()))
      hint = ('\n(spawned workers re-import the main module: a script must start the '
              "evaluation under `if __name__ == '__main__':`; see the worker's stderr)"
              if 'died' in crash.reason else '')
      raise RuntimeError(f'VectorEnv: env worker {slot} could not build its env '
                         f'({len(failed)} of {num_envs} failed):\n{crash.reason}{hint}')

  @property
  def live_slots(self) -> list[int]:
    """Slots that accept commands (not retired after repeated crashes)."""
    return [s for s in range(self.num_envs) if s not in self.retired]

  def worker_pids(self) -> list[int]:
    return [p.pid for p in self._processes if p is not None and p.is_alive()]

  def run(self, commands: Mapping[int, tuple[str, Any]]) -> dict[int, Any]:
    """Executes one command per slot concurrently.

    Args:
      commands: slot -> ('reset', (seed, state, record_keys)) or ('step', actions
        (n_action_steps, Da)). A reset with `state` not None uses `reset_to_state`.

    Returns:
      slot -> stacked obs (reset), `StepResult` (step) or `WorkerCrash`.
    """
    for slot in commands:
      if slot in self.retired or not 0 <= slot < self.num_envs:
        raise ValueError(f'VectorEnv.run: slot {slot} is not live (live: {self.live_slots})')
    replies: dict[int, Any] = {}
    restarting = [s for s in commands if self._needs_start[s]]
    if restarting:
      replies.update({s: r for s, r in self._start(restarting).items()
                      if isinstance(r, WorkerCrash)})
    sendable = []
    for slot, command in commands.items():
      if slot in replies:
        continue
      try:
        self._conns[slot].send(command)
        sendable.append(slot)
      except (BrokenPipeError, OSError) as e:
        replies[slot] = self._crashed(slot, f'could not send {command[0]!r}: {e!r}')
    replies.update(self._collect(sendable))
    for slot, reply in replies.items():
      if isinstance(reply, WorkerCrash):
        self._consecutive_crashes[slot] += 1
        if self._consecutive_crashes[slot] >= MAX_CONSECUTIVE_CRASHES:
          self.retired.add(slot)
      elif isinstance(reply, StepResult):
        self._consecutive_crashes[slot] = 0
    return replies

  def close(self) -> None:
    """Stops all workers (idempotent)."""
    self._finalizer()

  def __enter__(self) -> 'VectorEnv':
    return self

  def __exit__(self, *exc_info) -> None:
    self.close()

  def _start(self, slots: Sequence[int]) -> dict[int, Any]:
    """(Re)starts workers for `slots` and waits for each to report its env built."""
    for slot in slots:
      self._stop(slot)
      parent_conn, child_conn = self._ctx.Pipe()
      process = self._ctx.Process(
          target=_worker, args=(child_conn, self._factory, self._spec, self._headless),
          name=f'dpjax-eval-env-{slot}', daemon=True)
      process.start()
      child_conn.close()
      self._processes[slot] = process
      self._conns[slot] = parent_conn
      self._needs_start[slot] = False
    return self._collect(list(slots))

  def _stop(self, slot: int) -> None:
    process, conn = self._processes[slot], self._conns[slot]
    if process is not None:
      _shutdown([process], [conn])
    self._processes[slot] = None
    self._conns[slot] = None

  def _crashed(self, slot: int, reason: str) -> WorkerCrash:
    self._stop(slot)
    self._needs_start[slot] = True
    return WorkerCrash(slot, reason)

  def _collect(self, slots: Sequence[int]) -> dict[int, Any]:
    """Waits for one reply from each slot; a worker that dies, raises or times out crashes."""
    replies: dict[int, Any] = {}
    pending = set(slots)
    deadline = time.monotonic() + self._timeout_s
    while pending:
      remaining = deadline - time.monotonic()
      if remaining <= 0:
        for slot in pending:
          replies[slot] = self._crashed(slot, f'no reply within {self._timeout_s:.0f} s')
        break
      waitables = [self._conns[s] for s in pending] + [self._processes[s].sentinel
                                                       for s in pending]
      multiprocessing.connection.wait(waitables, timeout=remaining)
      for slot in list(pending):
        conn, process = self._conns[slot], self._processes[slot]
        if conn.poll():
          try:
            status, payload = conn.recv()
          except (EOFError, OSError):
            process.join(1.0)
            replies[slot] = self._crashed(
                slot, f'worker process died (exit code {process.exitcode})')
          else:
            replies[slot] = (payload if status == 'ok' else
                             self._crashed(slot, f'worker raised:\n{payload}'))
          pending.discard(slot)
        elif not process.is_alive():
          replies[slot] = self._crashed(
              slot, f'worker process died (exit code {process.exitcode})')
          pending.discard(slot)
    return replies
