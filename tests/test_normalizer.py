"""Normaliser maths against hand values, modes per key, JSON round trip and errors (SPEC §3)."""

import json
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from dpjax.data.normalizer import Normalizer
from dpjax.data.shape_meta import ObsSpec, ShapeMeta

SHAPE_META = ShapeMeta(obs=(
    ObsSpec('agentview_image', 'rgb', (8, 8, 3)),
    ObsSpec('robot0_eef_pos', 'low_dim', (3,)),
    ObsSpec('robot0_eef_quat', 'low_dim', (4,)),
    ObsSpec('robot0_gripper_qpos', 'low_dim', (2,)),
), action_dim=7)

# eef_pos: dim 0 spans [2, 6], dim 1 spans [-1, 3], dim 2 is constant 5.
EEF_POS = np.array([[2.0, -1.0, 5.0], [6.0, 3.0, 5.0], [4.0, 0.0, 5.0]], np.float32)
# gripper: dim 0 spans [0, 0.04]; dim 1's range 5e-5 is below 1e-4, so it counts as constant.
GRIPPER = np.array([[0.0, 1.0], [0.04, 1.00005], [0.02, 1.0]], np.float32)


def _fitted():
  return Normalizer.fit({'robot0_eef_pos': EEF_POS, 'robot0_gripper_qpos': GRIPPER},
                        SHAPE_META)


def test_limits_against_hand_values():
  norm = _fitted()
  np.testing.assert_allclose(norm.scale['robot0_eef_pos'], [0.5, 0.5, 1.0])
  np.testing.assert_allclose(norm.offset['robot0_eef_pos'], [-2.0, -0.5, -5.0])
  np.testing.assert_allclose(norm.normalize('robot0_eef_pos', EEF_POS),
                             [[-1, -1, 0], [1, 1, 0], [0, -0.5, 0]], atol=1e-6)
  np.testing.assert_allclose(norm.scale['robot0_gripper_qpos'], [50.0, 1.0], rtol=1e-6)
  np.testing.assert_allclose(norm.offset['robot0_gripper_qpos'], [-1.0, -1.0], rtol=1e-6)
  np.testing.assert_allclose(norm.normalize('robot0_gripper_qpos', GRIPPER)[:, 1], [0, 5e-5, 0],
                             atol=1e-6)
  assert norm.mode('robot0_eef_pos') == 'limits'


def test_identity_and_image_keys():
  norm = _fitted()
  quat = np.array([[0.1, -0.2, 0.3, 0.9]], np.float32)
  np.testing.assert_array_equal(norm.normalize('robot0_eef_quat', quat), quat)
  action = np.linspace(-1, 1, 14, dtype=np.float32).reshape(2, 7)
  np.testing.assert_array_equal(norm.normalize('action', action), action)
  image = np.zeros((2, 1, 8, 8, 3), np.uint8)
  image[0], image[1] = 255, 51
  out = norm.normalize('agentview_image', image)
  assert out.dtype == jnp.float32 and out.shape == image.shape
  np.testing.assert_allclose(out[0], 1.0, atol=1e-6)
  np.testing.assert_allclose(out[1], 51 / 255 * 2 - 1, atol=1e-6)
  np.testing.assert_allclose(norm.normalize('agentview_image', np.zeros((8, 8, 3), np.uint8)),
                             -1.0)
  assert [norm.mode(k) for k in ('agentview_image', 'robot0_eef_quat', 'action')] == [
      'image', 'identity', 'identity']
  assert set(norm.keys) == set(SHAPE_META.keys) | {'action'}


def test_unnormalize_inverts_normalize_under_jit():
  norm = _fitted()
  x = np.random.default_rng(0).normal(size=(4, 2, 3)).astype(np.float32) * 3

  @jax.jit
  def round_trip(n, v):
    return n.unnormalize('robot0_eef_pos', n.normalize('robot0_eef_pos', v))

  np.testing.assert_allclose(round_trip(norm, x), x, rtol=1e-5, atol=1e-5)
  image = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1).repeat(3, axis=-1)[:, :8, :8]
  np.testing.assert_allclose(
      norm.unnormalize('agentview_image', norm.normalize('agentview_image', image)), image,
      atol=1e-4)


def test_fit_from_episodes_matches_fit_from_arrays():
  episodes = [types.SimpleNamespace(
      obs={'robot0_eef_pos': EEF_POS[i:i + 1], 'robot0_gripper_qpos': GRIPPER[i:i + 1],
           'robot0_eef_quat': np.zeros((1, 4), np.float32)},
      actions=np.zeros((1, 7), np.float32)) for i in range(3)]
  a, b = Normalizer.fit(episodes, SHAPE_META), _fitted()
  for key in b.keys:
    np.testing.assert_array_equal(a.scale[key], b.scale[key])
    np.testing.assert_array_equal(a.offset[key], b.offset[key])


def test_json_round_trip_is_exact(tmp_path):
  norm = _fitted()
  path = tmp_path / 'sub' / 'normalizer.json'
  norm.save(path)
  loaded = Normalizer.load(path, SHAPE_META)
  assert loaded.modes == norm.modes
  for key in norm.keys:
    np.testing.assert_array_equal(loaded.scale[key], norm.scale[key])
    np.testing.assert_array_equal(loaded.offset[key], norm.offset[key])
  assert Normalizer.from_json(norm.to_json()).to_json() == norm.to_json()
  assert sorted(p.name for p in path.parent.iterdir()) == ['normalizer.json']


def test_load_errors_are_clear(tmp_path):
  with pytest.raises(FileNotFoundError, match='nowhere.json'):
    Normalizer.load(tmp_path / 'nowhere.json')
  bad = tmp_path / 'bad.json'
  bad.write_text('{"format": "dpjax.normalizer", "keys": {')
  with pytest.raises(ValueError, match='bad.json.*not valid JSON'):
    Normalizer.load(bad)
  doc = json.loads(_fitted().to_json())
  del doc['keys']['robot0_eef_quat']
  partial = tmp_path / 'partial.json'
  partial.write_text(json.dumps(doc))
  Normalizer.load(partial)  # Without a shape_meta nothing is required.
  with pytest.raises(ValueError, match="partial.json.*robot0_eef_quat"):
    Normalizer.load(partial, SHAPE_META)
  doc = json.loads(_fitted().to_json())
  doc['keys']['action']['scale'] = [1.0] * 6
  with pytest.raises(ValueError, match="'action'.*equal"):
    Normalizer.from_json(json.dumps(doc))
  doc['keys']['action']['offset'] = [0.0] * 6
  with pytest.raises(ValueError, match="'action' has 6 channels, expected 7"):
    Normalizer.from_json(json.dumps(doc), SHAPE_META)
  doc = json.loads(_fitted().to_json())
  doc['keys']['agentview_image']['mode'] = 'identity'
  with pytest.raises(ValueError, match="camera 'agentview_image' has mode 'identity', expected "
                     "'image'"):
    Normalizer.from_json(json.dumps(doc), SHAPE_META)


def test_usage_errors_name_the_key():
  norm = _fitted()
  with pytest.raises(KeyError, match='object'):
    norm.normalize('object', np.zeros(3))
  with pytest.raises(ValueError, match="robot0_eef_pos.*3 channels"):
    norm.normalize('robot0_eef_pos', np.zeros((2, 4)))
  with pytest.raises(KeyError, match='robot0_gripper_qpos'):
    Normalizer.fit({'robot0_eef_pos': EEF_POS}, SHAPE_META)
  with pytest.raises(ValueError, match='non-finite'):
    Normalizer.fit({'robot0_eef_pos': EEF_POS * np.nan, 'robot0_gripper_qpos': GRIPPER},
                   SHAPE_META)
