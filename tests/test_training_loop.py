"""Loop pieces that need no data: event schedule, data-order seeds, the non-finite-loss stop."""

import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.training import metrics, optimizer, trainer
from configs import lift


def test_events_fire_every_n_epochs_and_at_the_end():
  due = [e for e in range(10) if trainer.is_due(e, 3, 10, at_end=False)]
  assert due == [2, 5, 8]
  assert [e for e in range(10) if trainer.is_due(e, 3, 10, at_end=True)] == [2, 5, 8, 9]
  assert not any(trainer.is_due(e, 0, 10, at_end=True) for e in range(10))


def test_epoch_seeds_are_a_pure_function_of_seed_and_epoch():
  seeds = [trainer.epoch_seed(42, e) for e in range(50)]
  assert seeds == [trainer.epoch_seed(42, e) for e in range(50)]
  assert len(set(seeds)) == 50
  assert trainer.epoch_seed(43, 0) != seeds[0]


def _step_log(workdir):
  config = lift.get_config('smoke')
  return trainer.StepLog(
      writer=metrics.MetricWriter(workdir), accumulate=1, log_every=1, global_batch_size=4,
      lr_schedule=optimizer.make_lr_schedule(config.optimizer, 10),
      last_checkpoint=lambda: '/runs/x/checkpoints/2', show_progress=False, refresh_s=1.0)


def test_non_finite_loss_stops_naming_the_step_and_the_last_checkpoint(tmp_path):
  log = _step_log(tmp_path)
  log.start_epoch(1, 3, total=4, done=0)
  log.push(3, {'loss': jnp.float32(0.5)})
  log.push(4, {'loss': jnp.float32(np.nan)})  # Read one step late: nothing raised yet.
  with pytest.raises(trainer.NonFiniteLossError,
                     match=r'loss is nan at step 4 \(epoch 2\).*Last good checkpoint: '
                           r'/runs/x/checkpoints/2'):
    log.flush()
  log.start_epoch(2, 3, total=4, done=0)
  log.push(5, {'loss': jnp.float32(np.inf)})
  with pytest.raises(trainer.NonFiniteLossError, match='loss is inf at step 5'):
    log.end_epoch()


def test_step_metrics_reach_metrics_jsonl(tmp_path):
  log = _step_log(tmp_path)
  log.start_epoch(0, 1, total=2, done=0)
  log.push(1, {'loss': jnp.float32(0.25), 'grad_norm': jnp.float32(2.0)})
  log.push(2, {'loss': jnp.float32(0.75), 'grad_norm': jnp.float32(1.0)})
  assert log.end_epoch() == pytest.approx(0.5)
  records = metrics.read_metrics(tmp_path)
  assert [r['step'] for r in records] == [1, 2]
  assert records[0]['train/loss'] == 0.25 and records[1]['train/grad_norm'] == 1.0
  assert records[0]['train/lr'] == 0.0 and records[1]['train/lr'] == pytest.approx(1e-4)
  assert records[1]['train/samples_per_s'] == pytest.approx(4 * records[1]['train/steps_per_s'])


def test_a_record_cut_short_by_a_kill_is_skipped_and_later_records_stay_whole(tmp_path,
                                                                             caplog):
  writer = metrics.MetricWriter(tmp_path)
  writer.write(1, {'train/loss': 0.5})
  writer.close()
  with open(tmp_path / metrics.METRICS_FILE, 'a', encoding='utf-8') as f:
    f.write('{"step": 2, "train/lo')  # The process died inside this write.
  resumed = metrics.MetricWriter(tmp_path)  # The resumed run appends to the same file.
  resumed.write(2, {'train/loss': 0.25})
  resumed.close()
  assert [(r['step'], r['train/loss']) for r in metrics.read_metrics(tmp_path)] == [(1, 0.5),
                                                                                    (2, 0.25)]
  assert f'{metrics.METRICS_FILE} line 2 is not a metrics record' in caplog.text


def test_a_resumed_run_drops_what_its_predecessor_wrote_after_the_checkpoint(tmp_path):
  """Steps 3 and 4 were logged, then the run died before checkpointing them: the run resuming
  from step 2 logs them again, once each, and the curve never runs back in step."""
  writer = metrics.MetricWriter(tmp_path, start_step=0)
  for step in (1, 2, 3, 4):
    writer.write(step, {'train/loss': 1.0 / step})
  writer.close()
  resumed = metrics.MetricWriter(tmp_path, start_step=2)
  for step in (3, 4):
    resumed.write(step, {'train/loss': 0.5 / step})
  resumed.close()
  records = metrics.read_metrics(tmp_path)
  assert [(r['step'], r['train/loss']) for r in records] == [
      (1, 1.0), (2, 0.5), (3, pytest.approx(0.5 / 3)), (4, 0.125)]


def test_an_epoch_resumed_midway_averages_the_losses_before_the_resume(tmp_path):
  log = _step_log(tmp_path)
  log.start_epoch(1, 3, total=4, done=2, done_losses=[0.5, 0.25])
  log.push(7, {'loss': jnp.float32(1.0)})
  log.push(8, {'loss': jnp.float32(0.25)})
  assert log.end_epoch() == pytest.approx(0.5)
