"""The evaluation runner: protocol and bookkeeping on a fake env, then the scripted expert in
real robosuite through the same batched interface."""

import h5py
import jax
import numpy as np
import pytest

from configs import lift
from dpjax.evaluation import runner, stats
# The workers unpickle the fake env by module name; that module imports nothing heavy.
from test_evaluation_vector_env import DIE_SEED, RAISE_SEED, FakeEnv, _alive


def _test_episodes(seeds):
  return [runner.EpisodeSpec('test', s) for s in seeds]


def _run(policy_fn, seeds, num_envs=2, max_steps=5, n_action_steps=2):
  return runner.run_episodes(policy_fn, FakeEnv, _test_episodes(seeds), rng=jax.random.key(0),
                             num_envs=num_envs, n_obs_steps=2, n_action_steps=n_action_steps,
                             max_steps=max_steps, headless_rendering=False)


class RecordingPolicy:
  """Zero actions; remembers every batch it was given."""

  def __init__(self):
    self.batches = []

  def __call__(self, obs, rng):
    self.batches.append(obs)
    return np.zeros((obs['seed'].shape[0], 2, 7), np.float32)


def test_episodes_results_and_aggregate():
  # FakeEnv succeeds at step seed % 5 + 2; chunks of 2, max 5 steps: seed 4 never succeeds.
  policy = RecordingPolicy()
  run = _run(policy, [0, 1, 2, 3, 4])
  episodes = run['episodes']
  assert [e['seed'] for e in episodes] == [0, 1, 2, 3, 4]
  assert [e['steps'] for e in episodes] == [2, 3, 4, 5, 5]
  assert [e['success'] for e in episodes] == [True, True, True, True, False]
  assert [e['max_reward'] for e in episodes] == [1.0, 1.0, 1.0, 1.0, 0.0]
  assert not any(e['crashed'] for e in episodes)
  assert all(b['seed'].shape == (2, 2, 1) for b in policy.batches)
  assert run['timing']['env_steps'] == 19 and run['timing']['policy_calls'] == len(policy.batches)
  agg = runner.aggregate(episodes)
  assert agg['success_rate'] == 0.8 and agg['mean_steps'] == 3.8
  assert agg['success_ci95'] == list(stats.wilson_interval(4, 5))


def test_crashed_workers_fail_only_their_episodes():
  run = _run(RecordingPolicy(), [0, RAISE_SEED, 1, DIE_SEED, 2])
  by_seed = {e['seed']: e for e in run['episodes']}
  assert by_seed[RAISE_SEED]['crashed'] and 'fake env failure' in by_seed[RAISE_SEED][
      'crash_reason']
  assert by_seed[DIE_SEED]['crashed'] and 'exit code 3' in by_seed[DIE_SEED]['crash_reason']
  assert not by_seed[RAISE_SEED]['success'] and not by_seed[DIE_SEED]['success']
  assert all(by_seed[s]['success'] and not by_seed[s]['crashed'] for s in (0, 1, 2))
  assert runner.aggregate(run['episodes'])['num_crashed'] == 2


def test_non_finite_action_names_seed_and_step_and_stops_workers():
  pids = set()

  def policy(obs, rng):
    pids.update(int(p) for p in obs['pid'][:, -1, 0])
    actions = np.zeros((2, 2, 7), np.float32)
    # Seed 3's chunk that starts after 2 steps: its second action is env step 3 (0-based).
    for row in range(2):
      if obs['seed'][row, -1, 0] == 3 and obs['count'][row, -1, 0] == 2:
        actions[row, 1, 4] = np.nan
    return actions

  with pytest.raises(runner.NonFiniteActionError, match=r'seed 3 at env step 3\b'):
    _run(policy, [0, 3, 1], max_steps=10)
  assert len(pids) == 2 and not any(_alive(p) for p in pids)


def test_train_episodes_start_from_the_first_demos_initial_states(tmp_path):
  path = tmp_path / 'demos.hdf5'
  with h5py.File(path, 'w') as f:
    for index in (0, 1, 2, 10):  # Numeric order puts demo_10 last.
      # FakeEnv.reset_to_state takes state[0] as its seed; later states must be ignored.
      f.create_dataset(f'data/demo_{index}/states', data=[[20.0 + index], [99.0]])
  settings = runner.resolve_settings(lift.get_config('smoke'), num_episodes=1, num_envs=2,
                                     num_train_episodes=3, seed_start=7)
  episodes = runner.make_episodes(settings, str(path), record=False)
  assert [(e.kind, e.demo) for e in episodes] == [
      ('test', None), ('train', 'demo_0'), ('train', 'demo_1'), ('train', 'demo_2')]
  policy = RecordingPolicy()
  run = runner.run_episodes(policy, FakeEnv, episodes, rng=jax.random.key(0), num_envs=2,
                            n_obs_steps=2, n_action_steps=2, max_steps=5,
                            headless_rendering=False)
  seen_seeds = {int(b['seed'][row, 0, 0]) for b in policy.batches for row in range(2)}
  assert seen_seeds == {7, 20, 21, 22}
  # Seeds 7, 20, 21, 22 succeed at steps 4, 2, 3, 4.
  assert [e['steps'] for e in run['episodes']] == [4, 2, 3, 4]
  with pytest.raises(ValueError, match='5 train episodes asked for, the file has 4 demos'):
    runner.train_initial_states(str(path), 5)


def test_settings_refuse_seeds_numpy_cannot_take_before_any_episode_runs():
  config = lift.get_config('smoke')
  last = 2**32 - 1
  assert runner.resolve_settings(config, num_episodes=2, seed_start=last - 1).seed_start == last - 1
  for seed_start in (-1, last):
    with pytest.raises(ValueError, match=rf'seed_start={seed_start} is out of range.*2 test '
                       r'episodes use seeds seed_start, seed_start \+ 1'):
      runner.resolve_settings(config, num_episodes=2, seed_start=seed_start)


class FakeJaxPolicy:
  """A `predict_action`-like jitted function that counts its traces."""

  def __init__(self):
    self.trace_count = 0
    self.predict = jax.jit(self._predict)

  def _predict(self, obs, rng):
    self.trace_count += 1
    noise = 0.0 * jax.random.uniform(rng, (obs['count'].shape[0], 2, 7))
    return noise + 0.1 * obs['count'][:, -1:, :1]


def test_padded_batches_never_recompile():
  fake = FakeJaxPolicy()
  batches = []

  def policy_fn(obs, rng):
    batches.append(obs)
    return np.asarray(fake.predict(obs, rng))

  # Slot 0 runs seeds 0 and 5 (one chunk each), slot 1 seed 4 (three chunks): the last call
  # has one active env and a padded row.
  run = _run(policy_fn, [0, 4, 5], max_steps=6)
  assert [e['steps'] for e in run['episodes']] == [2, 6, 2]
  assert len(batches) == 3
  np.testing.assert_array_equal(batches[-1]['seed'][:, -1, 0], [4, 4])  # Row 0 is padding.
  assert fake.trace_count == 1


def test_scripted_expert_succeeds_in_robosuite():
  # The expert reads privileged state only, so rendering is off here to keep the test fast;
  # tests/test_launch.py runs the rendered path (policy, cameras, video) through scripts/eval.py.
  config = lift.get_config()
  result = runner.evaluate_expert(config, num_episodes=4, num_envs=2, use_cameras=False,
                                  progress=False)
  episodes = result['episodes']
  assert [e['seed'] for e in episodes] == [100000, 100001, 100002, 100003]
  assert result['test']['num_success'] == 4, runner.format_summary(result)
  assert all(0 < e['steps'] < config.eval.max_steps for e in episodes)
  assert result['scalars']['test/success_rate'] == 1.0
  assert 'test : success 4/4 = 1.000' in runner.format_summary(result)
