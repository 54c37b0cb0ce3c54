"""Learning curves are drawn from what the run recorded in metrics.jsonl."""

import matplotlib.image
import numpy as np

from dpjax.training import curves, metrics


def test_curves_png_from_recorded_metrics(tmp_path):
  writer = metrics.MetricWriter(tmp_path)
  for step in range(1, 21):
    writer.write(step, {'train/loss': 1.0 / step})
  writer.write(20, {'epoch/train_loss': 0.1, 'epoch/val_loss': 0.2,
                    'rollout/test/success_rate': 0.5})
  writer.close()

  path = curves.plot_learning_curves(tmp_path)

  assert path == str(tmp_path / curves.CURVES_FILE)
  image = matplotlib.image.imread(path)
  assert image.ndim == 3 and image.shape[0] > 100 and image.shape[1] > 300
  assert np.ptp(image[..., :3]) > 0.5  # Drawn, not blank.
  assert not list(tmp_path.glob('*.tmp.png'))
