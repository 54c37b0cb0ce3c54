// CPU kernels for the sampler's decoder step and the ResNet's convolutions (XLA FFI handlers;
// built by cpu_kernels.py).
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
// DpjaxConv, DpjaxConvKernelGrad: a convolution over an already padded NHWC input and its
// kernel gradient, as GEMMs whose rows are read in place from the input (below). XLA:CPU runs
// the kernel gradients of the high-resolution layers as convolutions whose window is the whole
// feature map, at 25-45 GFLOP/s; these run at 170-200 on two cores.
//
// DpjaxPackedDenseBf16: DpjaxPackedDense for mixed precision (bfloat16 operands, float32 sums),
// where the CPU has AVX512-BF16.
//
// All but that one are float32; all share their work out over XLA's intra-op thread pool.
// docs/performance.md has the measurements.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <utility>
#include <vector>

#include <immintrin.h>

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

// Reductions keep kLanes independent partial sums, which the compiler holds in vector
// registers: one running sum would wait out an add's latency for every element.
constexpr int64_t kLanes = 16;

float Dot(const float* a, const float* b, int64_t n) {
  float lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) lanes[l] += a[j + l] * b[j + l];
  }
  float total = 0.0f;
  for (; j < n; ++j) total += a[j] * b[j];
  for (int64_t l = 0; l < kLanes; ++l) total += lanes[l];
  return total;
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

// y = x @ W over W's 32-column panels (`panel_size` elements each), one panel per task, up to
// kMaxRows rows of x per call of `blocks` (indexed by rows - 1); `depth` is the blocks' K.
template <typename Blocks, typename X, typename W>
void DenseOverPanels(ffi::ThreadPool& pool, const Blocks& blocks, const X* x, const W* panels,
                     float* y, int64_t panel_count, int64_t panel_size, int64_t depth,
                     int64_t m_dim, int64_t n_dim) {
  ParallelFor(pool, panel_count, [=, &blocks](int64_t p) {
    for (int64_t m0 = 0; m0 < m_dim; m0 += kMaxRows) {
      const int64_t rows = std::min<int64_t>(kMaxRows, m_dim - m0);
      blocks[rows - 1](x, panels + p * panel_size, y, depth, n_dim, m0, p * kPanelWidth);
    }
  });
}

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
  DenseOverPanels(pool, kBlocks, x_data, panel_data, y_data, p_dims[0], k_dim * kPanelWidth,
                  k_dim, m_dim, n_dim);
  return ffi::Error::Success();
}

#ifdef __AVX512BF16__
// DpjaxPackedDenseBf16: PackedDense for bfloat16 x and W with float32 sums (mixed precision),
// W packed as (N / 32, K / 2, 32, 2): per pair of k, the 32 columns' two weights side by side,
// as vdpbf16ps takes them. One vdpbf16ps does 2 k-steps for 16 columns: 2.3x the float32 FMA
// rate of one core here, on half the bytes of weights.
template <int kRows>
void PanelBlockBf16(const uint16_t* x, const uint16_t* panel, float* y, int64_t k_pairs,
                    int64_t n_dim, int64_t m0, int64_t col) {
  __m512 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  const uint16_t* rows = x + m0 * 2 * k_pairs;
  for (int64_t k = 0; k < k_pairs; ++k) {
    const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(panel + k * 2 * kPanelWidth);
    const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(panel + k * 2 * kPanelWidth + 32);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      uint32_t pair;
      std::memcpy(&pair, rows + i * 2 * k_pairs + 2 * k, sizeof(pair));
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
      lo[i] = _mm512_dpbf16_ps(lo[i], xv, w_lo);
      hi[i] = _mm512_dpbf16_ps(hi[i], xv, w_hi);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    _mm512_storeu_ps(y + (m0 + i) * n_dim + col, lo[i]);
    _mm512_storeu_ps(y + (m0 + i) * n_dim + col + 16, hi[i]);
  }
}

using BlockBf16Fn = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                             int64_t);

template <int... kRows>
constexpr auto MakeBlockBf16Table(std::integer_sequence<int, kRows...>) {
  return std::array<BlockBf16Fn, sizeof...(kRows)>{&PanelBlockBf16<kRows + 1>...};
}
constexpr auto kBlocksBf16 = MakeBlockBf16Table(std::make_integer_sequence<int, kMaxRows>{});

ffi::Error PackedDenseBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::BF16> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 2 || p_dims.size() != 4 || y_dims.size() != 2 ||
      p_dims[1] * 2 != x_dims[1] || p_dims[2] != kPanelWidth || p_dims[3] != 2 ||
      y_dims[0] != x_dims[0] || y_dims[1] != p_dims[0] * kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels dense (bfloat16): expected x (M, K), panels (N / 32, K / 2, 32, 2) and "
        "y (M, N)");
  }
  const int64_t m_dim = x_dims[0], k_pairs = p_dims[1], n_dim = y_dims[1];
  const uint16_t* x_data = reinterpret_cast<const uint16_t*>(x.typed_data());
  const uint16_t* panel_data = reinterpret_cast<const uint16_t*>(panels.typed_data());
  float* y_data = y->typed_data();
  DenseOverPanels(pool, kBlocksBf16, x_data, panel_data, y_data, p_dims[0],
                  k_pairs * 2 * kPanelWidth, k_pairs, m_dim, n_dim);
  return ffi::Error::Success();
}
#else
ffi::Error PackedDenseBf16(ffi::ThreadPool, ffi::Buffer<ffi::BF16>, ffi::Buffer<ffi::BF16>,
                           ffi::ResultBuffer<ffi::F32>) {
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "cpu_kernels dense (bfloat16): this CPU has no AVX512-BF16");
}
#endif

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
        if (m_data[t * s_dim + s]) logit = Dot(query, keys + s * e_dim, d_dim) / scale;
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
      double sum_lanes[kLanes] = {}, sum_sq_lanes[kLanes] = {};
      int64_t j = 0;
      for (; j + kLanes <= e_dim; j += kLanes) {
        for (int64_t l = 0; l < kLanes; ++l) {
          const double value = row[j + l];
          sum_lanes[l] += value;
          sum_sq_lanes[l] += value * value;
        }
      }
      double sum = 0.0, sum_sq = 0.0;
      for (; j < e_dim; ++j) {
        sum += row[j];
        sum_sq += static_cast<double>(row[j]) * row[j];
      }
      for (int64_t l = 0; l < kLanes; ++l) {
        sum += sum_lanes[l];
        sum_sq += sum_sq_lanes[l];
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

// A convolution over an already padded NHWC input x (N, Hp, Wp, C) with a (KH, KW, C, C_out)
// kernel: output pixel m = (image, row, col) reads, for each kernel row ky, the KW·C contiguous
// floats at PixelOffset(m) + ky·Wp·C. So a convolution is a GEMM of K = KH·KW·C whose "rows of
// x" are KH contiguous segments found by pointer arithmetic: no patches are built.
//
// On small maps (the deep layers' 5x5 and 3x3) many taps fall in the zero border: 40 % of them
// on 3x3 maps. There pixels are processed position by position (all images at one output
// position, then the next), so every block of rows shares one range of in-image taps and
// skips the rest.
struct Taps {
  int64_t ky_begin, ky_end, j_begin, j_end;  // Kernel rows; floats within a row's segment.
};

constexpr int64_t kPositionMajorMaxPixels = 36;

struct ConvGeometry {
  int64_t n, hp, wp, c, ho, wo, kh, kw, stride, pad;

  bool PositionMajor() const { return pad > 0 && ho * wo <= kPositionMajorMaxPixels; }
  int64_t Pixels() const { return n * ho * wo; }
  int64_t SegmentLength() const { return kw * c; }
  int64_t RowStride() const { return wp * c; }
  // Consecutive pixels of the processing order that share their taps.
  int64_t RunLength() const { return PositionMajor() ? n : Pixels(); }
  // The output pixel (row-major index into (N, Ho, Wo)) at place q of the processing order.
  int64_t Pixel(int64_t q) const { return PositionMajor() ? q % n * ho * wo + q / n : q; }
  int64_t PixelOffset(int64_t m) const {
    const int64_t image = m / (ho * wo), rest = m % (ho * wo);
    return ((image * hp + rest / wo * stride) * wp + rest % wo * stride) * c;
  }
  // The taps inside the image for the run holding place q (all taps outside position order).
  Taps TapsAt(int64_t q) const {
    if (!PositionMajor()) return {0, kh, 0, SegmentLength()};
    const int64_t position = q / n, oy = position / wo, ox = position % wo;
    auto inside = [this](int64_t origin, int64_t size, int64_t extent) {
      return std::pair<int64_t, int64_t>{std::clamp<int64_t>(pad - origin, 0, size),
                                         std::clamp<int64_t>(extent - pad - origin, 0, size)};
    };
    const auto [ky_begin, ky_end] = inside(oy * stride, kh, hp);
    const auto [kx_begin, kx_end] = inside(ox * stride, kw, wp);
    return {ky_begin, ky_end, kx_begin * c, kx_end * c};
  }
};

// kRows output rows x one 32-column panel: out[i][0:32] = patch(rows[i]) @ panel over `taps`.
template <int kRows>
void ConvBlock(const float* const* rows, float* const* outs, const float* panel, const Taps& taps,
               int64_t length, int64_t row_stride) {
  Vec16 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = Vec16{};
  for (int64_t ky = taps.ky_begin; ky < taps.ky_end; ++ky) {
    const float* segments[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) segments[i] = rows[i] + ky * row_stride;
    const float* weights = panel + ky * length * kPanelWidth;
    for (int64_t j = taps.j_begin; j < taps.j_end; ++j) {
      const Vec16 w_lo = *reinterpret_cast<const Vec16*>(weights + j * kPanelWidth);
      const Vec16 w_hi = *reinterpret_cast<const Vec16*>(weights + j * kPanelWidth + 16);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        const float xv = segments[i][j];
        lo[i] += xv * w_lo;
        hi[i] += xv * w_hi;
      }
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    *reinterpret_cast<Vec16*>(outs[i]) = lo[i];
    *reinterpret_cast<Vec16*>(outs[i] + 16) = hi[i];
  }
}

using ConvBlockFn = void (*)(const float* const*, float* const*, const float*, const Taps&,
                             int64_t, int64_t);

template <int... kRows>
constexpr auto MakeConvBlockTable(std::integer_sequence<int, kRows...>) {
  return std::array<ConvBlockFn, sizeof...(kRows)>{&ConvBlock<kRows + 1>...};
}
constexpr auto kConvBlocks = MakeConvBlockTable(std::make_integer_sequence<int, kMaxRows>{});

// Kernel-gradient rows [0, kRows) of `dw` (a 12-float stretch of one kernel row's segment, which
// starts at `segment` in every pixel's receptive field) x one 32-column panel, summed over
// `count` pixels and added to dw: dw[i] += sum_p segment[x_offsets[p] + i] * dy[dy_offsets[p]].
template <int kRows>
void KernelGradBlock(const float* segment, const int64_t* x_offsets, const float* dy,
                     const int64_t* dy_offsets, int64_t count, float* dw, int64_t n_dim) {
  Vec16 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = Vec16{};
  for (int64_t p = 0; p < count; ++p) {
    const float* patch = segment + x_offsets[p];
    const Vec16 g_lo = *reinterpret_cast<const Vec16*>(dy + dy_offsets[p]);
    const Vec16 g_hi = *reinterpret_cast<const Vec16*>(dy + dy_offsets[p] + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const float xv = patch[i];
      lo[i] += xv * g_lo;
      hi[i] += xv * g_hi;
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    *reinterpret_cast<Vec16*>(dw + i * n_dim) += lo[i];
    *reinterpret_cast<Vec16*>(dw + i * n_dim + 16) += hi[i];
  }
}

using KernelGradBlockFn = void (*)(const float*, const int64_t*, const float*, const int64_t*,
                                   int64_t, float*, int64_t);

template <int... kRows>
constexpr auto MakeKernelGradTable(std::integer_sequence<int, kRows...>) {
  return std::array<KernelGradBlockFn, sizeof...(kRows)>{&KernelGradBlock<kRows + 1>...};
}
constexpr auto kKernelGradBlocks =
    MakeKernelGradTable(std::make_integer_sequence<int, kMaxRows>{});

constexpr int64_t kConvPixelsPerTask = 96;
constexpr int64_t kGradPixelsPerBlock = 512;
constexpr int64_t kGradPixelsPerChunk = 2048;

ffi::Error CheckConvOperands(const ffi::Span<const int64_t>& x_dims, int64_t kh, int64_t kw,
                             int64_t stride, int64_t pad, int64_t n_dim,
                             const ffi::Span<const int64_t>& y_dims, const char* what) {
  if (x_dims.size() != 4 || y_dims.size() != 4 || y_dims[0] != x_dims[0] || kh <= 0 ||
      kw <= 0 || stride <= 0 || pad < 0 || n_dim % kPanelWidth != 0 || y_dims[3] != n_dim ||
      (y_dims[1] - 1) * stride + kh > x_dims[1] || (y_dims[2] - 1) * stride + kw > x_dims[2]) {
    return ffi::Error::InvalidArgument(std::string("cpu_kernels ") + what +
                                       ": expected padded x (N, Hp, Wp, C), an output (N, Ho, Wo, "
                                       "C_out) inside it and C_out a multiple of 32");
  }
  return ffi::Error::Success();
}

// y (N, Ho, Wo, C_out) = conv(x, kernel), x padded (its outer `pad` rows and columns zeros),
// kernel packed as (C_out / 32, KH·KW·C, 32). Tasks: up to 96 pixels of one run x one panel.
ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                       int64_t kw, int64_t stride, int64_t pad) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  const int64_t n_dim = y_dims.size() == 4 ? y_dims[3] : 0;
  if (auto error = CheckConvOperands(x_dims, kh, kw, stride, pad, n_dim, y_dims, "conv");
      error.failure()) {
    return error;
  }
  if (p_dims.size() != 3 || p_dims[0] * kPanelWidth != n_dim || p_dims[1] != kh * kw * x_dims[3] ||
      p_dims[2] != kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels conv: expected panels (C_out / 32, KH * KW * C, 32)");
  }
  const ConvGeometry g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1],
                       y_dims[2], kh,        kw,        stride,    pad};
  const int64_t run = g.RunLength(), k_dim = p_dims[1], panel_count = p_dims[0];
  const int64_t blocks_per_run = (run + kConvPixelsPerTask - 1) / kConvPixelsPerTask;
  const int64_t blocks = g.Pixels() / run * blocks_per_run;
  const float* x_data = x.typed_data();
  const float* panel_data = panels.typed_data();
  float* y_data = y->typed_data();
  ParallelFor(pool, blocks * panel_count, [=, &g](int64_t task) {
    const int64_t p = task % panel_count, block = task / panel_count;
    const int64_t run_begin = block / blocks_per_run * run;
    const int64_t begin = run_begin + block % blocks_per_run * kConvPixelsPerTask;
    const int64_t end = std::min(run_begin + run, begin + kConvPixelsPerTask);
    const float* panel = panel_data + p * k_dim * kPanelWidth;
    const Taps taps = g.TapsAt(begin);
    const float* rows[kMaxRows];
    float* outs[kMaxRows];
    for (int64_t q0 = begin; q0 < end; q0 += kMaxRows) {
      const int64_t count = std::min<int64_t>(kMaxRows, end - q0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t m = g.Pixel(q0 + i);
        rows[i] = x_data + g.PixelOffset(m);
        outs[i] = y_data + m * n_dim + p * kPanelWidth;
      }
      kConvBlocks[count - 1](rows, outs, panel, taps, g.SegmentLength(), g.RowStride());
    }
  });
  return ffi::Error::Success();
}

// dw (KH, KW, C, C_out) = sum over output pixels m of patch(m)^T dy[m], x padded as for
// ConvForward. Tasks are (pixel chunk, group of 32-column panels): each chunk sums into its own
// copy of dw (added up at the end), so there are enough tasks to share while the copies stay
// few: many pixels (high-resolution layers) split into chunks, wide kernels (deep layers) into
// groups. Within a task, pixels go in blocks of up to kGradPixelsPerBlock (within one run):
// their dy rows and x patches stay in L2 while every (12-row, 32-column) tile of dw is summed
// over them in registers.
ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad) {
  const auto x_dims = x.dimensions();
  const auto dy_dims = dy.dimensions();
  const auto w_dims = dw->dimensions();
  if (w_dims.size() != 4 || x_dims.size() != 4 || w_dims[2] != x_dims[3]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels conv_kernel_grad: expected dw (KH, KW, C, C_out) for x (N, Hp, Wp, C)");
  }
  const int64_t kh = w_dims[0], kw = w_dims[1], n_dim = w_dims[3];
  if (auto error = CheckConvOperands(x_dims, kh, kw, stride, pad, n_dim, dy_dims,
                                     "conv_kernel_grad");
      error.failure()) {
    return error;
  }
  const ConvGeometry g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], dy_dims[1],
                       dy_dims[2], kh,       kw,        stride,    pad};
  const int64_t pixels = g.Pixels(), run = g.RunLength(), k_dim = kh * kw * g.c;
  const int64_t panels = n_dim / kPanelWidth;
  const int64_t wanted_tasks = 2 * (pool.num_threads() + 1);
  const int64_t chunks = std::clamp<int64_t>(pixels / kGradPixelsPerChunk, 1, wanted_tasks);
  const int64_t groups = std::min(panels, (wanted_tasks + chunks - 1) / chunks);
  std::vector<float> partial(static_cast<size_t>((chunks - 1) * k_dim * n_dim));
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  float* dw_data = dw->typed_data();
  ParallelFor(pool, chunks * groups, [=, &g, &partial](int64_t task) {
    const int64_t chunk = task / groups, group = task % groups;
    const int64_t col_begin = group * panels / groups * kPanelWidth;
    const int64_t col_end = (group + 1) * panels / groups * kPanelWidth;
    float* sum = chunk == 0 ? dw_data : partial.data() + (chunk - 1) * k_dim * n_dim;
    for (int64_t k = 0; k < k_dim; ++k) {
      std::fill(sum + k * n_dim + col_begin, sum + k * n_dim + col_end, 0.0f);
    }
    int64_t x_offsets[kGradPixelsPerBlock], dy_offsets[kGradPixelsPerBlock];
    const int64_t length = g.SegmentLength();
    const int64_t chunk_end = (chunk + 1) * pixels / chunks;
    for (int64_t q0 = chunk * pixels / chunks, q1; q0 < chunk_end; q0 = q1) {
      q1 = std::min({chunk_end, q0 + kGradPixelsPerBlock, (q0 / run + 1) * run});
      for (int64_t q = q0; q < q1; ++q) {
        const int64_t m = g.Pixel(q);
        x_offsets[q - q0] = g.PixelOffset(m);
        dy_offsets[q - q0] = m * n_dim;
      }
      const Taps taps = g.TapsAt(q0);
      for (int64_t ky = taps.ky_begin; ky < taps.ky_end; ++ky) {
        for (int64_t j = taps.j_begin; j < taps.j_end; j += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, taps.j_end - j);
          const float* segment = x_data + ky * g.RowStride() + j;
          float* out = sum + (ky * length + j) * n_dim;
          for (int64_t col = col_begin; col < col_end; col += kPanelWidth) {
            kKernelGradBlocks[rows - 1](segment, x_offsets, dy_data + col, dy_offsets, q1 - q0,
                                        out + col, n_dim);
          }
        }
      }
    }
  });
  const int64_t rows_per_task = 64;
  ParallelFor(pool, (k_dim + rows_per_task - 1) / rows_per_task, [=, &partial](int64_t task) {
    const int64_t begin = task * rows_per_task * n_dim;
    const int64_t end = std::min(k_dim, (task + 1) * rows_per_task) * n_dim;
    for (int64_t c = 1; c < chunks; ++c) {
      const float* part = partial.data() + (c - 1) * k_dim * n_dim;
      for (int64_t i = begin; i < end; ++i) dw_data[i] += part[i];
    }
  });
  return ffi::Error::Success();
}

// Packs a (KH, KW, C, C_out) kernel into ConvForward's (C_out / 32, KH·KW·C, 32) panels, or with
// `mirror` the kernel of a stride-1 convolution's input gradient — mirrored in space, channel
// axes swapped — into (C / 32, KH·KW·C_out, 32) panels. XLA:CPU ran these layout changes at
// 1-2 GB/s (the last stage's 9.4 MB kernels took 5-10 ms each, four per conv and step).
ffi::Error PackConvKernel(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel,
                          ffi::ResultBuffer<ffi::F32> panels, bool mirror) {
  const auto w_dims = kernel.dimensions();
  const auto p_dims = panels->dimensions();
  if (w_dims.size() != 4 || p_dims.size() != 3 || p_dims[2] != kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels pack_conv_kernel: expected kernel (KH, KW, C, C_out) and panels (_, _, 32)");
  }
  const int64_t taps = w_dims[0] * w_dims[1];
  const int64_t c_in = mirror ? w_dims[3] : w_dims[2], c_out = mirror ? w_dims[2] : w_dims[3];
  if (c_out % kPanelWidth != 0 || p_dims[0] * kPanelWidth != c_out || p_dims[1] != taps * c_in) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels pack_conv_kernel: expected panels (C_out / 32, KH * KW * C, 32) (C and C_out "
        "swapped when mirrored), C_out a multiple of 32");
  }
  const float* w = kernel.typed_data();
  float* out = panels->typed_data();
  const int64_t k_dim = taps * c_in;
  // Task: one tap (the source's, for mirror) x one panel; the tap's (C, C_out) matrix is read
  // as `source` [row][column] with row stride w_dims[3].
  ParallelFor(pool, taps * p_dims[0], [=](int64_t task) {
    const int64_t tap = task / p_dims[0], p = task % p_dims[0];
    const float* source = w + tap * w_dims[2] * w_dims[3];
    float* panel = out + p * k_dim * kPanelWidth;
    if (!mirror) {
      for (int64_t row = 0; row < c_in; ++row) {
        std::copy_n(source + row * c_out + p * kPanelWidth, kPanelWidth,
                    panel + (tap * c_in + row) * kPanelWidth);
      }
      return;
    }
    // Output row (taps - 1 - tap, co) holds source[p·32 + i][co] for i < 32: a transpose, in
    // 32 x 32 tiles copied through a local buffer.
    float* rows = panel + (taps - 1 - tap) * c_in * kPanelWidth;
    const int64_t row_stride = w_dims[3];
    float tile[kPanelWidth][kPanelWidth + 1];
    for (int64_t co0 = 0; co0 < c_in; co0 += kPanelWidth) {
      const int64_t width = std::min(kPanelWidth, c_in - co0);
      for (int64_t i = 0; i < kPanelWidth; ++i) {
        std::copy_n(source + (p * kPanelWidth + i) * row_stride + co0, width, tile[i]);
      }
      for (int64_t co = 0; co < width; ++co) {
        float* out_row = rows + (co0 + co) * kPanelWidth;
        for (int64_t i = 0; i < kPanelWidth; ++i) out_row[i] = tile[i][co];
      }
    }
  });
  return ffi::Error::Success();
}

// torch's MaxPool2d(3, stride=2, padding=1) over NHWC x, one image per task. Besides the maxima,
// records which of the 9 window offsets (row-major) held each one: the first maximum (the last
// NaN, if any), as torch does, so the backward pass routes every output gradient to that input.
constexpr int64_t kPoolWindow = 3, kPoolStride = 2, kPoolPad = 1;

ffi::Error MaxPool(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::ResultBuffer<ffi::F32> y,
                   ffi::ResultBuffer<ffi::S8> argmax) {
  const auto x_dims = x.dimensions();
  const auto y_dims = y->dimensions();
  if (x_dims.size() != 4 || y_dims.size() != 4 || y_dims[0] != x_dims[0] ||
      y_dims[1] != (x_dims[1] - 1) / kPoolStride + 1 ||
      y_dims[2] != (x_dims[2] - 1) / kPoolStride + 1 || y_dims[3] != x_dims[3] ||
      !SameDims(argmax->dimensions(), y_dims)) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels max_pool: expected x (N, H, W, C), y and argmax (N, ceil(H/2), ceil(W/2), C)");
  }
  const int64_t h = x_dims[1], w = x_dims[2], c = x_dims[3], ho = y_dims[1], wo = y_dims[2];
  const float* x_data = x.typed_data();
  float* y_data = y->typed_data();
  int8_t* a_data = argmax->typed_data();
  ParallelFor(pool, x_dims[0], [=](int64_t n) {
    const float* image = x_data + n * h * w * c;
    for (int64_t oy = 0; oy < ho; ++oy) {
      for (int64_t ox = 0; ox < wo; ++ox) {
        const int64_t out = ((n * ho + oy) * wo + ox) * c;
        float* best = y_data + out;
        int8_t* which = a_data + out;
        std::fill(best, best + c, -std::numeric_limits<float>::infinity());
        std::fill(which, which + c, 0);
        for (int64_t ky = 0; ky < kPoolWindow; ++ky) {
          const int64_t iy = oy * kPoolStride - kPoolPad + ky;
          if (iy < 0 || iy >= h) continue;
          for (int64_t kx = 0; kx < kPoolWindow; ++kx) {
            const int64_t ix = ox * kPoolStride - kPoolPad + kx;
            if (ix < 0 || ix >= w) continue;
            const float* pixel = image + (iy * w + ix) * c;
            const int8_t offset = static_cast<int8_t>(ky * kPoolWindow + kx);
            for (int64_t j = 0; j < c; ++j) {
              // Strict: ties keep the earlier offset. A NaN always wins, as in torch.
              const bool larger = pixel[j] > best[j] || std::isnan(pixel[j]);
              best[j] = larger ? pixel[j] : best[j];
              which[j] = larger ? offset : which[j];
            }
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// dx (N, H, W, C): each output gradient added to the input its window's argmax points at.
ffi::Error MaxPoolGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::S8> argmax,
                       ffi::Buffer<ffi::F32> grad, ffi::ResultBuffer<ffi::F32> dx) {
  const auto a_dims = argmax.dimensions();
  const auto x_dims = dx->dimensions();
  if (x_dims.size() != 4 || !SameDims(a_dims, grad.dimensions()) || a_dims[0] != x_dims[0] ||
      a_dims[1] != (x_dims[1] - 1) / kPoolStride + 1 ||
      a_dims[2] != (x_dims[2] - 1) / kPoolStride + 1 || a_dims[3] != x_dims[3]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels max_pool_grad: expected argmax and grad (N, ceil(H/2), ceil(W/2), C) for "
        "dx (N, H, W, C)");
  }
  const int64_t h = x_dims[1], w = x_dims[2], c = x_dims[3], ho = a_dims[1], wo = a_dims[2];
  const int8_t* a_data = argmax.typed_data();
  const float* g_data = grad.typed_data();
  float* dx_data = dx->typed_data();
  ParallelFor(pool, x_dims[0], [=](int64_t n) {
    float* image = dx_data + n * h * w * c;
    std::fill(image, image + h * w * c, 0.0f);
    for (int64_t oy = 0; oy < ho; ++oy) {
      for (int64_t ox = 0; ox < wo; ++ox) {
        const int64_t out = ((n * ho + oy) * wo + ox) * c;
        for (int64_t j = 0; j < c; ++j) {
          const int64_t iy = oy * kPoolStride - kPoolPad + a_data[out + j] / kPoolWindow;
          const int64_t ix = ox * kPoolStride - kPoolPad + a_data[out + j] % kPoolWindow;
          image[(iy * w + ix) * c + j] += g_data[out + j];
        }
      }
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxPackedDenseBf16, PackedDenseBf16,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Arg<ffi::Buffer<ffi::BF16>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// Whether DpjaxPackedDenseBf16 was built (the CPU has AVX512-BF16).
extern "C" int DpjaxHasBf16Dense() {
#ifdef __AVX512BF16__
  return 1;
#else
  return 0;
#endif
}

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConv, ConvForward,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("kh")
                                  .Attr<int64_t>("kw")
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvKernelGrad, ConvKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("stride")
                                  .Attr<int64_t>("pad"));

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxMaxPool, MaxPool,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::S8>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxMaxPoolGrad, MaxPoolGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::S8>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxPackConvKernel, PackConvKernel,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("mirror"));
