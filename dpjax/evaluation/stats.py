"""Confidence intervals for success rates measured on a finite number of episodes."""

import math
import statistics


def wilson_interval(successes: int, trials: int, confidence: float = 0.95) -> tuple[float, float]:
  """Wilson score interval for a binomial proportion.

  Unlike the normal ("Wald") interval it stays inside [0, 1] and does not collapse to a point
  at 0 % or 100 %, which is where policy evaluations usually land.

  Args:
    successes: number of successful episodes, 0 <= successes <= trials.
    trials: number of episodes, > 0.
    confidence: two-sided coverage, in (0, 1).

  Returns:
    (low, high), the bounds of the interval.
  """
  if trials <= 0:
    raise ValueError(f'wilson_interval: trials must be > 0, got {trials}')
  if not 0 <= successes <= trials:
    raise ValueError(f'wilson_interval: successes must be in [0, {trials}], got {successes}')
  if not 0.0 < confidence < 1.0:
    raise ValueError(f'wilson_interval: confidence must be in (0, 1), got {confidence}')
  z = statistics.NormalDist().inv_cdf(0.5 + confidence / 2.0)
  p = successes / trials
  z2_n = z * z / trials
  denominator = 1.0 + z2_n
  center = (p + z2_n / 2.0) / denominator
  margin = z * math.sqrt(p * (1.0 - p) / trials + z2_n / (4.0 * trials)) / denominator
  # Clamp float round-off at the edges (p = 0 or 1 gives exactly 0 or 1 in exact arithmetic).
  return max(0.0, center - margin), min(1.0, center + margin)
