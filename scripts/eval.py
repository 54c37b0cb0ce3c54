"""Evaluates a trained policy (or the scripted expert) in robosuite Lift; writes eval.json + videos.

  python scripts/eval.py --workdir runs/my_run              # latest checkpoint of a run
  python scripts/eval.py --checkpoint runs/my_run/policy    # an exported policy, or a step dir
  python scripts/eval.py --policy expert --num_episodes 50  # the scripted expert, same runner

Writes <output_dir>/eval.json (per-episode results, aggregates with 95 % Wilson intervals,
timing, checkpoint step, config name), <output_dir>/videos/*.mp4 for the first
--video_episodes test episodes, and prints a one-screen summary.
"""

import argparse
import os
import sys

# Runnable as a plain script from a checkout: the package lives one directory up.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# pylint: disable=g-import-not-at-top,wrong-import-position
from dpjax.envs.rendering import configure_headless_rendering

# Before JAX starts its threads: choosing the GL backend may probe it in a child process, and
# the env workers inherit the choice.
configure_headless_rendering()

import jax

from configs import lift
from dpjax.errors import InputError, report_user_errors
from dpjax.evaluation import runner
from dpjax.training import checkpointing
# pylint: enable=g-import-not-at-top,wrong-import-position


def checkpoint_step(path: str) -> int | None:
  """The training step a `load_policy` path stands for; None for an export (no step)."""
  path = os.path.abspath(path)
  if os.path.isdir(os.path.join(path, checkpointing.CHECKPOINTS_DIR)):
    path = os.path.join(path, checkpointing.CHECKPOINTS_DIR)
  if os.path.basename(path).isdigit():
    return int(os.path.basename(path))
  if os.path.isdir(path):
    steps = [int(n) for n in os.listdir(path)
             if n.isdigit() and os.path.isdir(os.path.join(path, n))]
    if steps:
      return max(steps)
  return None


def _seed_suffix(seed: int) -> str:
  """Another seed's results go to a folder of their own, not over seed 0's."""
  return '' if seed == 0 else f'_seed{seed}'


def default_output_dir(source: str, seed: int = 0) -> str:
  """Where an evaluation of `source` goes without --output_dir: in the workdir, beside what
  training manages rather than inside it (the next export replaces the policy folder wholesale,
  and orbax deletes a step's folder when it prunes the step).

  runs/X -> runs/X/eval; runs/X/checkpoints -> runs/X/eval (its latest step);
  runs/X/checkpoints/400 -> runs/X/eval_step_400; runs/X/policy -> runs/X/eval_policy;
  with a sampling seed other than 0, `_seed<N>` is appended (runs/X/eval_seed1).
  """
  path = os.path.abspath(source)
  parent, name = os.path.split(path)
  if name.isdigit():
    folder, name = os.path.dirname(parent), f'eval_step_{name}'
  elif name == checkpointing.CHECKPOINTS_DIR:
    folder, name = parent, 'eval'
  elif checkpointing.is_policy_export(path):
    folder, name = parent, f'eval_{name}'
  else:
    folder, name = path, 'eval'
  return os.path.join(folder, name + _seed_suffix(seed))


def _positive_int(text: str) -> int:
  value = int(text)
  if value < 1:
    raise argparse.ArgumentTypeError(f'must be >= 1, got {value}')
  return value


def parse_args(argv: list[str] | None) -> argparse.Namespace:
  defaults = lift.get_config().eval
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  # One input under two names (README and older commands use both); `load_policy` tells the
  # kinds of folder apart.
  source = parser.add_mutually_exclusive_group()
  source.add_argument('--workdir', metavar='DIR',
                      help='what to evaluate: a training run directory (its latest checkpoint), '
                      'its checkpoints dir, one checkpoint step dir or an exported policy dir; '
                      '--checkpoint is another name for it')
  source.add_argument('--checkpoint', metavar='DIR',
                      help='the same input as --workdir, under another name')
  parser.add_argument('--policy', choices=('diffusion', 'expert'), default='diffusion',
                      help='"expert": the scripted expert through the same runner')
  parser.add_argument('--config_variant', choices=lift.VARIANTS,
                      help='configs/lift.py variant for --policy expert (default: default); a '
                      'diffusion policy uses its checkpoint\'s config')
  parser.add_argument('--num_episodes', type=int, help='test episodes (default: config)')
  parser.add_argument('--num_train_episodes', type=int,
                      help='episodes from the first demos\' initial states (default: config)')
  parser.add_argument('--dataset_path', help='robomimic hdf5 for --num_train_episodes')
  parser.add_argument('--num_envs', type=int, help='parallel envs; 0 = one per core (default: '
                      f'config, {defaults.num_envs} in configs/lift.py)')
  parser.add_argument('--seed_start', type=int, help='seed of the first test episode (default: '
                      f'config, {defaults.seed_start} in configs/lift.py: the test seeds of the '
                      'README\'s results)')
  parser.add_argument('--video_episodes', type=int, help='test episodes to record (default: '
                      'config); 0 for none')
  parser.add_argument('--sampler', choices=('ddpm', 'ddim'), help='default: the checkpoint\'s')
  parser.add_argument('--num_inference_steps', type=_positive_int,
                      help='default: the checkpoint\'s')
  parser.add_argument('--n_action_steps', type=_positive_int,
                      help='actions executed per prediction (default: the checkpoint\'s)')
  parser.add_argument('--output_dir', help='default: in the run\'s workdir, eval/ (latest '
                      'checkpoint), eval_step_<N>/ or eval_policy/; runs/eval_expert for the '
                      'expert; with a --seed other than 0, _seed<N> appended (eval_seed1/). An '
                      'earlier evaluation there is replaced')
  parser.add_argument('--no_cameras', action='store_true',
                      help='expert only: skip rendering (it reads privileged state); no videos')
  parser.add_argument('--seed', type=int, default=0,
                      help='sampling noise / expert style seed (default: %(default)s)')
  parser.add_argument('--no_progress', action='store_true', help='hide the progress bar')
  args = parser.parse_args(argv)
  if args.policy == 'diffusion' and not (args.workdir or args.checkpoint):
    parser.error('give --workdir or --checkpoint (or --policy expert)')
  diffusion_only = (args.workdir, args.checkpoint, args.sampler, args.num_inference_steps,
                    args.n_action_steps)
  if args.policy == 'expert' and any(a is not None for a in diffusion_only):
    parser.error('--policy expert takes no --workdir/--checkpoint/--sampler/'
                 '--num_inference_steps/--n_action_steps')
  if args.config_variant is not None and args.policy != 'expert':
    parser.error('--config_variant is for --policy expert only (a diffusion policy runs with its '
                 'checkpoint\'s config)')
  if args.no_cameras and args.policy != 'expert':
    parser.error('--no_cameras is for --policy expert only (the policy sees the cameras)')
  return args


def _make_output_dir(output_dir: str) -> None:
  """Before any episode runs: a folder that cannot be written would lose the whole evaluation."""
  os.makedirs(output_dir, exist_ok=True)
  if not os.access(output_dir, os.W_OK):
    raise InputError(f'output folder {output_dir}: not writable')


def main(argv: list[str] | None = None) -> dict:
  args = parse_args(argv)
  common = dict(num_episodes=args.num_episodes, num_envs=args.num_envs,
                seed_start=args.seed_start, num_train_episodes=args.num_train_episodes,
                dataset_path=args.dataset_path, video_episodes=args.video_episodes,
                progress=not args.no_progress)
  if args.policy == 'expert':
    output_dir = os.path.abspath(
        args.output_dir or os.path.join('runs', 'eval_expert' + _seed_suffix(args.seed)))
    _make_output_dir(output_dir)
    config = lift.get_config(args.config_variant or 'default')
    step = None
    result = runner.evaluate_expert(
        config, seed=args.seed, use_cameras=not args.no_cameras,
        video_dir=None if args.no_cameras else os.path.join(output_dir, 'videos'), **common)
  else:
    source = args.workdir or args.checkpoint
    output_dir = os.path.abspath(args.output_dir or default_output_dir(source, args.seed))
    config, policy, variables = checkpointing.load_policy(source)
    # Before the output folder is made: a step count this checkpoint cannot take stops here.
    policy = runner.with_sampling(policy, config, args.sampler, args.num_inference_steps,
                                  args.n_action_steps)
    _make_output_dir(output_dir)
    step = checkpoint_step(source)
    result = runner.evaluate_policy(policy, variables, config, rng=jax.random.key(args.seed),
                                    video_dir=os.path.join(output_dir, 'videos'), **common)
  result['source'] = None if args.policy == 'expert' else os.path.abspath(source)
  # The runner takes a key (policy) or a style seed (expert) and records neither.
  result['settings']['seed'] = args.seed
  print(runner.format_summary(result))
  path = runner.write_eval_json(os.path.join(output_dir, 'eval.json'), result,
                                checkpoint_step=step, config_name=config.name)
  print(f'  wrote {path}')
  return result


if __name__ == '__main__':
  report_user_errors(main)()
