"""The training loop: `train_and_evaluate(config, workdir)` (SPEC §7, issue 4).

Epochs over the tf.data pipeline; each epoch reads a non-repeating dataset seeded by
(seed, epoch), so a resumed run sees exactly the batches an uninterrupted one would (batches the
interrupted epoch already consumed are skipped). Intervals are in epochs, 0 = never; an event
fires after epochs e with (e + 1) % every == 0, and the last epoch always checkpoints (and rolls
out when rollouts are on), so the final checkpoint is ranked. Validation loss uses the raw
parameters; action MSE, rollouts and the exported policy use the EMA parameters.

Resuming (config.training.resume, the default) continues from the workdir's latest checkpoint
only if it was trained with this run's model, data and diffusion training fields on the same
normaliser statistics (`resume_checks`); training.*, eval.*, optimizer.*, ema.*, seed and
the speed- or sampling-only fields may change, except the accumulation count, switches that
change the optimiser state's layout (clipping, weight decay on/off) and fewer epochs than
trained.
Nothing is written to the workdir (config.json, metrics, TensorBoard) until the run is known to
go ahead, so a refused run leaves it as it was. Rerunning a finished run trains nothing and
keeps its summary.json. A diverged run (non-finite loss, validation loss, action MSE or
parameters) stops without saving.

Workdir after a run:
  config.json             the resolved config
  summary.json            final step, losses, success rate, checkpoint and policy paths
  metrics.jsonl           one JSON line per logged step / epoch
  tensorboard/            the same scalars for TensorBoard
  learning_curves.png     losses and success rate against steps (`curves`)
  checkpoints/<step>/     latest + top-k by rollout success (orbax); with
                          training.checkpoint_every_steps also mid-epoch ones
  policy/                 exported EMA policy (`checkpointing.load_policy`)
  videos/epoch_<e>/       rollout videos, when rollouts run
"""

import functools
import itertools
import json
import math
import os
import time
from typing import Any, Iterator, Sequence

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import tqdm
from absl import logging
from jax.experimental import multihost_utils

from dpjax.atomic_write import write_json_atomic
from dpjax.data import pipeline, prepare
from dpjax.data.shape_meta import ShapeMeta
from dpjax.diffusion.policy import DiffusionPolicy
from dpjax.errors import UserFacingError, root_cause
from dpjax.evaluation import runner as eval_runner
from dpjax.training import checkpointing, config_checks, curves as curves_lib
from dpjax.training import metrics as metrics_lib
from dpjax.training import optimizer as optimizer_lib, parallel, resume_checks
from dpjax.training.train_state import TrainState, create_train_state
from dpjax.tree_shapes import summarize

CONFIG_FILE = 'config.json'
SUMMARY_FILE = 'summary.json'
POLICY_DIR = 'policy'
# summary.json's measured fields: the latest value of each metric (epoch scalars).
SUMMARY_METRICS = {'train_loss': 'epoch/train_loss', 'val_loss': 'epoch/val_loss',
                   'action_mse': 'epoch/train_action_mse',
                   'success_rate': 'rollout/test/success_rate'}


class NonFiniteLossError(UserFacingError, FloatingPointError):
  """Training diverged: a loss, the action MSE or the parameters became NaN or infinite."""


@jax.jit
def _all_finite(trees) -> jax.Array:
  return jnp.all(jnp.stack([jnp.all(jnp.isfinite(x)) for x in jax.tree.leaves(trees)]))


def epoch_seed(seed: int, epoch: int) -> int:
  """The data-order seed of one epoch; a pure function of (seed, epoch) for exact resumption."""
  return int(np.random.SeedSequence([int(seed), int(epoch)]).generate_state(1)[0])


def is_due(epoch: int, every: int, num_epochs: int, *, at_end: bool) -> bool:
  """Whether an every-`every`-epochs event runs after `epoch` (0-based); 0 means never.

  `at_end` also fires after the last epoch (checkpoints, rollouts: the final state is kept
  and ranked).
  """
  if every <= 0:
    return False
  return (epoch + 1) % every == 0 or (at_end and epoch == num_epochs - 1)


def _prepare_data(config: ml_collections.ConfigDict):
  """Process 0 builds the dataset if missing; the others then load it (or build their own copy
  when data_dir is not on a shared disk)."""
  if jax.process_count() == 1:
    return prepare.prepare_dataset(config)
  if jax.process_index() == 0:
    prepared = prepare.prepare_dataset(config)
  multihost_utils.sync_global_devices('prepare_dataset')
  if jax.process_index() != 0:
    prepared = prepare.prepare_dataset(config, log=logging.info)
  return prepared


class StepLog:
  """Per-step bookkeeping: reads each step's metrics one step late (so dispatch stays
  asynchronous), stops on a non-finite loss, and feeds the progress bar and the metric files."""

  def __init__(self, *, writer: metrics_lib.MetricWriter, lr_schedule, accumulate: int,
               log_every: int, global_batch_size: int, last_checkpoint, show_progress: bool,
               refresh_s: float):
    self._writer = writer
    self._lr_schedule = lr_schedule
    self._accumulate = accumulate
    self._log_every = log_every
    self._global_batch_size = global_batch_size
    self._last_checkpoint = last_checkpoint  # () -> text naming the last good checkpoint.
    self._show_progress = show_progress
    self._refresh_s = refresh_s
    self._pending = None
    self._bar = None

  def start_epoch(self, epoch: int, num_epochs: int, total: int, done: int,
                  done_losses: Sequence[float] = ()) -> None:
    """`done` batches of the epoch ran before a resume, with losses `done_losses` (recorded in
    the checkpoint), so the epoch's mean loss is that of an uninterrupted run."""
    self.epoch = epoch
    self.losses: list[float] = list(done_losses)
    # Throughput is timed from the epoch's first finished step: compilation and the
    # evaluation phases between epochs stay out of it.
    self._rate_start = None
    self._bar = tqdm.tqdm(total=total, initial=done, desc=f'epoch {epoch + 1}/{num_epochs}',
                          mininterval=self._refresh_s, disable=not self._show_progress,
                          dynamic_ncols=True)

  def push(self, step: int, step_metrics: dict) -> None:
    """Records the step just dispatched; checks the one before it."""
    previous, self._pending = self._pending, (step, step_metrics)
    if previous is not None:
      self._consume(*previous)

  def flush(self) -> None:
    """Checks every dispatched step (before a checkpoint, so none holds a non-finite loss)."""
    previous, self._pending = self._pending, None
    if previous is not None:
      self._consume(*previous)

  def end_epoch(self) -> float | None:
    self.flush()
    self._bar.close()
    return float(np.mean(self.losses)) if self.losses else None

  def _consume(self, step: int, step_metrics: dict) -> None:
    values = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
    loss = values['loss']
    if not math.isfinite(loss):
      raise NonFiniteLossError(
          f'training loss is {loss} at step {step} (epoch {self.epoch + 1}); stopping. Last '
          f'good checkpoint: {self._last_checkpoint()}')
    self.losses.append(loss)
    now = time.time()
    if self._rate_start is None:
      self._rate_start = (now, step)
    elapsed = now - self._rate_start[0]
    steps_per_s = (step - self._rate_start[1]) / elapsed if elapsed > 0 else float('nan')
    lr = float(self._lr_schedule((step - 1) // self._accumulate))
    self._bar.update(1)
    self._bar.set_postfix(loss=f'{loss:.4f}', lr=f'{lr:.2e}', steps_s=f'{steps_per_s:.2f}',
                          refresh=False)
    if step % self._log_every == 0:
      scalars = {f'train/{k}': v for k, v in values.items()}
      scalars.update({'train/lr': lr, 'train/epoch': self.epoch})
      if math.isfinite(steps_per_s):
        scalars['train/steps_per_s'] = steps_per_s
        scalars['train/samples_per_s'] = steps_per_s * self._global_batch_size
      self._writer.write(step, scalars)


class _Loop:
  """State shared by the phases of the loop (kept out of a single very long function)."""

  def __init__(self, config: ml_collections.ConfigDict, workdir: str):
    self.config = config
    self.workdir = os.path.abspath(workdir)
    self.is_chief = jax.process_index() == 0
    self.mesh = parallel.make_mesh()
    config_checks.check_config(config, num_devices=self.mesh.devices.size,
                               num_processes=jax.process_count())

    self.prepared = _prepare_data(config)
    self.normalizer = self.prepared.normalizer
    self.shape_meta = ShapeMeta.from_config(config.task.shape_meta)
    self.policy = DiffusionPolicy(config, self.shape_meta, self.normalizer)

    self.local_batch_size = parallel.per_process_batch_size(config.data.batch_size, self.mesh)
    # Episodes stay in memory for the whole run: each epoch's pipeline reuses them.
    self.store = pipeline.load_episodes(self.prepared.builder, self.shape_meta)
    training = config.training
    steps = self._steps_per_epoch('train')
    if steps < 1:
      raise config_checks.ConfigError(
          f'the training split has fewer windows per process than one batch of '
          f'{self.local_batch_size} (config.data.batch_size={config.data.batch_size}); lower '
          'the batch size or add demos (config.data.num_demos)')
    self.val_batches = self._steps_per_epoch('val')
    if config.training.max_val_steps:
      self.val_batches = min(self.val_batches, config.training.max_val_steps)
    self.batches_per_epoch = min(steps, training.max_train_steps or steps)
    self.accumulate = int(training.gradient_accumulate_every)
    micro_batches = self.batches_per_epoch * training.num_epochs
    if self.accumulate > micro_batches:
      raise config_checks.ConfigError(
          f'training.gradient_accumulate_every={self.accumulate}: more than the run\'s '
          f'{micro_batches} batches (training.num_epochs={training.num_epochs} x '
          f'{self.batches_per_epoch} per epoch), so no optimiser step would ever run; use at '
          f'most {micro_batches}')
    self.total_optimizer_steps = optimizer_lib.total_optimizer_steps(
        self.batches_per_epoch, training.num_epochs, self.accumulate)
    self.lr_schedule = optimizer_lib.make_lr_schedule(config.optimizer,
                                                      self.total_optimizer_steps)
    self.tx = optimizer_lib.make_optimizer(config.optimizer, self.total_optimizer_steps,
                                           gradient_accumulate_every=self.accumulate)

    base_key = jax.random.PRNGKey(config.seed)
    self.init_key, self.eval_key = jax.random.split(base_key)
    self.checkpointer = checkpointing.Checkpointer(
        os.path.join(self.workdir, checkpointing.CHECKPOINTS_DIR),
        topk=training.checkpoint_topk)
    # Opened by `open_outputs` once the run goes ahead.
    self.writer: metrics_lib.MetricWriter | None = None
    self.step_log: StepLog | None = None
    self.summary: dict[str, Any] = {'workdir': self.workdir,
                                    **dict.fromkeys(SUMMARY_METRICS)}
    self.losses_before_resume: list[float] = []  # Of the epoch a checkpoint stopped inside.

    policy = self.policy
    self.train_step = parallel.make_train_step(
        lambda params, batch, rng: policy.compute_loss({'params': params}, batch, rng, True),
        self.tx, self.mesh, ema_config=config.ema,
        gradient_accumulate_every=self.accumulate)
    self.val_loss = parallel.make_batch_fn(
        lambda params, batch, rng: policy.compute_loss({'params': params}, batch, rng, False)[0],
        self.mesh)

    def action_mse(params, batch, rng):
      pred = policy.predict_action({'params': params}, batch['obs'], rng)['action_pred']
      target = batch['action']
      if policy.pred_action_steps_only:
        start = policy.n_obs_steps - 1
        target = target[:, start:start + policy.n_action_steps]
      return jnp.mean(jnp.square(pred - target))

    self.action_mse = parallel.make_batch_fn(action_mse, self.mesh)

  # --- state ---------------------------------------------------------------------------------

  def initial_state(self) -> tuple[TrainState, int, int]:
    """Fresh state, or the latest checkpoint's when resuming; also (epoch, batch_in_epoch).

    Raises:
      FileExistsError: checkpoints exist but config.training.resume is False.
      ResumeError: the latest checkpoint does not fit this run or cannot be read
        (`check_resumable`, `restore`).
    """
    latest = self.checkpointer.latest_step()
    if latest is not None:
      if not self.config.training.resume:
        raise FileExistsError(
            f'{self.checkpointer.directory} holds checkpoints (latest step {latest}) but '
            'config.training.resume=False: use a fresh --workdir, or resume')
      self.check_resumable(latest)
    init_key, train_key = jax.random.split(self.init_key)
    params = parallel.replicate(jax.device_get(self.policy.init(init_key)['params']), self.mesh)
    state = jax.jit(functools.partial(create_train_state, tx=self.tx),
                    out_shardings=parallel.replicated(self.mesh))(params, rng=train_key)
    if latest is None:
      return state, 0, 0
    state, progress = self.restore(state, latest)
    self.summary.update(self._measured_until(latest))
    # Absent from checkpoints of before 2026-12-02.
    self.losses_before_resume = [float(x) for x in progress.get('epoch_train_losses', [])]
    logging.info('Resumed from %s (epoch %d, batch %d of the epoch)',
                 self.checkpointer.step_dir(latest), progress['epoch'],
                 progress['batch_in_epoch'])
    return state, int(progress['epoch']), int(progress['batch_in_epoch'])

  def check_resumable(self, step: int) -> None:
    """Refuses, before the state is restored, a checkpoint of another model or dataset.

    Compares the stored config and normaliser with this run's, and the stored epoch with
    config.training.num_epochs (`resume_checks.check`).
    """
    step_dir = self.checkpointer.step_dir(step)
    saved_config, saved_normalizer, progress = self._read_checkpoint(
        step, self.checkpointer.read_metadata, step)
    resume_checks.check(step_dir, saved_config, saved_normalizer, progress, self.config,
                        json.loads(self.normalizer.to_json()), self.prepared)

  def restore(self, state: TrainState, step: int) -> tuple[TrainState, dict]:
    """`step`'s state and progress, restored onto `state`'s shapes and shardings."""
    mismatches = self._read_checkpoint(step, self.checkpointer.state_mismatches, state, step)
    if mismatches:
      raise resume_checks.ResumeError(
          f'{self.checkpointer.step_dir(step)} holds a train state of another layout than this '
          f'run\'s ({summarize(mismatches)}); resume with the code and config it was trained '
          'with or use a fresh --workdir')
    return self._read_checkpoint(step, self.checkpointer.restore, state, step)

  def _measured_until(self, step: int) -> dict[str, Any]:
    """The summary fields the run's metrics.jsonl recorded up to `step`: a resumed run's
    summary reports what earlier processes measured (a killed finished run's last epoch, a
    validation loss of an epoch before the resume)."""
    if not os.path.exists(os.path.join(self.workdir, metrics_lib.METRICS_FILE)):
      return {}
    measured = {}
    for record in metrics_lib.read_metrics(self.workdir):
      if record['step'] <= step:
        measured.update({field: record[name] for field, name in SUMMARY_METRICS.items()
                         if name in record})
    return measured

  def _read_checkpoint(self, step: int, read, *args):
    """`read(*args)`; a failure (files of `step` missing or corrupt) becomes one ResumeError."""
    try:
      return read(*args)
    # orbax and tensorstore raise many types (OSError, ValueError, KeyError, their own).
    except Exception as e:  # pylint: disable=broad-except
      logging.debug('Reading checkpoint %d failed', step, exc_info=True)
      earlier = [s for s in self.checkpointer.all_steps() if s < step]
      then = f'resume from step {max(earlier)}' if earlier else 'start afresh'
      raise resume_checks.ResumeError(
          f'{self.checkpointer.step_dir(step)} cannot be restored ({root_cause(e)}); move it '
          f'out of {self.checkpointer.directory} to {then}') from None

  def open_outputs(self, start_step: int) -> None:
    """Writes config.json and opens the metric files from `start_step`: the run goes ahead."""
    training = self.config.training
    if self.is_chief:
      os.makedirs(self.workdir, exist_ok=True)
      write_json_atomic(os.path.join(self.workdir, CONFIG_FILE),
                        checkpointing.config_to_dict(self.config))
    self.writer = metrics_lib.MetricWriter(self.workdir, enabled=self.is_chief,
                                           start_step=start_step)
    self.step_log = StepLog(
        writer=self.writer, lr_schedule=self.lr_schedule, accumulate=self.accumulate,
        log_every=training.log_every_steps, global_batch_size=self.config.data.batch_size,
        last_checkpoint=self.last_checkpoint_text, show_progress=self.is_chief,
        refresh_s=training.progress_refresh_s)

  def last_checkpoint_text(self) -> str:
    step = self.checkpointer.latest_step()
    if step is None:
      return 'none (no checkpoint was written yet)'
    return str(self.checkpointer.step_dir(step))

  # --- data ----------------------------------------------------------------------------------

  def _steps_per_epoch(self, split: str) -> int:
    data = self.config.data
    return pipeline.steps_per_epoch(
        self.store.lengths, split=split, horizon=data.horizon, n_obs_steps=data.n_obs_steps,
        n_action_steps=data.n_action_steps, batch_size=self.local_batch_size,
        val_ratio=data.val_ratio, split_seed=data.split_seed, process_count=jax.process_count())

  def _dataset(self, split: str, seed: int) -> Iterator[dict]:
    """One pass (no repeat) over `split`, in this process's share of each global batch."""
    kwargs = pipeline.pipeline_kwargs(self.config, split)
    kwargs.update(batch_size=self.local_batch_size, seed=seed, process_index=jax.process_index(),
                  process_count=jax.process_count(), repeat=False)
    return pipeline.make_dataset(self.store, self.shape_meta, **kwargs)

  def train_batches(self, epoch: int, start: int) -> Iterator[dict]:
    """The epoch's batches from index `start` on (earlier ones were consumed before a resume)."""
    batches = self._dataset('train', epoch_seed(self.config.seed, epoch))
    return itertools.islice(batches, start, self.batches_per_epoch)

  # --- evaluation phases ---------------------------------------------------------------------

  def validate(self, state: TrainState, epoch: int) -> float | None:
    """Mean loss of the raw parameters over the validation split (max_val_steps batches)."""
    if self.val_batches < 1:
      logging.warning('No validation loss: the validation split has fewer windows than one '
                      'batch of %d per process', self.local_batch_size)
      return None
    batches = itertools.islice(self._dataset('val', self.config.seed), self.val_batches)
    key = jax.random.fold_in(self.eval_key, epoch)
    losses = [self.val_loss(state.params, parallel.shard_batch(batch, self.mesh),
                            jax.random.fold_in(key, i)) for i, batch in enumerate(batches)]
    return float(np.mean(jax.device_get(losses)))

  def sample_mse(self, state: TrainState, batch, epoch: int) -> float:
    key = jax.random.fold_in(jax.random.fold_in(self.eval_key, epoch), 1 << 20)
    return float(self.action_mse(state.ema_params, batch, key))

  def rollout(self, state: TrainState, epoch: int) -> tuple[float, dict[str, float]]:
    """Runs the evaluation protocol on process 0 with the EMA params; returns (success, scalars).

    Other processes wait and receive the success rate, which ranks the checkpoint.
    """
    success, scalars = 0.0, {}
    if self.is_chief:
      variables = {'params': jax.device_get(state.ema_params)}
      video_dir = os.path.join(self.workdir, 'videos', f'epoch_{epoch:04d}')
      result = eval_runner.evaluate_policy(
          self.policy, variables, self.config,
          rng=jax.random.fold_in(jax.random.fold_in(self.eval_key, epoch), 1 << 21),
          dataset_path=self.prepared.hdf5_path, video_dir=video_dir, progress=True)
      success = float(result['test']['success_rate'])
      scalars = {f'rollout/{k}': v for k, v in result['scalars'].items()}
    if jax.process_count() > 1:
      success = float(multihost_utils.broadcast_one_to_all(np.float32(success)))
      scalars.setdefault(SUMMARY_METRICS['success_rate'], success)  # Every process's summary.
    return success, scalars

  # --- the loop --------------------------------------------------------------------------------

  def check_finite(self, state: TrainState, epoch: int) -> None:
    """Stops before a diverged state is saved or exported: the loss is read before each
    update, so the last update's damage shows only in the parameters."""
    if not bool(_all_finite((state.params, state.ema_params))):
      raise NonFiniteLossError(
          f'the parameters are not finite after step {int(jax.device_get(state.step))} (epoch '
          f'{epoch + 1}); stopping without saving. Last good checkpoint: '
          f'{self.last_checkpoint_text()}')

  def check_metric(self, name: str, value: float, step: int, epoch: int) -> None:
    if not math.isfinite(value):
      raise NonFiniteLossError(
          f'{name} is {value} after step {step} (epoch {epoch + 1}); stopping without saving. '
          f'Last good checkpoint: {self.last_checkpoint_text()}')

  def save(self, state: TrainState, epoch: int, batch_in_epoch: int,
           success_rate: float | None = None) -> None:
    # Mid-epoch, the epoch's losses so far: a resumed run's epoch loss averages them too.
    self.checkpointer.save(state, progress={'epoch': epoch, 'batch_in_epoch': batch_in_epoch,
                                            'epoch_train_losses': self.step_log.losses
                                            if batch_in_epoch else [],
                                            'dataset_digest': self.prepared.dataset_digest},
                           config=self.config, normalizer=self.normalizer,
                           success_rate=success_rate)

  def run_epoch(self, state: TrainState, epoch: int, start_batch: int) -> TrainState:
    """Trains the rest of `epoch` from batch `start_batch`, then evaluates and checkpoints."""
    training = self.config.training
    epoch_start = time.time()
    self.step_log.start_epoch(epoch, training.num_epochs, self.batches_per_epoch, start_batch,
                              self.losses_before_resume if start_batch else ())
    step = int(jax.device_get(state.step))
    batch_index, last_batch = start_batch, None
    for batch in self.train_batches(epoch, start_batch):
      last_batch = parallel.shard_batch(batch, self.mesh)
      state, step_metrics = self.train_step(state, last_batch)
      step, batch_index = step + 1, batch_index + 1
      self.step_log.push(step, step_metrics)
      every = training.checkpoint_every_steps
      if every and step % every == 0 and batch_index < self.batches_per_epoch:
        self.step_log.flush()
        self.check_finite(state, epoch)
        self.save(state, epoch, batch_index)
    train_loss = self.step_log.end_epoch()
    if batch_index < self.batches_per_epoch:
      raise RuntimeError(
          f'epoch {epoch + 1}: the training data ended after {batch_index} batches, expected '
          f'{self.batches_per_epoch} (pipeline.steps_per_epoch disagrees with the dataset)')

    scalars = {'epoch/epoch': epoch, 'epoch/time_s': time.time() - epoch_start}
    num_epochs = training.num_epochs
    if train_loss is not None:
      scalars['epoch/train_loss'] = train_loss
    if is_due(epoch, training.val_every, num_epochs, at_end=False):
      val_loss = self.validate(state, epoch)
      if val_loss is not None:
        self.check_metric('validation loss', val_loss, step, epoch)
        scalars['epoch/val_loss'] = val_loss
    if last_batch is not None and is_due(epoch, training.sample_every, num_epochs,
                                          at_end=False):
      mse = self.sample_mse(state, last_batch, epoch)
      self.check_metric('action MSE', mse, step, epoch)
      scalars['epoch/train_action_mse'] = mse
    success = None
    if is_due(epoch, training.rollout_every, num_epochs, at_end=True):
      success, rollout_scalars = self.rollout(state, epoch)
      scalars.update(rollout_scalars)
    self.summary.update({field: scalars[name] for field, name in SUMMARY_METRICS.items()
                         if name in scalars})
    self.writer.write(step, scalars)
    if is_due(epoch, training.checkpoint_every, num_epochs, at_end=True):
      self.check_finite(state, epoch)
      self.save(state, epoch + 1, 0, success_rate=success)
    logging.info('epoch %d/%d: %s', epoch + 1, num_epochs,
                 {k: round(v, 5) for k, v in scalars.items()})
    return state

  def summary_is_current(self, state: TrainState) -> bool:
    """Whether summary.json exists and describes `state`'s step (a finished run's rerun)."""
    try:
      with open(os.path.join(self.workdir, SUMMARY_FILE), encoding='utf-8') as f:
        summary = json.load(f)
    except (OSError, ValueError):  # Absent or unreadable: the run finishes and writes it anew.
      return False
    return isinstance(summary, dict) and summary.get('step') == int(jax.device_get(state.step))

  def finish(self, state: TrainState) -> None:
    """Waits for checkpoint writes, exports the EMA policy, writes summary.json."""
    self.checkpointer.wait_until_finished()
    policy_dir = checkpointing.export_policy(
        os.path.join(self.workdir, POLICY_DIR), ema_params=state.ema_params,
        config=self.config, normalizer=self.normalizer)
    self.summary.update(step=int(jax.device_get(state.step)),
                        epoch=self.config.training.num_epochs,
                        checkpoint=self.last_checkpoint_text(), policy_dir=str(policy_dir))
    if self.is_chief:
      write_json_atomic(os.path.join(self.workdir, SUMMARY_FILE), self.summary)
      self.writer.flush()
      curves_lib.plot_learning_curves(self.workdir)
    logging.info('Training finished: %s', self.summary)

  def close(self) -> None:
    self.checkpointer.wait_until_finished()
    self.checkpointer.close()
    if self.writer is not None:
      self.writer.close()


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> TrainState:
  """Trains `config` in `workdir` (resuming from its latest checkpoint when training.resume).

  Every process of a multi-host run calls this with the same arguments. Writes
  `<workdir>/summary.json`: {'workdir', 'step', 'epoch', 'train_loss', 'val_loss',
  'action_mse', 'success_rate', 'checkpoint', 'policy_dir'}: the latest value of each metric,
  measured by this process or, before a resume, by earlier ones (None where never measured). A run
  whose latest checkpoint already ends its last epoch, and whose summary.json is of that step,
  trains nothing and writes nothing.

  Returns:
    The final train state (replicated over all devices).
  """
  loop = _Loop(config, workdir)
  try:
    state, start_epoch, start_batch = loop.initial_state()
    if start_epoch == config.training.num_epochs and loop.summary_is_current(state):
      logging.info('%s already completed its %d epochs (step %d): nothing to train; %s kept',
                   loop.workdir, start_epoch, int(jax.device_get(state.step)), SUMMARY_FILE)
      return state
    loop.open_outputs(int(jax.device_get(state.step)))
    logging.info('Training %s: %d epochs x %d batches of %d (%d per process) on %d devices, '
                 '%d optimizer steps; workdir %s', config.name, config.training.num_epochs,
                 loop.batches_per_epoch, config.data.batch_size, loop.local_batch_size,
                 loop.mesh.devices.size, loop.total_optimizer_steps, loop.workdir)
    for epoch in range(start_epoch, config.training.num_epochs):
      state = loop.run_epoch(state, epoch, start_batch)
      start_batch = 0
    loop.finish(state)
  finally:
    loop.close()
  return state
