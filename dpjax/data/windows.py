"""Which training windows an episode yields, and which episodes are held out (SPEC §2).

Reproduces the reference `SequenceSampler` / `create_indices` / `get_val_mask` semantics of
`diffusion_policy` exactly, as plain numpy index arithmetic:

* a window of `horizon` steps starts at every s in [-pad_before, L - horizon + pad_after];
* a step outside the episode repeats the first / last frame (edge padding), i.e. window step k
  reads episode step clip(s + k, 0, L - 1);
* pads are clamped to [0, horizon - 1] as the reference does.

With horizon 10, pad_before 1 (n_obs_steps - 1) and pad_after 7 (n_action_steps - 1) an episode
of length L yields L - 1 windows (none for L = 1).
"""

import numpy as np


def _clamp_pad(pad: int, horizon: int) -> int:
  return min(max(int(pad), 0), horizon - 1)


def window_starts(length: int, horizon: int, pad_before: int = 0,
                  pad_after: int = 0) -> np.ndarray:
  """Start steps of every window of one episode.

  Args:
    length: episode length L (>= 0).
    horizon: window length T (>= 1).
    pad_before: steps a window may start before the episode (clamped to [0, T - 1]).
    pad_after: steps a window may end after the episode (clamped to [0, T - 1]).

  Returns:
    (n_windows,) int64 starts, ascending; possibly negative (padded at the front).
  """
  if horizon < 1:
    raise ValueError(f'window horizon must be >= 1, got {horizon}')
  if length < 0:
    raise ValueError(f'episode length must be >= 0, got {length}')
  pad_before = _clamp_pad(pad_before, horizon)
  pad_after = _clamp_pad(pad_after, horizon)
  return np.arange(-pad_before, length - horizon + pad_after + 1, dtype=np.int64)


def window_indices(length: int, horizon: int, pad_before: int = 0,
                   pad_after: int = 0) -> np.ndarray:
  """In-episode step read by each step of each window, with edge padding.

  Returns:
    (n_windows, horizon) int64 array; row w, column k is the episode step that window w's
    k-th step repeats: clip(start_w + k, 0, L - 1).
  """
  starts = window_starts(length, horizon, pad_before, pad_after)
  steps = starts[:, None] + np.arange(horizon, dtype=np.int64)[None, :]
  return np.clip(steps, 0, max(length - 1, 0))


def num_windows(length: int, horizon: int, pad_before: int = 0, pad_after: int = 0) -> int:
  """Number of windows of one episode (the size of `window_starts`)."""
  return int(window_starts(length, horizon, pad_before, pad_after).shape[0])


def split_episodes(num_episodes: int, val_ratio: float,
                   seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Episode-level train/val split, as the reference `get_val_mask`.

  n_val = min(max(1, round(N * val_ratio)), N - 1) episodes are drawn without replacement with
  `np.random.default_rng(seed)`, so at least one episode always stays in train. Consequently a
  dataset of a single episode has no validation episode at all, and `val_ratio <= 0` disables
  validation.

  Returns:
    (train_idx, val_idx): sorted int64 episode indices, disjoint, together covering 0..N-1.
  """
  if num_episodes < 0:
    raise ValueError(f'number of episodes must be >= 0, got {num_episodes}')
  if not 0.0 <= val_ratio < 1.0:
    raise ValueError(f'val_ratio must be in [0, 1), got {val_ratio}')
  # None would mean a fresh random split, which a resumed run could not reproduce.
  if isinstance(seed, bool) or not isinstance(seed, (int, np.integer)) or seed < 0:
    raise ValueError(f'split seed must be an integer >= 0, got {seed!r}')
  val_mask = np.zeros(num_episodes, dtype=bool)
  if val_ratio > 0 and num_episodes > 1:
    n_val = min(max(1, round(num_episodes * val_ratio)), num_episodes - 1)
    rng = np.random.default_rng(seed=seed)
    val_mask[rng.choice(num_episodes, size=n_val, replace=False)] = True
  all_idx = np.arange(num_episodes, dtype=np.int64)
  return all_idx[~val_mask], all_idx[val_mask]
