"""Wilson score interval against hand-computed values."""

import pytest

from dpjax.evaluation.stats import wilson_interval


def test_wilson_45_of_50():
  # z = 1.959964, z²/n = 0.076829; centre = (0.9 + 0.038415) / 1.076829 = 0.871462;
  # margin = z·sqrt(0.9·0.1/50 + z²/(4·50²)) / 1.076829 = 1.959964·0.046735 / 1.076829
  #        = 0.085064; bounds = centre ∓ margin.
  low, high = wilson_interval(45, 50)
  assert low == pytest.approx(0.786399, abs=1e-5)
  assert high == pytest.approx(0.956525, abs=1e-5)


def test_wilson_edges_stay_informative():
  # All successes: high is 1, low = n / (n + z²) = 50 / 53.841459 = 0.928652.
  low, high = wilson_interval(50, 50)
  assert (low, high) == (pytest.approx(0.928652, abs=1e-5), 1.0)
  low, high = wilson_interval(0, 50)
  assert (low, high) == (0.0, pytest.approx(1 - 0.928652, abs=1e-5))
  # 1/2 is symmetric about 0.5: centre 0.5, margin = z·sqrt(1/8 + z²/16)/(1 + z²/2).
  low, high = wilson_interval(1, 2)
  assert low == pytest.approx(0.094531, abs=1e-5) and high == pytest.approx(0.905469, abs=1e-5)


def test_wilson_rejects_bad_counts():
  with pytest.raises(ValueError, match='trials'):
    wilson_interval(0, 0)
  with pytest.raises(ValueError, match='successes'):
    wilson_interval(6, 5)
