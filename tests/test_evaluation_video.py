"""mp4 writing: side-by-side views, even dimensions, frames read back."""

import imageio.v2 as imageio
import numpy as np
import pytest

from dpjax.evaluation import video


def _frame(t, size=(5, 7)):
  return {'left': np.full(size + (3,), 10 * t, np.uint8),
          'right': np.full((4, 6, 3), 200, np.uint8)}


def test_side_by_side_pads_to_even_and_scales():
  image = video.side_by_side(_frame(1), ('left', 'right'), scale=1)
  # Heights 5 and 4 -> 5 (right view padded below), width 7 + 6 = 13 -> padded to 6 x 14.
  assert image.shape == (6, 14, 3)
  assert (image[:5, :7] == 10).all() and (image[:4, 7:13] == 200).all()
  assert (image[4, 7:13] == 0).all() and (image[5] == 0).all() and (image[:, 13] == 0).all()
  assert video.side_by_side(_frame(1), ('left', 'right'), scale=2).shape == (10, 26, 3)
  with pytest.raises(KeyError, match='missing'):
    video.side_by_side(_frame(1), ('left', 'missing'))


# imageio's ffmpeg subprocess forks (then execs at once) from a process where JAX's threads run.
@pytest.mark.filterwarnings('ignore:os.fork.. was called:RuntimeWarning')
def test_written_mp4_plays_back(tmp_path):
  frames = [_frame(t, size=(16, 16)) for t in range(12)]
  path = video.write_episode_video(tmp_path / video.episode_video_name('test', 7, False), frames,
                                   view_keys=('left', 'right'), fps=20, scale=2)
  assert path.endswith('test_7_failure.mp4')
  read = imageio.mimread(path, memtest=False)
  assert len(read) == 12 and read[0].shape == (32, 44, 3)
  # h264 is lossy: compare the left view's mean brightness, which ramps 0, 10, ..., 110.
  np.testing.assert_allclose([f[:, :32].mean() for f in read], [10 * t for t in range(12)],
                             atol=4)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['test_7_failure.mp4']


def test_a_rerun_replaces_the_earlier_runs_episode_videos(tmp_path):
  stale = tmp_path / video.episode_video_name('test', 100000, True)
  stale.write_bytes(b'old')
  notes = tmp_path / 'notes.mp4'
  notes.write_bytes(b'the user\'s own')
  video.prepare_video_dir(tmp_path)
  assert sorted(p.name for p in tmp_path.iterdir()) == ['notes.mp4']

  (tmp_path / 'a_file').write_text('')
  with pytest.raises(NotADirectoryError, match=r'a_file/videos'):
    video.prepare_video_dir(tmp_path / 'a_file' / 'videos')
