"""Writes an episode's camera frames as an mp4: the views side by side, h264 / yuv420p."""

import os
import re
import warnings
from collections.abc import Sequence

import imageio.v2 as imageio
import numpy as np

DEFAULT_VIEW_KEYS = ('agentview_image', 'robot0_eye_in_hand_image')


def side_by_side(frame: dict[str, np.ndarray], view_keys: Sequence[str], scale: int = 1
                 ) -> np.ndarray:
  """Concatenates the views of one step along the width; (H * scale, W_total * scale, 3) uint8.

  Views of different heights are bottom-padded with black to the tallest; the result is padded
  to even dimensions, which yuv420p requires.
  """
  views = []
  for key in view_keys:
    if key not in frame:
      raise KeyError(f'video: frame has no view {key!r}; it has {sorted(frame)}')
    view = np.asarray(frame[key])
    if view.ndim != 3 or view.shape[2] != 3 or view.dtype != np.uint8:
      raise ValueError(f'video: view {key!r} must be (H, W, 3) uint8, got {view.shape} '
                       f'{view.dtype}')
    views.append(view)
  height = max(v.shape[0] for v in views)
  views = [np.pad(v, ((0, height - v.shape[0]), (0, 0), (0, 0))) for v in views]
  image = np.concatenate(views, axis=1)
  if scale > 1:
    # Nearest neighbour keeps the 84-pixel frames the policy saw crisp at a watchable size.
    image = image.repeat(scale, axis=0).repeat(scale, axis=1)
  pad_h, pad_w = image.shape[0] % 2, image.shape[1] % 2
  if pad_h or pad_w:
    image = np.pad(image, ((0, pad_h), (0, pad_w), (0, 0)))
  return image


def episode_video_name(kind: str, seed: int, success: bool) -> str:
  """e.g. 'test_100003_success.mp4'."""
  return f'{kind}_{seed}_{"success" if success else "failure"}.mp4'


_EPISODE_VIDEO = re.compile(r'^(test|train)_\d+_(success|failure)\.mp4$')


def prepare_video_dir(video_dir: str | os.PathLike[str]) -> None:
  """Creates `video_dir` (before any episode runs, so a bad path fails early) and removes the
  episode videos an earlier evaluation left there: a rerun whose episode now fails would
  otherwise sit beside the old run's video of its success."""
  video_dir = os.fspath(video_dir)
  os.makedirs(video_dir, exist_ok=True)
  for name in os.listdir(video_dir):
    if _EPISODE_VIDEO.match(name):
      os.remove(os.path.join(video_dir, name))


def write_episode_video(path: str | os.PathLike[str], frames: Sequence[dict[str, np.ndarray]],
                        view_keys: Sequence[str] = DEFAULT_VIEW_KEYS, fps: int = 20,
                        scale: int = 2) -> str:
  """Writes `frames` (one {view_key: (H, W, 3) uint8} per step) to `path`; returns the path.

  Written to a temporary name and renamed, so a reader never sees a half-written video.
  """
  if not frames:
    raise ValueError(f'video {os.fspath(path)!r}: no frames to write')
  path = os.fspath(path)
  os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
  temp_path = path + '.partial.mp4'
  try:
    with warnings.catch_warnings():
      # Python warns about any fork in a process with threads (JAX's); ffmpeg is started with
      # fork + exec, which is safe.
      warnings.filterwarnings('ignore', message=r'os\.fork\(\) was called',
                              category=RuntimeWarning)
      # macro_block_size=1: dimensions are already even; the default (16) would rescale them.
      with imageio.get_writer(temp_path, format='FFMPEG', mode='I', fps=fps, codec='libx264',
                              pixelformat='yuv420p', macro_block_size=1) as writer:
        for frame in frames:
          writer.append_data(side_by_side(frame, view_keys, scale))
    os.replace(temp_path, path)
  finally:
    if os.path.exists(temp_path):
      os.remove(temp_path)
  return path
