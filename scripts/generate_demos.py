"""Writes scripted-expert Lift demonstrations to a robomimic hdf5 and prints the run's stats.

  python scripts/generate_demos.py --num_demos 200 --seed 0 --output data/lift_demos.hdf5
"""

import argparse
import json
import os
import sys

# Runnable as a plain script from a checkout: the package lives one directory up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from dpjax.data import demo_generation
from dpjax.errors import report_user_errors
# pylint: enable=g-import-not-at-top,wrong-import-position


def main(argv: list[str] | None = None) -> dict:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument('--num_demos', type=int, default=200,
                      help='successful demos to keep (default: 200)')
  parser.add_argument('--seed', type=int, default=0,
                      help='makes the whole file reproducible (default: 0)')
  parser.add_argument('--output', required=True, help='hdf5 path (replaced atomically)')
  parser.add_argument('--num_workers', type=int, default=0,
                      help='rendering processes; 0 = one per CPU core (default), 1 = in this '
                      'process')
  parser.add_argument('--image_size', type=int, default=84,
                      help='camera image side in pixels (default: 84, the size configs/lift.py '
                      'trains on)')
  parser.add_argument('--no_progress', action='store_true', help='hide the progress bar')
  args = parser.parse_args(argv)
  stats = demo_generation.generate_demos(
      args.output, num_demos=args.num_demos, seed=args.seed, num_workers=args.num_workers,
      image_size=args.image_size, progress=not args.no_progress)
  print(json.dumps(stats, indent=2))
  return stats


if __name__ == '__main__':
  report_user_errors(main)()
