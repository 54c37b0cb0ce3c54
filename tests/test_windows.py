"""Window indices / padding and the episode split against hand-written expectations (SPEC §2)."""

import numpy as np
import pytest

from dpjax.data import windows

# Lift: horizon 10, n_obs_steps 2 -> pad_before 1, n_action_steps 8 -> pad_after 7.
T, PAD_BEFORE, PAD_AFTER = 10, 1, 7


def test_length_1_episode_has_no_window():
  assert windows.window_starts(1, T, PAD_BEFORE, PAD_AFTER).tolist() == []
  assert windows.window_indices(1, T, PAD_BEFORE, PAD_AFTER).shape == (0, T)


def test_length_3_episode_by_hand():
  assert windows.window_starts(3, T, PAD_BEFORE, PAD_AFTER).tolist() == [-1, 0]
  assert windows.window_indices(3, T, PAD_BEFORE, PAD_AFTER).tolist() == [
      [0, 0, 1, 2, 2, 2, 2, 2, 2, 2],
      [0, 1, 2, 2, 2, 2, 2, 2, 2, 2],
  ]


def test_length_12_episode_by_hand():
  assert windows.window_starts(12, T, PAD_BEFORE, PAD_AFTER).tolist() == list(range(-1, 10))
  assert windows.window_indices(12, T, PAD_BEFORE, PAD_AFTER).tolist() == [
      [0, 0, 1, 2, 3, 4, 5, 6, 7, 8],
      [0, 1, 2, 3, 4, 5, 6, 7, 8, 9],
      [1, 2, 3, 4, 5, 6, 7, 8, 9, 10],
      [2, 3, 4, 5, 6, 7, 8, 9, 10, 11],
      [3, 4, 5, 6, 7, 8, 9, 10, 11, 11],
      [4, 5, 6, 7, 8, 9, 10, 11, 11, 11],
      [5, 6, 7, 8, 9, 10, 11, 11, 11, 11],
      [6, 7, 8, 9, 10, 11, 11, 11, 11, 11],
      [7, 8, 9, 10, 11, 11, 11, 11, 11, 11],
      [8, 9, 10, 11, 11, 11, 11, 11, 11, 11],
      [9, 10, 11, 11, 11, 11, 11, 11, 11, 11],
  ]


@pytest.mark.parametrize('length', [1, 2, 3, 9, 10, 11, 12, 51, 200])
def test_reference_count_is_length_minus_one(length):
  assert windows.num_windows(length, T, PAD_BEFORE, PAD_AFTER) == length - 1


def test_no_padding_and_clamped_padding():
  assert windows.window_indices(5, 4).tolist() == [[0, 1, 2, 3], [1, 2, 3, 4]]
  assert windows.window_indices(3, 4).shape == (0, 4)
  # Pads beyond horizon - 1 are clamped to 3, as the reference's create_indices does.
  assert windows.window_starts(2, 4, 20, 20).tolist() == [-3, -2, -1, 0, 1]
  assert windows.window_indices(2, 4, 20, 20).tolist() == [
      [0, 0, 0, 0], [0, 0, 0, 1], [0, 0, 1, 1], [0, 1, 1, 1], [1, 1, 1, 1]]


def test_bad_arguments_raise():
  with pytest.raises(ValueError, match='horizon'):
    windows.window_starts(5, 0)
  with pytest.raises(ValueError, match='length'):
    windows.window_starts(-1, 4)
  with pytest.raises(ValueError, match='val_ratio'):
    windows.split_episodes(5, 1.0, 0)
  for seed in (None, -1, 1.5, True):
    with pytest.raises(ValueError, match=f'split seed must be an integer >= 0, got {seed}'):
      windows.split_episodes(5, 0.2, seed)


def _reference_val_mask(n_episodes, val_ratio, seed):
  """diffusion_policy.common.sampler.get_val_mask, verbatim logic."""
  val_mask = np.zeros(n_episodes, dtype=bool)
  if val_ratio <= 0:
    return val_mask
  n_val = min(max(1, round(n_episodes * val_ratio)), n_episodes - 1)
  rng = np.random.default_rng(seed=seed)
  val_idxs = rng.choice(n_episodes, size=n_val, replace=False)
  val_mask[val_idxs] = True
  return val_mask


@pytest.mark.parametrize('n, ratio, n_val', [(200, 0.02, 4), (100, 0.02, 2), (50, 0.02, 1),
                                             (3, 0.02, 1), (2, 0.9, 1), (10, 0.0, 0),
                                             (9, 0.3, 3), (30, 0.05, 2), (7, 0.5, 4)])
def test_split_sizes_and_reference_selection(n, ratio, n_val):
  train, val = windows.split_episodes(n, ratio, seed=42)
  assert len(val) == n_val and len(train) == n - n_val
  assert sorted(np.concatenate([train, val]).tolist()) == list(range(n))
  assert np.flatnonzero(_reference_val_mask(n, ratio, 42)).tolist() == val.tolist()


def test_single_episode_is_all_train():
  train, val = windows.split_episodes(1, 0.5, seed=42)
  assert train.tolist() == [0] and val.tolist() == []


def test_split_depends_on_seed_only():
  a = windows.split_episodes(200, 0.1, seed=1)[1]
  assert windows.split_episodes(200, 0.1, seed=1)[1].tolist() == a.tolist()
  assert windows.split_episodes(200, 0.1, seed=2)[1].tolist() != a.tolist()
