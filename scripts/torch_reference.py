"""The reference policy's compute in PyTorch, to time it on the machine that times dpjax.

The original code (diffusion_policy, robomimic) cannot be installed here, so this rebuilds the
same computation from the parts the reference uses (SPEC §4–§6): per camera a torchvision-style
ResNet-18 with GroupNorm(C/16), SpatialSoftmax(32 keypoints) and Linear(64) + ReLU; the
minGPT-style TransformerForDiffusion on nn.TransformerDecoder (pre-norm, GELU, causal and memory
masks); a DDPM training step with AdamW and an EMA copy of the weights; predict_action as one
encoding plus `num_inference_steps` DDPM steps. Parameter counts and FLOPs match the Lift
defaults; the values are random, since only time is measured.

    python scripts/benchmark.py --only torch_reference   # needs torch (requirements-test.txt)
"""

import copy
import math
import statistics
import time
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


def _group_norm(channels: int) -> nn.GroupNorm:
  return nn.GroupNorm(max(1, channels // 16), channels)


class _BasicBlock(nn.Module):

  def __init__(self, c_in: int, c_out: int, stride: int):
    super().__init__()
    self.conv1 = nn.Conv2d(c_in, c_out, 3, stride, 1, bias=False)
    self.norm1 = _group_norm(c_out)
    self.conv2 = nn.Conv2d(c_out, c_out, 3, 1, 1, bias=False)
    self.norm2 = _group_norm(c_out)
    self.downsample = None
    if stride != 1 or c_in != c_out:
      self.downsample = nn.Sequential(nn.Conv2d(c_in, c_out, 1, stride, bias=False),
                                      _group_norm(c_out))

  def forward(self, x):
    y = F.relu(self.norm1(self.conv1(x)))
    y = self.norm2(self.conv2(y))
    return F.relu(y + (x if self.downsample is None else self.downsample(x)))


class _ImageEncoder(nn.Module):
  """ResNet-18/GroupNorm trunk → SpatialSoftmax keypoints → Linear → ReLU."""

  def __init__(self, width: int = 64, num_keypoints: int = 32, feature_dim: int = 64):
    super().__init__()
    layers = [nn.Conv2d(3, width, 7, 2, 3, bias=False), _group_norm(width), nn.ReLU(),
              nn.MaxPool2d(3, 2, 1)]
    c_in = width
    for stage in range(4):
      c_out = width * 2**stage
      layers += [_BasicBlock(c_in, c_out, 1 if stage == 0 else 2), _BasicBlock(c_out, c_out, 1)]
      c_in = c_out
    self.trunk = nn.Sequential(*layers)
    self.keypoints = nn.Conv2d(c_in, num_keypoints, 1)
    self.linear = nn.Linear(2 * num_keypoints, feature_dim)

  def forward(self, images):
    logits = self.keypoints(self.trunk(images))
    n, k, h, w = logits.shape
    attention = F.softmax(logits.reshape(n, k, h * w), dim=-1)
    ys, xs = torch.meshgrid(torch.linspace(-1, 1, h), torch.linspace(-1, 1, w), indexing='ij')
    points = torch.stack([attention @ xs.reshape(-1), attention @ ys.reshape(-1)], dim=-1)
    return F.relu(self.linear(points.reshape(n, 2 * k)))


class _Transformer(nn.Module):
  """TransformerForDiffusion, decoder mode with observation tokens (the paper's setting)."""

  def __init__(self, action_dim: int, horizon: int, n_obs_steps: int, cond_dim: int,
               n_layer: int, n_head: int, n_emb: int, p_drop_attn: float):
    super().__init__()
    self.n_emb = n_emb
    self.input_emb = nn.Linear(action_dim, n_emb)
    self.pos_emb = nn.Parameter(torch.zeros(1, horizon, n_emb))
    self.cond_obs_emb = nn.Linear(cond_dim, n_emb)
    self.cond_pos_emb = nn.Parameter(torch.zeros(1, n_obs_steps + 1, n_emb))
    self.encoder = nn.Sequential(nn.Linear(n_emb, 4 * n_emb), nn.Mish(),
                                 nn.Linear(4 * n_emb, n_emb))
    layer = nn.TransformerDecoderLayer(n_emb, n_head, 4 * n_emb, p_drop_attn, activation='gelu',
                                       batch_first=True, norm_first=True)
    self.decoder = nn.TransformerDecoder(layer, n_layer)
    self.ln_f = nn.LayerNorm(n_emb)
    self.head = nn.Linear(n_emb, action_dim)
    t = torch.arange(horizon)[:, None]
    self.register_buffer('mask', torch.where(t >= torch.arange(horizon)[None], 0.0, -math.inf))
    self.register_buffer('memory_mask', torch.where(
        t >= torch.arange(n_obs_steps + 1)[None] - 1, 0.0, -math.inf))

  def forward(self, sample, timesteps, cond):
    half = self.n_emb // 2
    freqs = torch.exp(torch.arange(half) * -(math.log(10000.0) / (half - 1)))
    args = timesteps.float()[:, None] * freqs[None]
    time_emb = torch.cat([args.sin(), args.cos()], dim=-1)[:, None]
    memory = torch.cat([time_emb, self.cond_obs_emb(cond)], dim=1) + self.cond_pos_emb
    memory = self.encoder(memory)
    x = self.input_emb(sample) + self.pos_emb
    x = self.decoder(x, memory, tgt_mask=self.mask, memory_mask=self.memory_mask)
    return self.head(self.ln_f(x))


class ReferencePolicy(nn.Module):
  """Two camera encoders + 9 low-dim values per step → transformer noise model (Lift)."""

  def __init__(self, config):
    super().__init__()
    model, task = config.model, config.task
    self.n_obs_steps, self.horizon = int(task.n_obs_steps), int(task.horizon)
    self.cameras = nn.ModuleList([_ImageEncoder(int(model.resnet_width)) for _ in range(2)])
    self.low_dim = 9
    cond_dim = 2 * 64 + self.low_dim
    self.noise_model = _Transformer(7, self.horizon, self.n_obs_steps, cond_dim,
                                    int(model.n_layer), int(model.n_head), int(model.n_emb),
                                    float(model.p_drop_attn))
    betas = _squaredcos_betas(int(config.diffusion.num_train_timesteps))
    self.register_buffer('alphas_cumprod', torch.cumprod(1.0 - betas, 0))
    self.register_buffer('betas', betas)

  def encode(self, images, low_dim):
    """images: per camera (B·To, 3, H, W); low_dim (B·To, 9) → cond (B, To, 137)."""
    features = [encoder(x) for encoder, x in zip(self.cameras, images)] + [low_dim]
    return torch.cat(features, dim=-1).reshape(-1, self.n_obs_steps, 2 * 64 + self.low_dim)

  def loss(self, images, low_dim, actions):
    cond = self.encode(images, low_dim)
    noise = torch.randn_like(actions)
    t = torch.randint(0, len(self.betas), (actions.shape[0],))
    a = self.alphas_cumprod[t][:, None, None]
    noisy = a.sqrt() * actions + (1 - a).sqrt() * noise
    return F.mse_loss(self.noise_model(noisy, t, cond), noise)

  @torch.no_grad()
  def predict_action(self, images, low_dim, num_inference_steps: int):
    cond = self.encode(images, low_dim)
    x = torch.randn(cond.shape[0], self.horizon, 7)
    for t in reversed(range(num_inference_steps)):
      eps = self.noise_model(x, torch.full((x.shape[0],), t), cond)
      a_bar, beta = self.alphas_cumprod[t], self.betas[t]
      mean = (x - beta / (1 - a_bar).sqrt() * eps) / (1 - beta).sqrt()
      x = mean + (beta.sqrt() * torch.randn_like(x) if t > 0 else 0.0)
    return x.clamp(-1, 1)


def _squaredcos_betas(n: int) -> torch.Tensor:
  f = lambda t: math.cos((t + 0.008) / 1.008 * math.pi / 2)**2
  return torch.tensor([min(1 - f((i + 1) / n) / f(i / n), 0.999) for i in range(n)],
                      dtype=torch.float32)


def _inputs(config, batch: int, seed: int = 0):
  g = torch.Generator().manual_seed(seed)
  h, w = config.data.crop_shape
  frames = batch * int(config.task.n_obs_steps)
  images = [torch.rand(frames, 3, h, w, generator=g) for _ in range(2)]
  actions = torch.rand(batch, int(config.task.horizon), 7, generator=g) * 2 - 1
  return images, torch.rand(frames, 9, generator=g), actions


def _median(fn, repeats: int) -> tuple[float, list[float]]:
  fn()
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    fn()
    times.append(time.perf_counter() - start)
  return statistics.median(times), times


def benchmark(config, predict_batches, predict_steps: int, train_batch: int, repeats: int,
              threads: int) -> dict[str, Any]:
  """Median times of the reference's predict_action, training step (AdamW + EMA) and one
  camera's ResNet trunk on the training step's images (benchmark.py's `encoder` figure)."""
  torch.set_num_threads(threads)
  torch.manual_seed(0)
  policy = ReferencePolicy(config)
  ema = copy.deepcopy(policy).requires_grad_(False)
  results = {'threads': threads, 'torch': torch.__version__,
             'num_params': sum(p.numel() for p in policy.parameters())}
  policy.eval()
  for batch in predict_batches:
    images, low_dim, _ = _inputs(config, batch)
    median, times = _median(lambda: policy.predict_action(images, low_dim, predict_steps),
                            repeats)
    results[f'predict_ddpm{predict_steps}_batch{batch}'] = {'median_s': median, 'times_s': times}
  policy.train()
  optimizer = torch.optim.AdamW(policy.parameters(), lr=1e-4, betas=(0.9, 0.95),
                                weight_decay=1e-3)
  images, low_dim, actions = _inputs(config, train_batch)

  def train_step():
    optimizer.zero_grad(set_to_none=True)
    policy.loss(images, low_dim, actions).backward()
    optimizer.step()
    with torch.no_grad():
      for target, source in zip(ema.parameters(), policy.parameters()):
        target.mul_(0.999).add_(source, alpha=0.001)

  median, times = _median(train_step, repeats)
  results[f'train_batch{train_batch}'] = {'median_s': median, 'times_s': times,
                                          'samples_per_s': train_batch / median}

  trunk = policy.cameras[0].trunk
  crops = images[0]

  def trunk_forward_backward():
    trunk.zero_grad(set_to_none=True)
    trunk(crops).square().sum().backward()

  with torch.no_grad():
    median, times = _median(lambda: trunk(crops), repeats)
  results['encoder_forward'] = {'images': len(crops), 'median_s': median, 'times_s': times}
  median, times = _median(trunk_forward_backward, repeats)
  results['encoder_forward_backward'] = {'images': len(crops), 'median_s': median,
                                         'times_s': times}
  return results


if __name__ == '__main__':
  # A library of scripts/benchmark.py, not a command of its own: say how to run it.
  raise SystemExit(__doc__)
