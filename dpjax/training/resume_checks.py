"""Whether a run may resume a workdir's checkpoint: same model, same data, not past its end.

A resumed run must train the model its checkpoints hold on the data they were trained on, so
the config groups that define them (task, model, data, diffusion) must match the checkpoint's,
except for fields that only tune speed or sampling (`RESUME_FREE`); training.*, eval.*,
optimizer.*, ema.* and seed may change, except where a switch adds or removes optimiser-state
arrays the checkpoint cannot fill (`RESUME_SWITCHES`) and the accumulation count
(`RESUME_FIXED`). The demos must be the same, wherever they are: the dataset digest a
checkpoint records (`prepare.PreparedData.dataset_digest`) and the normaliser statistics must
match.
"""

from typing import Any

import ml_collections
import numpy as np

from dpjax.data.prepare import PreparedData
from dpjax.errors import InputError
from dpjax.training.checkpointing import config_to_dict

RESUME_COMPARED = ('task', 'model', 'data', 'diffusion')
# Other demos show in the dataset digest and normaliser comparisons instead of data.data_dir or
# data.dataset_path (a moved file is the same data); a new shuffle_buffer only reorders the rest
# of an interrupted epoch.
RESUME_FREE = frozenset({
    'data.data_dir', 'data.dataset_path', 'data.num_gen_workers', 'data.shuffle_buffer',
    'model.pallas_decoder',
    'diffusion.sampler', 'diffusion.num_inference_steps', 'diffusion.ddim_eta',
    'diffusion.variance_type', 'diffusion.clip_sample'})
RESUME_SWITCHES = {
    'optimizer.grad_clip_norm': bool,
    'optimizer.transformer_weight_decay': bool,
    'optimizer.obs_encoder_weight_decay': bool,
}
# The optimiser-update and EMA counts are the step count divided by it: another value would
# restart the EMA's decay and move the LR schedule's position against its length.
RESUME_FIXED = frozenset({'training.gradient_accumulate_every'})
_ABSENT = object()


class ResumeError(InputError):
  """The workdir's latest checkpoint cannot be resumed by this run (another model or dataset,
  files missing or corrupt, or past the configured number of epochs)."""


def _flatten(tree: dict, prefix: str = '') -> dict:
  flat = {}
  for key, value in tree.items():
    if isinstance(value, dict):
      flat.update(_flatten(value, f'{prefix}{key}.'))
    else:
      flat[f'{prefix}{key}'] = value
  return flat


def resume_differences(saved_config: dict, config: dict) -> list[tuple[str, Any, Any]]:
  """(field, checkpoint's value, this run's value) for each field a resumed run may not change.

  Both configs are `checkpointing.config_to_dict` dicts; a field absent from one side has
  value `_ABSENT` there, the same as None (an optional field added to the config since).
  """
  saved, current = _flatten(saved_config), _flatten(config)
  differences = []
  for name in sorted(saved.keys() | current.keys()):
    old, new = saved.get(name, _ABSENT), current.get(name, _ABSENT)
    if (old, new) in ((_ABSENT, None), (None, _ABSENT)):  # A field added since, at its default.
      differs = False
    elif (name.split('.')[0] in RESUME_COMPARED and name not in RESUME_FREE
          or name in RESUME_FIXED):
      differs = old != new
    elif name in RESUME_SWITCHES and _ABSENT not in (old, new):
      differs = RESUME_SWITCHES[name](old) != RESUME_SWITCHES[name](new)
    else:
      differs = False
    if differs:
      differences.append((name, old, new))
  return differences


def normalizer_difference(saved: dict, current: dict) -> str | None:
  """Where two normalisers (`Normalizer.to_json` dicts) differ beyond float32 round-off."""
  saved_keys, current_keys = saved.get('keys', {}), current.get('keys', {})
  if saved_keys.keys() != current_keys.keys():
    return f'keys {sorted(saved_keys)} vs {sorted(current_keys)}'
  for key in sorted(saved_keys):
    old, new = saved_keys[key], current_keys[key]
    if old.get('mode') != new.get('mode'):
      return f'{key!r} mode {old.get("mode")!r} vs {new.get("mode")!r}'
    for part in ('scale', 'offset'):
      a, b = np.asarray(old.get(part), np.float64), np.asarray(new.get(part), np.float64)
      if a.shape != b.shape or not np.allclose(a, b, rtol=1e-5, atol=1e-6):
        return f'{key!r} {part} {np.round(a, 4).tolist()} vs {np.round(b, 4).tolist()}'
  return None


def check(step_dir: Any, saved_config: dict, saved_normalizer: dict, progress: dict,
          config: ml_collections.ConfigDict, normalizer: dict,
          prepared: PreparedData) -> None:
  """Raises `ResumeError` unless this run (`config`, `normalizer` as a `Normalizer.to_json`
  dict, its `prepare.PreparedData`) may resume the checkpoint in `step_dir`, given what it
  stored beside its arrays."""
  saved_digest = progress.get('dataset_digest')  # Absent from checkpoints of before 2026-12-02.
  if saved_digest is not None and saved_digest != prepared.dataset_digest:
    raise ResumeError(
        f'{step_dir} was trained on other demos than this run\'s {prepared.hdf5_path} (dataset '
        f'digest {saved_digest[:16]}... vs {prepared.dataset_digest[:16]}...: the file\'s bytes, '
        'observation shapes or filter key changed since these checkpoints were written); '
        'resume with the original demos or use a fresh --workdir')
  differences = resume_differences(saved_config, config_to_dict(config))
  if differences:
    def values(index: int) -> str:
      return ', '.join(f'no {d[0]}' if d[index] is _ABSENT else f'{d[0]}={d[index]!r}'
                       for d in differences)
    raise ResumeError(f'{step_dir} was trained with {values(1)}, this run has {values(2)}; '
                      'resume with the same values or use a fresh --workdir')
  difference = normalizer_difference(saved_normalizer, normalizer)
  if difference is not None:
    raise ResumeError(
        f'{step_dir} was trained with other normaliser statistics than this run\'s dataset '
        f'in config.data.data_dir={config.data.data_dir!r} ({difference}, checkpoint vs '
        'now): the dataset changed since these checkpoints were written; resume with the '
        'original dataset or use a fresh --workdir')
  num_epochs = config.training.num_epochs
  epoch, batch = int(progress['epoch']), int(progress['batch_in_epoch'])
  if (epoch, batch) > (num_epochs, 0):
    raise ResumeError(
        f'{step_dir} is past the end of this run: it was saved at epoch {epoch} (batch '
        f'{batch}), config.training.num_epochs={num_epochs}; pass training.num_epochs >= '
        f'{epoch + (batch > 0)} to train on, or use a fresh --workdir')
