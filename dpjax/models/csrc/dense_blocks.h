// y = x @ W for small M over W pre-packed as (N / 32, K, 32) panels: the register blocks (up to
// kMaxRows rows of x by one 32-column panel) that the dense layers, the decoder layer and the
// Winograd convolution's products run on, float32, and bfloat16 with float32 sums (vdpbf16ps, or
// AMX tiles where the CPU has them). XLA:CPU's GEMM reads W in column panels strided by N and,
// with 10 rows of x (batch-1 sampling), streams the decoder's 29 MB of weights at ~7 GB/s; here
// each panel is one contiguous stream read once per 12 rows of x, the 12 x 32 outputs held in
// registers.

#ifndef DPJAX_MODELS_CSRC_DENSE_BLOCKS_H_
#define DPJAX_MODELS_CSRC_DENSE_BLOCKS_H_

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <utility>

#include <immintrin.h>

#include "amx_tiles.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {

constexpr int64_t kPanelWidth = 32;
constexpr int kMaxRows = 12;

// table[r - 1] = make(r) for r = 1 .. kMaxRows: the kernels' blocks for each row count, chosen
// at run time for a tail of fewer rows.
template <typename Fn, typename Make, int... kRows>
constexpr std::array<Fn, sizeof...(kRows)> BlockTable(Make make,
                                                      std::integer_sequence<int, kRows...>) {
  return {make(std::integral_constant<int, kRows + 1>{})...};
}

template <typename Fn, typename Make>
constexpr auto BlockTable(Make make) {
  return BlockTable<Fn>(make, std::make_integer_sequence<int, kMaxRows>{});
}

// How many k-steps (of 128 bytes) ahead PanelBlock prefetches its panel, and past its end the
// next panel's start, where the hardware prefetcher would start over (a prefetch never faults,
// so reading past the last panel is harmless). Weights read once per call from memory
// (sampling's Dense and decoder layers, whose panels each thread takes as one contiguous run:
// `PanelRuns`) want it 8 KB ahead: on the 2-core Zen 5 EPYC, batch-1 DDPM-100 sampling took
// 22 % less time than with 3 KB ahead and one panel per task (the decoder's dense phases had
// streamed at 34 GB/s of the two cores' 46-50; not measured on the Intel VM, where 3 KB was
// chosen). Panels already in cache (the Winograd convolution's products) keep 3 KB: 8 KB
// measured 3.6 % +- 2.5 % slower per training step there.
constexpr int64_t kStreamedPrefetchSteps = 64;
constexpr int64_t kCachedPrefetchSteps = 24;

// Rows [m0, m0 + kRows) of one output panel: y[m, col:col + 32] = x[m, :] @ panel.
template <int kRows, int64_t kPrefetchSteps>
void PanelBlock(const float* x, const float* panel, float* y, int64_t k_dim, int64_t n_dim,
                int64_t m0, int64_t col) {
  Vec16 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = Vec16{};
  const float* rows = x + m0 * k_dim;
  for (int64_t k = 0; k < k_dim; ++k) {
    __builtin_prefetch(panel + (k + kPrefetchSteps) * kPanelWidth);
    __builtin_prefetch(panel + (k + kPrefetchSteps) * kPanelWidth + 16);
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

constexpr auto kStreamedBlocks = BlockTable<BlockFn>(
    [](auto rows) { return &PanelBlock<rows, kStreamedPrefetchSteps>; });
constexpr auto kCachedBlocks = BlockTable<BlockFn>(
    [](auto rows) { return &PanelBlock<rows, kCachedPrefetchSteps>; });

// `panel_count` panels as one contiguous run per thread (the last run shorter), a task each, so
// that a thread's prefetches past a panel's end land in the panel it takes next.
struct PanelRuns {
  PanelRuns(int64_t panel_count, int64_t threads) : panel_count(panel_count) {
    const int64_t runs = std::max<int64_t>(1, std::min(panel_count, threads));
    run = (panel_count + runs - 1) / runs;
  }
  int64_t Tasks() const { return (panel_count + run - 1) / run; }
  int64_t Begin(int64_t task) const { return task * run; }
  int64_t End(int64_t task) const { return std::min(panel_count, (task + 1) * run); }

  int64_t panel_count, run;
};

// y = x @ W over W's 32-column panels (`panel_size` elements each), a run of panels per thread
// (`PanelRuns`), up to kMaxRows rows of x per call of `blocks` (indexed by rows - 1); `depth` is
// the blocks' K.
template <typename Blocks, typename X, typename W>
void DenseOverPanels(ffi::ThreadPool& pool, const Blocks& blocks, const X* x, const W* panels,
                     float* y, int64_t panel_count, int64_t panel_size, int64_t depth,
                     int64_t m_dim, int64_t n_dim) {
  const PanelRuns runs(panel_count, pool.num_threads());
  ParallelFor(pool, runs.Tasks(), [=, &blocks](int64_t task) {
    for (int64_t p = runs.Begin(task); p < runs.End(task); ++p) {
      for (int64_t m0 = 0; m0 < m_dim; m0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, m_dim - m0);
        blocks[rows - 1](x, panels + p * panel_size, y, depth, n_dim, m0, p * kPanelWidth);
      }
    }
  });
}

#ifdef __AVX512BF16__
// PanelBlock for bfloat16 x and W with float32 sums (mixed precision), W packed as (N / 32,
// K / 2, 32, 2): per pair of k, the 32 columns' two weights side by side, as vdpbf16ps takes
// them. One vdpbf16ps does 2 k-steps for 16 columns: 2.3x the float32 FMA rate of one core here,
// on half the bytes of weights. Its weights are streamed (sampling), prefetched as PanelBlock's.
template <int kRows>
void PanelBlockBf16(const uint16_t* x, const uint16_t* panel, float* y, int64_t k_pairs,
                    int64_t n_dim, int64_t m0, int64_t col) {
  __m512 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  const uint16_t* rows = x + m0 * 2 * k_pairs;
  for (int64_t k = 0; k < k_pairs; ++k) {
    __builtin_prefetch(panel + (k + kStreamedPrefetchSteps) * 2 * kPanelWidth);
    __builtin_prefetch(panel + (k + kStreamedPrefetchSteps) * 2 * kPanelWidth + 32);
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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Where the CPU has AMX (Intel Sapphire Rapids and later), PanelBlockBf16 on tiles: one
// tdpbf16ps multiplies kRows x 16 k-pairs of x by 16 k-pairs x 16 columns of the panel, whose
// (K / 2, 32, 2) layout is already the tiles' pair-interleaved one (two tiles per k-step, each
// half of the panel's 32 columns, rows 128 bytes apart). On the 2-core Xeon VM of session 13,
// one thread, 8 panels' worth of weights out of cache: 10 rows of K = 256 into N = 1024 took
// 25 us against vdpbf16ps's 60 (which issues at half the FMA rate there), 288 rows 0.57 ms
// against 1.75 ms. Same products and float32 sums, in another order.
constexpr int64_t kPanelRowBytes = 2 * kPanelWidth * sizeof(uint16_t);

// Tiles 0, 1: the sums of a panel's two 16-column halves for `rows` rows of x, zeroed; 2: x's
// rows (16 k-pairs); 3, 4: the halves' weights for those k-pairs, rows kPanelRowBytes apart.
inline void StartPanelTiles(int rows) {
  ConfigureTiles({rows, rows, rows, kAmxPairs, kAmxPairs});
  _tile_zero(0);
  _tile_zero(1);
}

template <int kRows>
void PanelBlockAmx(const uint16_t* x, const uint16_t* panel, float* y, int64_t k_pairs,
                   int64_t n_dim, int64_t m0, int64_t col) {
  if (k_pairs % kAmxPairs != 0 || !AmxPermitted()) {
    PanelBlockBf16<kRows>(x, panel, y, k_pairs, n_dim, m0, col);
    return;
  }
  StartPanelTiles(kRows);
  const uint16_t* rows = x + m0 * 2 * k_pairs;
  for (int64_t k = 0; k < k_pairs; k += kAmxPairs) {
    _tile_loadd(2, rows + 2 * k, 2 * k_pairs * sizeof(uint16_t));
    _tile_loadd(3, panel + k * 2 * kPanelWidth, kPanelRowBytes);
    _tile_loadd(4, panel + k * 2 * kPanelWidth + kPanelWidth, kPanelRowBytes);
    _tile_dpbf16ps(0, 2, 3);
    _tile_dpbf16ps(1, 2, 4);
  }
  _tile_stored(0, y + m0 * n_dim + col, n_dim * sizeof(float));
  _tile_stored(1, y + m0 * n_dim + col + 16, n_dim * sizeof(float));
  _tile_release();
}
#endif

using BlockBf16Fn = void (*)(const uint16_t*, const uint16_t*, float*, int64_t, int64_t, int64_t,
                             int64_t);

constexpr auto kBlocksBf16 = BlockTable<BlockBf16Fn>([](auto rows) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return &PanelBlockAmx<rows>;
#else
  return &PanelBlockBf16<rows>;
#endif
});
#endif  // __AVX512BF16__

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_DENSE_BLOCKS_H_
