"""The optimiser: AdamW with per-group weight decay, warmup + cosine, accumulation (SPEC §7).

The reference builds a PyTorch AdamW with two parameter groups and steps a diffusers
`get_scheduler('cosine', ...)` LambdaLR once per optimiser step. Here the same maths is one optax
chain; decoupled weight decay is `-lr · wd · p`, as in `torch.optim.AdamW`.
"""

from typing import Callable, Sequence

import ml_collections
import optax

from dpjax.models import param_groups

LR_SCHEDULES = ('cosine', 'linear', 'constant', 'constant_with_warmup')

# (weight decay rate, mask function params -> bool pytree) per group.
DecayGroups = Sequence[tuple[float, Callable]]


def make_lr_schedule(optimizer_config: ml_collections.ConfigDict,
                     total_steps: int) -> optax.Schedule:
  """Learning rate per optimiser step, diffusers' `get_scheduler` semantics.

  Linear warmup from 0 to `lr` over `lr_warmup_steps`, then (cosine) half a cosine period down
  to 0 at `total_steps`, (linear) a straight line to 0, or (constant_with_warmup) `lr`;
  (constant) `lr` from the first step, without warmup, as diffusers' 'constant'.
  """
  lr = float(optimizer_config.lr)
  warmup = int(optimizer_config.lr_warmup_steps)
  name = optimizer_config.lr_schedule
  if name == 'constant':
    return optax.constant_schedule(lr)
  # A run shorter than its warmup never leaves it; the decay part then only needs a length.
  total_steps = max(int(total_steps), warmup + 1)
  warmup_fn = optax.linear_schedule(0.0, lr, warmup) if warmup > 0 else optax.constant_schedule(lr)
  if name == 'cosine':
    decay_fn = optax.cosine_decay_schedule(lr, total_steps - warmup, alpha=0.0)
  elif name == 'linear':
    decay_fn = optax.linear_schedule(lr, 0.0, total_steps - warmup)
  elif name == 'constant_with_warmup':
    decay_fn = optax.constant_schedule(lr)
  else:
    raise ValueError(f'optimizer.lr_schedule={name!r}: expected one of {LR_SCHEDULES}')
  return optax.join_schedules([warmup_fn, decay_fn], [warmup])


def default_decay_groups(optimizer_config: ml_collections.ConfigDict) -> DecayGroups:
  """SPEC §5: transformer weights decay 1e-3; every obs-encoder parameter 1e-6; the rest none."""
  return (
      (float(optimizer_config.transformer_weight_decay), param_groups.transformer_decay_mask),
      (float(optimizer_config.obs_encoder_weight_decay), param_groups.obs_encoder_mask),
  )


def make_optimizer(optimizer_config: ml_collections.ConfigDict,
                   total_steps: int,
                   *,
                   gradient_accumulate_every: int = 1,
                   decay_groups: DecayGroups | None = None) -> optax.GradientTransformation:
  """AdamW (betas, eps from the config) with masked decay groups and the step schedule.

  Args:
    optimizer_config: `config.optimizer`.
    total_steps: optimiser steps of the whole run (the schedule's length).
    gradient_accumulate_every: micro-batches averaged per optimiser step (`optax.MultiSteps`);
      the schedule counts optimiser steps, not micro-batches.
    decay_groups: overrides `default_decay_groups` (tests, other models).
  """
  if decay_groups is None:
    decay_groups = default_decay_groups(optimizer_config)
  b1, b2 = (float(b) for b in optimizer_config.betas)
  parts = []
  if optimizer_config.grad_clip_norm:
    parts.append(optax.clip_by_global_norm(float(optimizer_config.grad_clip_norm)))
  parts.append(optax.scale_by_adam(b1=b1, b2=b2, eps=float(optimizer_config.eps)))
  for rate, mask in decay_groups:
    if rate:
      parts.append(optax.add_decayed_weights(rate, mask=mask))
  parts.append(optax.scale_by_learning_rate(make_lr_schedule(optimizer_config, total_steps)))
  tx = optax.chain(*parts)
  if gradient_accumulate_every > 1:
    tx = optax.MultiSteps(tx, every_k_schedule=gradient_accumulate_every)
  return tx


def total_optimizer_steps(batches_per_epoch: int, num_epochs: int,
                          gradient_accumulate_every: int) -> int:
  """The reference's `len(loader) · num_epochs // gradient_accumulate_every` (≥ 1)."""
  return max(1, int(batches_per_epoch) * int(num_epochs) // int(gradient_accumulate_every))

