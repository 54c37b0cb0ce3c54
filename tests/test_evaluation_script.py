"""scripts/eval.py end to end: a smoke-trained run (launch.py) evaluated in rendered robosuite."""

import json
import os
import subprocess
import sys

import imageio.v2 as imageio
import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _run(args, timeout):
  result = subprocess.run([sys.executable] + args, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout, check=False)
  assert result.returncode == 0, f'{args[0]} failed:\n{result.stderr[-4000:]}'
  return result.stdout


# subprocess forks (then execs at once) from a process where JAX's threads run: safe.
@pytest.mark.filterwarnings('ignore:os.fork.. was called:RuntimeWarning')
def test_eval_script_on_a_smoke_trained_checkpoint(tmp_path):
  workdir = tmp_path / 'run'
  _run(['launch.py', '--config', 'configs/lift.py:smoke', '--workdir', str(workdir),
        f'--config.data.data_dir={tmp_path / "data"}'], timeout=480)
  latest_step = max(int(n) for n in os.listdir(workdir / 'checkpoints') if n.isdigit())

  output_dir = tmp_path / 'eval'
  stdout = _run(['scripts/eval.py', '--workdir', str(workdir), '--num_episodes', '1',
                 '--num_envs', '1', '--video_episodes', '1', '--sampler', 'ddim',
                 '--num_inference_steps', '2', '--n_action_steps', '4',
                 '--output_dir', str(output_dir), '--no_progress'], timeout=300)

  assert 'evaluation of lift_smoke (diffusion, 1 envs)' in stdout
  result = json.loads((output_dir / 'eval.json').read_text())
  assert result['config_name'] == 'lift_smoke'
  assert result['checkpoint_step'] == latest_step
  assert result['settings']['sampler'] == 'ddim'
  assert result['settings']['num_inference_steps'] == 2
  assert result['settings']['n_action_steps'] == 4  # The checkpoint's config says 8.
  (episode,) = result['episodes']
  assert episode['seed'] == 100000 and not episode['crashed']
  assert 0 < episode['steps'] <= 40  # smoke: max_steps 40.
  assert result['test']['num_episodes'] == 1
  assert result['test']['success_rate'] == float(episode['success'])
  low, high = result['test']['success_ci95']
  assert 0.0 <= low <= result['test']['success_rate'] <= high <= 1.0
  assert result['timing']['env_steps'] == episode['steps']
  assert result['timing']['policy_calls'] == -(-episode['steps'] // 4)
  assert set(result['scalars']) >= {'test/success_rate', 'eval/env_steps_per_s',
                                    'eval/policy_share'}

  outcome = 'success' if episode['success'] else 'failure'
  assert os.listdir(output_dir / 'videos') == [f'test_100000_{outcome}.mp4']
  assert episode['video'] == str(output_dir / 'videos' / f'test_100000_{outcome}.mp4')
  frames = imageio.mimread(episode['video'], memtest=False)
  # One frame per observation (reset + each step): agentview and wrist view side by side, 2x.
  assert len(frames) == episode['steps'] + 1
  assert frames[0].shape == (168, 336, 3)
  # Both halves show a rendered scene, not a blank frame.
  assert frames[0][:, :168].std() > 5 and frames[0][:, 168:].std() > 5
