"""Learning curves of a run as a PNG: losses, sampled-action MSE and rollout success vs step."""

import os

import matplotlib

matplotlib.use('Agg')  # Headless: runs write files, they never open windows.
import matplotlib.pyplot as plt  # pylint: disable=g-import-not-at-top,wrong-import-position

from dpjax.training import metrics as metrics_lib  # pylint: disable=wrong-import-position

CURVES_FILE = 'learning_curves.png'
# (panel title, y axis: 'log' or 'fraction', [(metric name, legend label), ...]).
_PANELS = (
    ('diffusion loss', 'log', [('train/loss', 'train (per step)'),
                              ('epoch/train_loss', 'train (epoch mean)'),
                              ('epoch/val_loss', 'validation (raw params)')]),
    ('sampled-action MSE (EMA)', 'log', [('epoch/train_action_mse', 'training batch')]),
    ('rollout success', 'fraction', [('rollout/test/success_rate', 'test episodes'),
                                ('rollout/train/success_rate', 'train initial states')]),
)


def plot_learning_curves(workdir: str | os.PathLike, path: str | None = None) -> str:
  """Reads `<workdir>/metrics.jsonl` and writes the curves (default `<workdir>/learning_curves.png`).

  Panels with no recorded values say so instead of being left out, so a missing metric is seen.
  """
  records = metrics_lib.read_metrics(workdir)
  path = path or os.path.join(workdir, CURVES_FILE)
  figure, axes = plt.subplots(1, len(_PANELS), figsize=(5 * len(_PANELS), 3.6))
  for axis, (title, y_axis, series) in zip(axes, _PANELS):
    plotted = False
    for name, label in series:
      points = [(r['step'], r[name]) for r in records if r.get(name) is not None]
      if points:
        steps, values = zip(*points)
        axis.plot(steps, values, marker='o' if len(points) < 30 else None, label=label)
        plotted = True
    axis.set_title(title)
    axis.set_xlabel('step')
    if plotted:
      if y_axis == 'log':
        axis.set_yscale('log')
      else:
        axis.set_ylim(-0.02, 1.02)
      axis.legend(fontsize=8)
      axis.grid(alpha=0.3)
    else:
      axis.text(0.5, 0.5, 'not recorded', ha='center', va='center', transform=axis.transAxes)
  figure.suptitle(os.path.basename(os.path.abspath(workdir)))
  figure.tight_layout()
  tmp = f'{path}.tmp.png'
  figure.savefig(tmp, dpi=110)
  plt.close(figure)
  os.replace(tmp, path)
  return path
