"""Reference multi-step semantics on a fake env whose observations count its steps."""

import numpy as np
import pytest

from dpjax.evaluation.multistep import MultiStepWrapper


class CountingEnv:
  """obs 'count' = steps since reset; succeeds (reward 1) only at step `success_step`."""

  def __init__(self, success_step=None):
    self.success_step = success_step
    self.actions = []
    self.t = 0

  def _obs(self):
    return {'count': np.array([self.t], np.float64),
            'image': np.full((2, 2, 3), self.t, np.uint8),
            'privileged': np.zeros(1)}

  def reset(self, seed=None):
    self.t = 0
    self.actions = []
    return self._obs()

  def reset_to_state(self, state):
    self.reset()
    self.t = int(state[0])
    return self._obs()

  def step(self, action):
    self.actions.append(np.array(action))
    self.t += 1
    return self._obs(), float(self.is_success()), False, {}

  def is_success(self):
    return self.t == self.success_step


def _chunk(n, start=0):
  return np.arange(start, start + n, dtype=np.float32)[:, None] * np.ones((1, 7), np.float32)


def test_reset_repeats_first_frame_and_history_slides():
  wrapper = MultiStepWrapper(CountingEnv(), n_obs_steps=3, n_action_steps=1, max_steps=400)
  obs = wrapper.reset(seed=0)
  assert obs['count'].shape == (3, 1) and obs['image'].shape == (3, 2, 2, 3)
  np.testing.assert_array_equal(obs['count'][:, 0], [0, 0, 0])
  obs, *_ = wrapper.step(_chunk(1))
  np.testing.assert_array_equal(obs['count'][:, 0], [0, 0, 1])
  obs, *_ = wrapper.step(_chunk(1))
  obs, *_ = wrapper.step(_chunk(1))
  np.testing.assert_array_equal(obs['count'][:, 0], [1, 2, 3])
  np.testing.assert_array_equal(obs['image'][:, 0, 0, 0], [1, 2, 3])
  # A new episode forgets the old history.
  obs = wrapper.reset_to_state(np.array([7.0]))
  np.testing.assert_array_equal(obs['count'][:, 0], [7, 7, 7])


def test_chunk_executes_every_action_in_order_and_returns_last_to_frames():
  env = CountingEnv()
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=8, max_steps=400)
  wrapper.reset()
  actions = _chunk(8, start=10)
  obs, reward, done, info = wrapper.step(actions)
  np.testing.assert_array_equal(np.stack(env.actions), actions)
  np.testing.assert_array_equal(obs['count'][:, 0], [7, 8])
  assert (reward, done, info) == (0.0, False, {'success': False, 'steps': 8})
  assert obs['count'].dtype == np.float32  # float64 from the env is cast for stable batches.
  assert obs['image'].dtype == np.uint8


def test_success_stops_inside_the_chunk():
  env = CountingEnv(success_step=5)
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=4, max_steps=400)
  wrapper.reset()
  _, reward, done, _ = wrapper.step(_chunk(4))
  assert (reward, done) == (0.0, False)
  obs, reward, done, info = wrapper.step(_chunk(4, start=4))
  assert len(env.actions) == 5  # Actions 6..8 of the chunk are never executed.
  np.testing.assert_array_equal(obs['count'][:, 0], [4, 5])
  assert (reward, done, info) == (1.0, True, {'success': True, 'steps': 5})
  with pytest.raises(RuntimeError, match='call reset'):
    wrapper.step(_chunk(4))


def test_without_terminate_on_success_reward_is_max_over_episode():
  # The fake reward is 1 only at step 5 and 0 after; the episode score must stay 1.
  env = CountingEnv(success_step=5)
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=4, max_steps=12,
                             terminate_on_success=False)
  wrapper.reset()
  wrapper.step(_chunk(4))
  _, reward, done, info = wrapper.step(_chunk(4))
  assert (reward, done, info) == (1.0, False, {'success': True, 'steps': 8})
  _, reward, done, info = wrapper.step(_chunk(4))
  assert (reward, done, info) == (1.0, True, {'success': True, 'steps': 12})


def test_max_steps_cuts_the_last_chunk():
  env = CountingEnv()
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=4, max_steps=10)
  wrapper.reset()
  results = [wrapper.step(_chunk(4)) for _ in range(3)]
  assert [r[2] for r in results] == [False, False, True]
  assert results[-1][3]['steps'] == 10 and len(env.actions) == 10
  np.testing.assert_array_equal(results[-1][0]['count'][:, 0], [9, 10])


def test_obs_keys_select_and_recording_keeps_every_frame():
  wrapper = MultiStepWrapper(CountingEnv(), n_obs_steps=2, n_action_steps=3, max_steps=400,
                             obs_keys=('count',))
  obs = wrapper.reset(record_keys=('image',))
  assert set(obs) == {'count'}
  wrapper.step(_chunk(3))
  assert [f['image'][0, 0, 0] for f in wrapper.recorded] == [0, 1, 2, 3]
  with pytest.raises(ValueError, match=r'n_action_steps=3'):
    wrapper.step(_chunk(2))
  bad = MultiStepWrapper(CountingEnv(), 2, 1, 400, obs_keys=('missing',))
  with pytest.raises(KeyError, match='missing'):
    bad.reset()


class RenderToggleEnv(CountingEnv):
  """Leaves 'image' out of obs while rendering is off; logs the steps it rendered."""

  def __init__(self, success_step=None):
    super().__init__(success_step)
    self.render = True
    self.rendered_steps = []

  def set_camera_rendering(self, enabled):
    self.render = enabled

  def _obs(self):
    obs = super()._obs()
    if self.render:
      self.rendered_steps.append(self.t)
    else:
      del obs['image']
    return obs


def test_only_frames_the_policy_can_see_are_rendered():
  env = RenderToggleEnv()
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=8, max_steps=400)
  obs = wrapper.reset()
  for _ in range(2):
    obs, *_ = wrapper.step(_chunk(8))
    np.testing.assert_array_equal(obs['image'][:, 0, 0, 0], obs['count'][:, 0])
  # The reset frame, then steps 7-8 and 15-16: the last To of each chunk.
  assert env.rendered_steps == [0, 7, 8, 15, 16]
  np.testing.assert_array_equal(obs['count'][:, 0], [15, 16])
  # Recording renders every step; so does a wrapper told not to skip.
  wrapper.reset(record_keys=('image',))
  wrapper.step(_chunk(8))
  assert env.rendered_steps[-9:] == list(range(9))
  env = RenderToggleEnv()
  wrapper = MultiStepWrapper(env, 2, 8, 400, skip_unused_renders=False)
  wrapper.reset()
  wrapper.step(_chunk(8))
  assert env.rendered_steps == list(range(9))


def test_unrendered_frames_repeat_the_last_image_when_the_episode_ends_early():
  env = RenderToggleEnv(success_step=3)
  wrapper = MultiStepWrapper(env, n_obs_steps=2, n_action_steps=8, max_steps=400)
  wrapper.reset()
  obs, reward, done, _ = wrapper.step(_chunk(8))
  assert (reward, done) == (1.0, True) and env.rendered_steps == [0]
  np.testing.assert_array_equal(obs['count'][:, 0], [2, 3])
  np.testing.assert_array_equal(obs['image'][:, 0, 0, 0], [0, 0])
