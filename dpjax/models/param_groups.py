"""Optimizer parameter groups as pytree masks over the policy's parameters (SPEC §5, §7).

Layout (written by `dpjax/diffusion/policy.py`): the variables dict
`{'params': {'obs_encoder': ..., 'noise_model': ...}}`; the inner dict
`{'obs_encoder': ..., 'noise_model': ...}` is accepted too. Every mask has the structure of
the tree it is given, so it can go straight to `optax.masked` / `optax.add_decayed_weights`.

Reference groups (`TransformerForDiffusion.get_optim_groups` + the policy's encoder group):
- transformer decay (weight decay 1e-3): weights of Linear layers and of the attention in- and
  out-projections: the leaves named `kernel` or `in_proj_kernel` under `noise_model`;
- transformer no-decay: every other `noise_model` leaf (biases, LayerNorm scales and biases,
  pos_emb, cond_pos_emb);
- obs encoder (weight decay 1e-6): every `obs_encoder` leaf.
"""

from typing import Any

import jax

OBS_ENCODER = 'obs_encoder'
NOISE_MODEL = 'noise_model'
DECAY_LEAF_NAMES = ('kernel', 'in_proj_kernel')

TRANSFORMER_DECAY = 'transformer_decay'
TRANSFORMER_NO_DECAY = 'transformer_no_decay'
OBS_ENCODER_GROUP = 'obs_encoder'


def _path_names(path) -> tuple[str, ...]:
  return tuple(str(getattr(entry, 'key', getattr(entry, 'name', entry))) for entry in path)


def _label(path) -> str:
  names = _path_names(path)
  if names and names[0] == 'params':
    names = names[1:]
  if not names or names[0] not in (OBS_ENCODER, NOISE_MODEL):
    raise ValueError(
        f'dpjax/models/param_groups.py: parameter {"/".join(_path_names(path))} is neither under '
        f"'{OBS_ENCODER}' nor '{NOISE_MODEL}'; expected params laid out as "
        "{'params': {'obs_encoder': ..., 'noise_model': ...}}")
  if names[0] == OBS_ENCODER:
    return OBS_ENCODER_GROUP
  return TRANSFORMER_DECAY if names[-1] in DECAY_LEAF_NAMES else TRANSFORMER_NO_DECAY


def param_group_labels(params: Any) -> Any:
  """Same-structure tree of group names, to see which group each parameter falls in."""
  return jax.tree_util.tree_map_with_path(lambda path, _: _label(path), params)


def transformer_decay_mask(params: Any) -> Any:
  """True on transformer Linear / attention weights, False elsewhere (encoder included)."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _label(path) == TRANSFORMER_DECAY, params)


def transformer_no_decay_mask(params: Any) -> Any:
  """True on transformer biases, LayerNorm parameters, pos_emb and cond_pos_emb."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _label(path) == TRANSFORMER_NO_DECAY, params)


def obs_encoder_mask(params: Any) -> Any:
  """True on every observation-encoder parameter."""
  return jax.tree_util.tree_map_with_path(
      lambda path, _: _label(path) == OBS_ENCODER_GROUP, params)
