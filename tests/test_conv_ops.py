"""Tests for dpjax/models/conv_ops.py: values and gradients against PyTorch's autograd."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F

from dpjax.models import conv_ops
from dpjax.models import cpu_kernels as cpu_kernels_lib


def _torch_nchw(x_nhwc: np.ndarray) -> torch.Tensor:
  return torch.from_numpy(np.ascontiguousarray(x_nhwc.transpose(0, 3, 1, 2))).requires_grad_()


@pytest.mark.parametrize('kernel_size,stride,size,method', [
    (3, 1, 9, 'xla'), (3, 2, 10, 'xla'), (3, 1, 9, 'gemm_kernel_grad'),
    (3, 2, 10, 'gemm_kernel_grad'), (1, 2, 9, 'gemm_kernel_grad'), (7, 2, 12, 'gemm_kernel_grad'),
    (3, 1, 3, 'tap_gemms'), (3, 1, 4, 'tap_gemms'), (1, 1, 3, 'tap_gemms'), (5, 1, 2, 'tap_gemms')])
def test_conv2d_value_and_gradients_match_torch(kernel_size, stride, size, method):
  rng = np.random.default_rng(kernel_size * 10 + stride)
  x = rng.normal(size=(2, size, size, 5)).astype(np.float32)
  kernel = rng.normal(size=(kernel_size, kernel_size, 5, 4)).astype(np.float32)
  x_t, kernel_t = _torch_nchw(x), torch.from_numpy(kernel.transpose(3, 2, 0, 1)).requires_grad_()
  y_t = F.conv2d(x_t, kernel_t, stride=stride, padding=kernel_size // 2)
  cotangent = rng.normal(size=y_t.shape).astype(np.float32)
  (y_t * torch.from_numpy(cotangent)).sum().backward()

  def loss(x, kernel):
    y = conv_ops.conv2d(x, kernel, stride, method)
    return jnp.sum(y * cotangent.transpose(0, 2, 3, 1)), y

  (_, y), (grad_x, grad_kernel) = jax.jit(jax.value_and_grad(loss, (0, 1), has_aux=True))(
      x, kernel)
  np.testing.assert_allclose(y, y_t.detach().numpy().transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(grad_x, x_t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-4)
  np.testing.assert_allclose(grad_kernel, kernel_t.grad.numpy().transpose(2, 3, 1, 0),
                             atol=1e-4, rtol=1e-5)


def test_conv2d_rejects_bad_shapes():
  with pytest.raises(ValueError, match=r'odd k'):
    conv_ops.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((2, 2, 3, 4)), 1)
  with pytest.raises(ValueError, match=r'x must be \(N, H, W, 3\)'):
    conv_ops.conv2d(jnp.zeros((1, 8, 8, 5)), jnp.zeros((3, 3, 3, 4)), 1)
  with pytest.raises(ValueError, match=r"'tap_gemms' needs stride 1"):
    conv_ops.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), 2, 'tap_gemms')
  with pytest.raises(ValueError, match=r"method must be one of"):
    conv_ops.conv2d(jnp.zeros((1, 8, 8, 3)), jnp.zeros((3, 3, 3, 4)), 1, 'winograd')


@pytest.mark.parametrize('cpu_kernels', [True, False])
@pytest.mark.parametrize('size,channels', [(7, 3), (8, 3), (19, 35)])
def test_max_pool_matches_torch_including_ties(size, channels, cpu_kernels, monkeypatch):
  # Integers in a small range: most windows hold several equal maxima, and torch sends the
  # gradient to the first of them in row-major order. Both implementations: the C++ kernels
  # (argmax recorded in the forward pass; 35 channels: two blocks of 16 vector lanes and 3
  # channels one by one) and the XLA one (argmax recomputed).
  if not cpu_kernels:
    monkeypatch.setattr(cpu_kernels_lib, 'enabled', lambda dtype: False)
  pool = lambda x: conv_ops.max_pool_3x3_stride2(x)  # A new function: no cached trace.
  jaxpr = str(jax.make_jaxpr(pool)(jnp.zeros((1, size, size, 3))))
  assert ('dpjax_max_pool' in jaxpr) == cpu_kernels
  rng = np.random.default_rng(size)
  x = rng.integers(0, 3, size=(2, size, size, channels)).astype(np.float32)
  x_t = _torch_nchw(x)
  y_t = F.max_pool2d(x_t, 3, 2, 1)
  cotangent = rng.normal(size=y_t.shape).astype(np.float32)
  (y_t * torch.from_numpy(cotangent)).sum().backward()

  y, pullback = jax.vjp(conv_ops.max_pool_3x3_stride2, jnp.asarray(x))
  (grad_x,) = pullback(jnp.asarray(cotangent.transpose(0, 2, 3, 1)))
  np.testing.assert_array_equal(y, y_t.detach().numpy().transpose(0, 2, 3, 1))
  np.testing.assert_allclose(grad_x, x_t.grad.numpy().transpose(0, 2, 3, 1), atol=1e-6)
