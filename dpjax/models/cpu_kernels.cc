// CPU kernels for the sampler's decoder step (XLA FFI handlers; built by cpu_kernels.py).
//
// DpjaxPackedDense: y (M, N) = x (M, K) @ W (K, N) for small M, with W pre-packed as
// (N / 32, K, 32) panels. XLA:CPU's GEMM reads W in column panels strided by N and, with 10 rows
// of x (batch-1 sampling), streams the decoder's 29 MB of weights at ~7 GB/s. Here each panel is
// one contiguous stream read once per 12 rows of x, the 12 x 32 outputs held in registers.
//
// DpjaxAttention: masked multi-head softmax attention of already projected q, k, v for the few
// tokens of a denoising step, one (batch, head) pair per task; XLA runs these as batched
// 10 x 64 x 10 GEMMs plus head transposes, ~20 us apiece.
//
// DpjaxLayerNorm: LayerNorm over the last axis as flax.linen.LayerNorm computes it; XLA runs
// each of its two row reductions as a YNNPACK call, ~110 us at batch 28 (25 norms per step).
//
// All are float32 and share their work out over XLA's intra-op thread pool.
// docs/performance.md has the measurements.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <limits>
#include <memory>
#include <thread>
#include <utility>
#include <vector>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

// Runs body(i) for every i in [0, n) on the calling thread and the pool's threads. Tasks are
// claimed one at a time; the caller works until none are left, so it only ever waits for tasks
// already running: no deadlock while the pool's threads are busy elsewhere, and helpers that
// start late claim nothing (and so never touch the caller's buffers).
template <typename Body>
void ParallelFor(ffi::ThreadPool& pool, int64_t n, Body body) {
  struct Progress {
    std::atomic<int64_t> next{0};
    std::atomic<int64_t> finished{0};
  };
  auto progress = std::make_shared<Progress>();
  auto drain = [progress, n, body] {
    for (int64_t i; (i = progress->next.fetch_add(1)) < n;) {
      body(i);
      progress->finished.fetch_add(1, std::memory_order_release);
    }
  };
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), n) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([drain] { drain(); });
  drain();
  while (progress->finished.load(std::memory_order_acquire) < n) std::this_thread::yield();
}

template <typename Dims>
bool SameDims(const Dims& a, const Dims& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

constexpr int64_t kPanelWidth = 32;
constexpr int kMaxRows = 12;

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));

// Rows [m0, m0 + kRows) of one output panel: y[m, col:col + 32] = x[m, :] @ panel.
template <int kRows>
void PanelBlock(const float* x, const float* panel, float* y, int64_t k_dim, int64_t n_dim,
                int64_t m0, int64_t col) {
  Vec16 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = Vec16{};
  const float* rows = x + m0 * k_dim;
  for (int64_t k = 0; k < k_dim; ++k) {
    const Vec16 w_lo = *reinterpret_cast<const Vec16*>(panel + k * kPanelWidth);
    const Vec16 w_hi = *reinterpret_cast<const Vec16*>(panel + k * kPanelWidth + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const float xv = rows[i * k_dim + k];
      lo[i] += xv * w_lo;
      hi[i] += xv * w_hi;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    *reinterpret_cast<Vec16*>(y + (m0 + i) * n_dim + col) = lo[i];
    *reinterpret_cast<Vec16*>(y + (m0 + i) * n_dim + col + 16) = hi[i];
  }
}

using BlockFn = void (*)(const float*, const float*, float*, int64_t, int64_t, int64_t, int64_t);

template <int... kRows>
constexpr auto MakeBlockTable(std::integer_sequence<int, kRows...>) {
  return std::array<BlockFn, sizeof...(kRows)>{&PanelBlock<kRows + 1>...};
}
// kBlocks[r - 1] handles r rows.
constexpr auto kBlocks = MakeBlockTable(std::make_integer_sequence<int, kMaxRows>{});

ffi::Error PackedDense(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || p_dims.size() != 3 || y_dims.size() != 2 ||
      p_dims[1] != x_dims[1] || p_dims[2] != kPanelWidth || y_dims[0] != x_dims[0] ||
      y_dims[1] != p_dims[0] * kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels dense: expected x (M, K), panels (N / 32, K, 32) and y (M, N)");
  }
  const int64_t m_dim = x_dims[0], k_dim = x_dims[1], n_dim = y_dims[1];
  const float* x_data = x.typed_data();
  const float* panel_data = panels.typed_data();
  float* y_data = y->typed_data();
  ParallelFor(pool, p_dims[0], [=](int64_t p) {
    const float* panel = panel_data + p * k_dim * kPanelWidth;
    for (int64_t m0 = 0; m0 < m_dim; m0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m_dim - m0);
      kBlocks[rows - 1](x_data, panel, y_data, k_dim, n_dim, m0, p * kPanelWidth);
    }
  });
  return ffi::Error::Success();
}

// out[b, t, head] = softmax_s(mask[t, s] ? q[b, t, head] . k[b, s, head] / sqrt(d) : lowest)
//                   @ v[b, :, head], as dpjax.models.transformer._attend computes it.
ffi::Error Attention(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> q, ffi::Buffer<ffi::F32> k,
                     ffi::Buffer<ffi::F32> v, ffi::Buffer<ffi::PRED> mask,
                     ffi::ResultBuffer<ffi::F32> out, int64_t num_heads) {
  const auto q_dims = q.dimensions();
  const auto k_dims = k.dimensions();
  const auto m_dims = mask.dimensions();
  if (q_dims.size() != 3 || k_dims.size() != 3 || !SameDims(k_dims, v.dimensions()) ||
      k_dims[0] != q_dims[0] || k_dims[2] != q_dims[2] || m_dims.size() != 2 ||
      m_dims[0] != q_dims[1] || m_dims[1] != k_dims[1] || num_heads <= 0 ||
      q_dims[2] % num_heads != 0 || !SameDims(out->dimensions(), q_dims)) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels attention: expected q (B, T, E), k and v (B, S, E), mask (T, S), "
        "out (B, T, E) and E divisible by num_heads");
  }
  const int64_t t_dim = q_dims[1], s_dim = k_dims[1], e_dim = q_dims[2];
  const int64_t d_dim = e_dim / num_heads;
  const float scale = std::sqrt(static_cast<float>(d_dim));
  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const bool* m_data = mask.typed_data();
  float* o_data = out->typed_data();
  ParallelFor(pool, q_dims[0] * num_heads, [=](int64_t task) {
    const int64_t b = task / num_heads, offset = (task % num_heads) * d_dim;
    const float* keys = k_data + b * s_dim * e_dim + offset;
    const float* values = v_data + b * s_dim * e_dim + offset;
    std::vector<float> weights(s_dim);
    for (int64_t t = 0; t < t_dim; ++t) {
      const float* query = q_data + (b * t_dim + t) * e_dim + offset;
      float top = std::numeric_limits<float>::lowest();
      for (int64_t s = 0; s < s_dim; ++s) {
        float logit = std::numeric_limits<float>::lowest();
        if (m_data[t * s_dim + s]) {
          float dot = 0.0f;
          for (int64_t j = 0; j < d_dim; ++j) dot += query[j] * keys[s * e_dim + j];
          logit = dot / scale;
        }
        weights[s] = logit;
        top = std::max(top, logit);
      }
      float total = 0.0f;
      for (int64_t s = 0; s < s_dim; ++s) total += weights[s] = std::exp(weights[s] - top);
      float* row = o_data + (b * t_dim + t) * e_dim + offset;
      std::fill(row, row + d_dim, 0.0f);
      for (int64_t s = 0; s < s_dim; ++s) {
        const float w = weights[s] / total;
        for (int64_t j = 0; j < d_dim; ++j) row[j] += w * values[s * e_dim + j];
      }
    }
  });
  return ffi::Error::Success();
}

constexpr int64_t kNormRowsPerTask = 64;

// y = (x - mean) * (rsqrt(var + eps) * scale) + bias per row, var = mean(x^2) - mean^2
// clipped at 0 (flax's fast variance; sums accumulated in double).
ffi::Error LayerNorm(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> scale,
                     ffi::Buffer<ffi::F32> bias, ffi::ResultBuffer<ffi::F32> y, float epsilon) {
  const auto x_dims = x.dimensions();
  if (x_dims.size() != 2 || scale.element_count() != static_cast<size_t>(x_dims[1]) ||
      bias.element_count() != static_cast<size_t>(x_dims[1]) ||
      !SameDims(y->dimensions(), x_dims)) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels layer_norm: expected x (M, E), scale (E,), bias (E,) and y (M, E)");
  }
  const int64_t m_dim = x_dims[0], e_dim = x_dims[1];
  const float* x_data = x.typed_data();
  const float* s_data = scale.typed_data();
  const float* b_data = bias.typed_data();
  float* y_data = y->typed_data();
  const int64_t tasks = (m_dim + kNormRowsPerTask - 1) / kNormRowsPerTask;
  ParallelFor(pool, tasks, [=](int64_t task) {
    const int64_t end = std::min(m_dim, (task + 1) * kNormRowsPerTask);
    for (int64_t m = task * kNormRowsPerTask; m < end; ++m) {
      const float* row = x_data + m * e_dim;
      double sum = 0.0, sum_sq = 0.0;
      for (int64_t j = 0; j < e_dim; ++j) {
        sum += row[j];
        sum_sq += static_cast<double>(row[j]) * row[j];
      }
      const float mean = static_cast<float>(sum / e_dim);
      const float var = std::max(0.0f, static_cast<float>(sum_sq / e_dim) - mean * mean);
      const float inv = 1.0f / std::sqrt(var + epsilon);
      float* out = y_data + m * e_dim;
      for (int64_t j = 0; j < e_dim; ++j) out[j] = (row[j] - mean) * (inv * s_data[j]) + b_data[j];
    }
  });
  return ffi::Error::Success();
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxPackedDense, PackedDense,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));
