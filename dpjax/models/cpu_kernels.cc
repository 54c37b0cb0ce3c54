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
// DpjaxDecoderLayer: a whole pre-norm decoder layer (the three above, GELU and the residual
// additions) in one call, its steps as dependent phases of one parallel run (RunPhases); float32,
// or with bfloat16 weights as the bfloat16 module computes.
//
// DpjaxConv, DpjaxConvKernelGrad: a convolution over an already padded NHWC input and its
// kernel gradient, as GEMMs whose rows are read in place from the input (below). XLA:CPU runs
// the kernel gradients of the high-resolution layers as convolutions whose window is the whole
// feature map, at 25-45 GFLOP/s; these run at 170-200 on two cores.
//
// DpjaxWinogradConv, DpjaxWinogradKernelGrad, DpjaxWinogradPanels: float32 stride-1 3x3
// convolutions (forward, and the input gradient on the mirrored kernel) and their kernel
// gradients by Winograd's F(2x2, 3x3), 16 products per 2 x 2 outputs and channel pair where
// the GEMMs above do 36; for the maps larger than 6 x 6 (ResNet-18's first two stages).
//
// DpjaxPackedDenseBf16, DpjaxConvBf16, DpjaxConvKernelGradBf16: DpjaxPackedDense, DpjaxConv
// and DpjaxConvKernelGrad for mixed precision (bfloat16 operands, float32 sums), where the CPU
// has AVX512-BF16. Where it has AMX too, their products run on its tiles: the dense blocks,
// convolutions of 16 images or more (ConvAmx) and the kernel gradients (KernelGradAmx).
//
// DpjaxChannelMoments(Bf16): per-(sample, channel) sums of u and u·v over the positions of
// (N, P, C) operands: GroupNorm's statistics and its backward pass's sums.
//
// All share their work out over XLA's intra-op thread pool. docs/performance.md has the
// measurements.

#include <algorithm>
#include <array>
#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <initializer_list>
#include <limits>
#include <memory>
#include <string>
#include <thread>
#include <type_traits>
#include <utility>
#include <vector>

#include <immintrin.h>
#include <sys/syscall.h>
#include <unistd.h>

#include "xla/ffi/api/ffi.h"

namespace ffi = xla::ffi;

namespace {

void AwaitFinished(const std::atomic<int64_t>& finished, int64_t tasks) {
  while (finished.load(std::memory_order_acquire) < tasks) std::this_thread::yield();
}

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
  AwaitFinished(progress->finished, n);
}

// ParallelFor over dependent phases: the tasks of a phase start once every task of the phase
// before has finished, with the same claiming (and so the same guarantees). One call for many
// phases (a decoder layer's 11) wakes the pool once: at batch-1 sampling a phase is a few
// microseconds of work. The bodies are std::functions (phases differ in type), which is why
// single-phase calls keep ParallelFor: on RunPhases the training step's convolutions took 4 %
// longer (2.12 against 2.03 s per step, two pairs of processes).
struct Phase {
  int64_t tasks;
  std::function<void(int64_t)> body;
};

void RunPhases(ffi::ThreadPool& pool, std::vector<Phase> phases) {
  struct State {
    explicit State(std::vector<Phase> all)
        : phases(std::move(all)), claimed(phases.size()), finished(phases.size()) {}
    const std::vector<Phase> phases;
    std::vector<std::atomic<int64_t>> claimed, finished;
  };
  auto state = std::make_shared<State>(std::move(phases));
  auto work = [state] {
    const std::vector<Phase>& all = state->phases;
    for (size_t p = 0; p < all.size(); ++p) {
      if (p > 0) AwaitFinished(state->finished[p - 1], all[p - 1].tasks);
      for (int64_t i; (i = state->claimed[p].fetch_add(1)) < all[p].tasks;) {
        all[p].body(i);
        state->finished[p].fetch_add(1, std::memory_order_release);
      }
    }
  };
  int64_t widest = 0;
  for (const Phase& phase : state->phases) widest = std::max(widest, phase.tasks);
  const int64_t helpers = std::min<int64_t>(pool.num_threads(), widest) - 1;
  for (int64_t h = 0; h < helpers; ++h) pool.Schedule([work] { work(); });
  work();
  if (!state->phases.empty()) AwaitFinished(state->finished.back(), state->phases.back().tasks);
}

// Reductions keep kLanes independent partial sums, which the compiler holds in vector
// registers: one running sum would wait out an add's latency for every element.
constexpr int64_t kLanes = 16;

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t Vec16i __attribute__((vector_size(64), aligned(4)));
typedef uint16_t Vec16h __attribute__((vector_size(32), aligned(2)));

inline Vec16 Load16Floats(const float* p) { return *reinterpret_cast<const Vec16*>(p); }
inline Vec16 Load16Floats(const uint16_t* p) {  // bfloat16 bits: a float's upper half.
  return reinterpret_cast<Vec16>(
      __builtin_convertvector(*reinterpret_cast<const Vec16h*>(p), Vec16i) << 16);
}

// The sum of v's lanes, pairwise: four dependent adds, where lane after lane took sixteen (a
// batch-28 sampling step's attention spent most of its time there).
inline float SumLanes(Vec16 v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 halves = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 quarters = __builtin_shufflevector(halves, halves, 0, 1, 2, 3) +
                        __builtin_shufflevector(halves, halves, 4, 5, 6, 7);
  return (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]);
}

float Dot(const float* a, const float* b, int64_t n) {
  Vec16 lanes = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    lanes += *reinterpret_cast<const Vec16*>(a + j) * *reinterpret_cast<const Vec16*>(b + j);
  }
  float total = 0.0f;
  for (; j < n; ++j) total += a[j] * b[j];
  return total + SumLanes(lanes);
}

template <typename DimsA, typename DimsB>
bool SameDims(const DimsA& a, const DimsB& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

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
// next panel's start, where the hardware prefetcher would start over: with 10 rows (batch-1
// sampling) a decoder layer streamed its weights at 21 GB/s without, 25-27 GB/s with
// (a prefetch never faults, so reading past the last panel is harmless).
constexpr int64_t kPrefetchSteps = 24;

// Rows [m0, m0 + kRows) of one output panel: y[m, col:col + 32] = x[m, :] @ panel.
template <int kRows>
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

constexpr auto kBlocks = BlockTable<BlockFn>([](auto rows) { return &PanelBlock<rows>; });

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

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// Where the CPU has AMX (Intel Sapphire Rapids and later), PanelBlockBf16 on tiles: one
// tdpbf16ps multiplies kRows x 16 k-pairs of x by 16 k-pairs x 16 columns of the panel, whose
// (K / 2, 32, 2) layout is already the tiles' pair-interleaved one (two tiles per k-step, each
// half of the panel's 32 columns, rows 128 bytes apart). On the 2-core Xeon VM of session 13,
// one thread, 8 panels' worth of weights out of cache: 10 rows of K = 256 into N = 1024 took
// 25 us against vdpbf16ps's 60 (which issues at half the FMA rate there), 288 rows 0.57 ms
// against 1.75 ms. Same products and float32 sums, in another order.
constexpr int64_t kAmxPairs = 16;  // k-pairs per tile step: 64 bytes of each row.

struct TileConfig {
  uint8_t palette, start_row, reserved[14];
  uint16_t bytes_per_row[16];
  uint8_t rows[16];
};

// Linux lets a process use AMX's tile data only after asking for it (arch_prctl, kernel 5.16+).
bool AmxPermitted() {
  constexpr int kRequestPermission = 0x1023, kTileData = 18;  // ARCH_REQ_XCOMP_PERM, XTILEDATA.
  static const bool permitted = syscall(SYS_arch_prctl, kRequestPermission, kTileData) == 0;
  return permitted;
}

// GCC 12's tile intrinsics under-declare what they read (ldtilecfg an 8-byte operand, tileloadd
// none), so stores to a buffer a tile instruction then reads may be dropped as dead or moved past
// it: with the configuration built in a helper the tile loads crashed. Called between the two
// with the buffers, so that their addresses escape to it and its memory clobber covers them.
inline void KeepStoresForTiles(const void* buffer, const void* other = nullptr) {
  asm volatile("" : : "r"(buffer), "r"(other) : "memory");
}

// Tiles 0, 1: the sums of a panel's two 16-column halves for `rows` rows of x, zeroed; 2: x's
// rows (16 k-pairs); 3, 4: the halves' weights for those k-pairs, rows kPanelRowBytes apart.
constexpr int64_t kPanelRowBytes = 2 * kPanelWidth * sizeof(uint16_t);

// Loads the tile configuration: tiles 0, 1, ... of rows[0], rows[1], ... rows of 64 bytes.
void ConfigureTiles(std::initializer_list<int> rows) {
  TileConfig config{};
  config.palette = 1;
  int tile = 0;
  for (const int count : rows) {
    config.rows[tile] = count;
    config.bytes_per_row[tile++] = 64;
  }
  KeepStoresForTiles(&config);
  _tile_loadconfig(&config);
}

// The 2 x 2 tiles of float32 sums (0-3) and the four operand tiles (4-7): 16 rows of 64 bytes.
void ConfigureSquareTiles() {
  ConfigureTiles({kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs, kAmxPairs,
                  kAmxPairs});
}

void StartPanelTiles(int rows) {
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

// A float as a bfloat16 (uint16_t bits; round to nearest even, as XLA converts), or as itself.
// Branch-free, so that loops of it vectorize.
template <typename T>
T FromFloat(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

// exp(x) on 16 lanes as Cephes' expf computes it (within 1.2e-7 of std::exp): x = n ln 2 + r,
// |r| <= ln 2 / 2, exp(x) = 2^n p(r); 0 below -87.34 (float32's smallest normal), so that
// masked logits (lowest) weigh nothing, as in XLA's softmax; NaN stays NaN. libm's expf, one
// value at a time, took a third of a batch-28 sampling step's attention.
inline Vec16 ExpLanes(Vec16 x) {
  constexpr float kHigh = 88.3762626647949f, kLow = -87.3365447505531f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 in two parts.
  Vec16 bounded = x < kHigh ? x : kHigh;
  bounded = bounded > kLow ? bounded : kLow;
  // n = floor(x log2(e) + 1/2); the conversion to int truncates toward zero.
  const Vec16 shifted = bounded * kLog2e + 0.5f;
  Vec16i whole = __builtin_convertvector(shifted, Vec16i);
  whole -= __builtin_convertvector(whole, Vec16) > shifted ? 1 : 0;
  const Vec16 n = __builtin_convertvector(whole, Vec16);
  const Vec16 r = bounded - n * kLn2High - n * kLn2Low;
  Vec16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Vec16i exponent = (whole + 127) << 23;
  Vec16 power;
  std::memcpy(&power, &exponent, sizeof(power));
  const Vec16 result = x > kLow ? p * power : 0.0f;
  return x == x ? result : x;  // NaN stays NaN.
}

// logits[s] = exp(logits[s] - top) for s < count, in place; returns their sum. `logits` has room
// for count rounded up to 16.
float ExpShiftedSum(float* logits, int64_t count, float top) {
  for (int64_t s = 0; s < count; s += kLanes) {
    Vec16 lanes;
    std::memcpy(&lanes, logits + s, sizeof(lanes));
    lanes = ExpLanes(lanes - top);
    std::memcpy(logits + s, &lanes, sizeof(lanes));
  }
  float total = 0.0f;
  for (int64_t s = 0; s < count; ++s) total += logits[s];
  return total;
}

inline int64_t RoundUpToLanes(int64_t count) { return (count + kLanes - 1) / kLanes * kLanes; }

// One head of one sequence, as dpjax.models.transformer._attend computes it:
// out[t] = softmax_s(mask[t, s] ? query[t] . key(s) / sqrt(d) : lowest) @ value(s) over the
// head's d floats; query rows are q_stride apart, out rows out_stride, key(s) and value(s) point
// at row s's d floats. Out: float, or uint16_t to store bfloat16.
template <typename Out, typename KeyRow, typename ValueRow>
void AttendHead(const float* query, int64_t q_stride, int64_t t_dim, int64_t s_dim,
                int64_t d_dim, const bool* mask, KeyRow key, ValueRow value, Out* out,
                int64_t out_stride) {
  const float scale = std::sqrt(static_cast<float>(d_dim));
  std::vector<float> weights(RoundUpToLanes(s_dim)), row(d_dim);
  for (int64_t t = 0; t < t_dim; ++t) {
    float top = std::numeric_limits<float>::lowest();
    for (int64_t s = 0; s < s_dim; ++s) {
      float logit = std::numeric_limits<float>::lowest();
      if (mask[t * s_dim + s]) logit = Dot(query + t * q_stride, key(s), d_dim) / scale;
      weights[s] = logit;
      top = std::max(top, logit);
    }
    const float total = ExpShiftedSum(weights.data(), s_dim, top);
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t s = 0; s < s_dim; ++s) {
      if (weights[s] == 0.0f) continue;  // Masked (or underflowed): adds nothing.
      const float w = weights[s] / total;
      const float* v = value(s);
      for (int64_t j = 0; j < d_dim; ++j) row[j] += w * v[j];
    }
    for (int64_t j = 0; j < d_dim; ++j) out[t * out_stride + j] = FromFloat<Out>(row[j]);
  }
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
  const float* q_data = q.typed_data();
  const float* k_data = k.typed_data();
  const float* v_data = v.typed_data();
  const bool* m_data = mask.typed_data();
  float* o_data = out->typed_data();
  ParallelFor(pool, q_dims[0] * num_heads, [=](int64_t task) {
    const int64_t b = task / num_heads, offset = (task % num_heads) * d_dim;
    const float* keys = k_data + b * s_dim * e_dim + offset;
    const float* values = v_data + b * s_dim * e_dim + offset;
    AttendHead(
        q_data + b * t_dim * e_dim + offset, e_dim, t_dim, s_dim, d_dim, m_data,
        [=](int64_t s) { return keys + s * e_dim; }, [=](int64_t s) { return values + s * e_dim; },
        o_data + b * t_dim * e_dim + offset, e_dim);
  });
  return ffi::Error::Success();
}

constexpr int64_t kNormRowsPerTask = 64;

// y = (x - mean) * (rsqrt(var + eps) * scale) + bias over one row of e_dim floats, var =
// mean(x^2) - mean^2 clipped at 0 (flax's fast variance; sums accumulated in double).
template <typename Out>
void NormalizeRow(const float* row, const float* scale, const float* bias, float epsilon,
                  int64_t e_dim, Out* out) {
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
  for (int64_t j = 0; j < e_dim; ++j) {
    out[j] = FromFloat<Out>((row[j] - mean) * (inv * scale[j]) + bias[j]);
  }
}

// LayerNorm over the last axis of x (M, E), rows in tasks of kNormRowsPerTask.
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
      NormalizeRow(x_data + m * e_dim, s_data, b_data, epsilon, e_dim, y_data + m * e_dim);
    }
  });
  return ffi::Error::Success();
}

// A Dense layer packed as PackedDense or PackedDenseBf16 take it: K x N weights W (float, or
// uint16_t bfloat16 bits) as ceil(N / 32) panels of K * 32 values, float32 bias (N,).
template <typename W>
struct PackedWeights {
  const W* panels;
  const float* bias;
  int64_t k_dim, n_dim;
  int64_t PanelCount() const { return (n_dim + kPanelWidth - 1) / kPanelWidth; }
};

// A decoder layer's arithmetic for weights W: float32 throughout (float), or as the bfloat16
// module computes it (uint16_t): bfloat16 dense inputs and weights with float32 sums, and every
// activation the module stores in bfloat16 rounded to it (softmax and statistics in float32).
template <typename W>
struct Precision;

template <>
struct Precision<float> {
  static float Round(float value) { return value; }
  static void Block(int64_t rows, const float* x, const float* panel, float* tile,
                    int64_t k_dim) {
    kBlocks[rows - 1](x, panel, tile, k_dim, kPanelWidth, 0, 0);
  }
};

#ifdef __AVX512BF16__
template <>
struct Precision<uint16_t> {
  static float Round(float value) {
    const uint32_t bits = static_cast<uint32_t>(FromFloat<uint16_t>(value)) << 16;
    float rounded;
    std::memcpy(&rounded, &bits, sizeof(rounded));
    return rounded;
  }
  static void Block(int64_t rows, const uint16_t* x, const uint16_t* panel, float* tile,
                    int64_t k_dim) {
    kBlocksBf16[rows - 1](x, panel, tile, k_dim / 2, kPanelWidth, 0, 0);
  }
};
#endif

enum class Epilogue { kStore, kGelu, kAdd };

// erf(x) to 2e-7 as Eigen's float erf computes it: a rational function of x on [-4, 4], which
// vectorizes (libm's erfcf took 9 ns a value, half of a batch-1 sampling step's time).
inline float Erf(float x) {
  x = std::clamp(x, -4.0f, 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// jax.nn.gelu(x, approximate=False) = 0.5 x erfc(-x / sqrt(2)) = 0.5 x (1 + erf(x / sqrt(2))).
inline float Gelu(float x) {
  return 0.5f * x * (1.0f + Erf(x * static_cast<float>(M_SQRT1_2)));
}

// Panel p of out = epilogue(x (M, K) @ W + bias), out's rows `stride` apart: kStore writes the
// sums (float out), kGelu their GELU (out: a dense input, W), kAdd adds them to out (float: a
// residual connection).
template <Epilogue kEpilogue, typename W, typename Out>
Phase DensePhase(const PackedWeights<W>& w, const W* x, int64_t m_dim, Out* out,
                 int64_t stride) {
  using P = Precision<W>;
  return {w.PanelCount(), [=](int64_t p) {
            float tile[kMaxRows * kPanelWidth];
            const int64_t col = p * kPanelWidth;
            const int64_t cols = std::min(kPanelWidth, w.n_dim - col);
            const W* panel = w.panels + p * w.k_dim * kPanelWidth;
            // The panel's bias, zero past N (the padding columns are computed, not stored).
            float bias[kPanelWidth] = {};
            std::copy(w.bias + col, w.bias + col + cols, bias);
            for (int64_t m0 = 0; m0 < m_dim; m0 += kMaxRows) {
              const int64_t rows = std::min<int64_t>(kMaxRows, m_dim - m0);
              P::Block(rows, x + m0 * w.k_dim, panel, tile, w.k_dim);
              for (int64_t i = 0; i < rows; ++i) {
                // Whole rows of the tile first (32 wide, in local memory): these loops vectorize.
                float* sums = tile + i * kPanelWidth;
                for (int64_t c = 0; c < kPanelWidth; ++c) sums[c] = P::Round(sums[c] + bias[c]);
                if constexpr (kEpilogue == Epilogue::kGelu) {
                  for (int64_t c = 0; c < kPanelWidth; ++c) sums[c] = Gelu(sums[c]);
                }
                Out* dest = out + (m0 + i) * stride + col;
                for (int64_t c = 0; c < cols; ++c) {
                  if constexpr (kEpilogue == Epilogue::kAdd) {
                    dest[c] = P::Round(dest[c] + sums[c]);
                  } else {
                    dest[c] = FromFloat<Out>(sums[c]);
                  }
                }
              }
            }
          }};
}

// DpjaxDecoderLayer's parameters, in the order of the call's remaining operands.
enum DecoderParam {
  kNorm1Scale, kNorm1Bias, kSelfQkv, kSelfQkvBias, kSelfOut, kSelfOutBias,
  kNorm2Scale, kNorm2Bias, kCrossOutBias,
  kNorm3Scale, kNorm3Bias, kFfnIn, kFfnInBias, kFfnOut, kFfnOutBias, kDecoderParams
};

// A bfloat16 (uint16_t bits) as a float, or a float as itself.
inline float ToFloat(float value) { return value; }
inline float ToFloat(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

// Attention tasks: at batch 1 a phase's few tasks (one per head, 4 rows) keep both threads
// busy; at larger batches whole sequences and 16 rows per task claim their work with fewer
// atomic operations and read each sequence's rows once (batch 28: the self-attention phase
// 230 -> 120 us).
constexpr int64_t kSequencesForWholeTasks = 8;
constexpr int64_t kCrossRowsPerSmallTask = 4, kCrossRowsPerTask = 16;

struct DecoderOperands {
  const float* x;
  const float* shared_memory;
  const float* batch_memory;
  const bool* self_mask;
  const bool* memory_mask;
  std::array<const void*, kDecoderParams> params;
  int64_t b_dim, t_dim, e_dim, f_dim, s0, s1, num_heads;
  float epsilon;
  float* out;
};

template <typename W>
void RunDecoderLayer(ffi::ThreadPool& pool, const DecoderOperands& op) {
  using P = Precision<W>;
  const int64_t m_dim = op.b_dim * op.t_dim, e_dim = op.e_dim, t_dim = op.t_dim;
  const int64_t d_dim = e_dim / op.num_heads, num_heads = op.num_heads, s0 = op.s0, s1 = op.s1;
  auto weights = [&](int index, int64_t k_dim, int64_t n_dim) {
    return PackedWeights<W>{static_cast<const W*>(op.params[index]),
                            static_cast<const float*>(op.params[index + 1]), k_dim, n_dim};
  };
  std::vector<W> normed(m_dim * e_dim), attended(m_dim * e_dim), hidden(m_dim * op.f_dim);
  std::vector<float> qkv(m_dim * 3 * e_dim);
  // Normalizes the rows of `source` (float) into `normed`, copying them to `copy` unless null.
  auto normalize = [&](int index, const float* source, float* copy) -> Phase {
    const float* scale = static_cast<const float*>(op.params[index]);
    const float* bias = static_cast<const float*>(op.params[index + 1]);
    W* dest = normed.data();
    const float epsilon = op.epsilon;
    return {(m_dim + kNormRowsPerTask - 1) / kNormRowsPerTask, [=](int64_t task) {
              const int64_t end = std::min(m_dim, (task + 1) * kNormRowsPerTask);
              for (int64_t m = task * kNormRowsPerTask; m < end; ++m) {
                if (copy) std::copy(source + m * e_dim, source + (m + 1) * e_dim, copy + m * e_dim);
                NormalizeRow(source + m * e_dim, scale, bias, epsilon, e_dim, dest + m * e_dim);
              }
            }};
  };
  const float* qkv_data = qkv.data();
  const float* shared_data = op.shared_memory;
  const float* batch_data = op.batch_memory;
  const bool* self_allowed = op.self_mask;
  const bool* memory_allowed = op.memory_mask;
  W* attended_data = attended.data();
  const int64_t heads_per_task = op.b_dim >= kSequencesForWholeTasks ? num_heads : 1;
  const Phase self_attention{op.b_dim * num_heads / heads_per_task, [=](int64_t task) {
    for (int64_t head = task * heads_per_task; head < (task + 1) * heads_per_task; ++head) {
      const int64_t b = head / num_heads, offset = (head % num_heads) * d_dim;
      const float* rows = qkv_data + b * t_dim * 3 * e_dim + offset;
      AttendHead(
          rows, 3 * e_dim, t_dim, t_dim, d_dim, self_allowed,
          [=](int64_t s) { return rows + s * 3 * e_dim + e_dim; },
          [=](int64_t s) { return rows + s * 3 * e_dim + 2 * e_dim; },
          attended_data + b * t_dim * e_dim + offset, e_dim);
    }
  }};
  float* out = op.out;
  const W* normed_data = normed.data();
  const float* cross_bias = static_cast<const float*>(op.params[kCrossOutBias]);
  // Folded memory rows (transformer.fold_cross_attention): per head h, score_h (E), then per
  // head value_h (E), then per head offset_h. Row m of out gains
  //   sum_h sum_s softmax_s(mask ? normed[m] . score_h(s) + offset_h(s) : lowest) value_h(s)
  // plus the out-projection's bias: the cross-attention with its q and out projections
  // already applied to the memory's keys and values.
  const int64_t cross_rows = op.b_dim >= kSequencesForWholeTasks ? kCrossRowsPerTask
                                                                   : kCrossRowsPerSmallTask;
  const Phase cross_attention{(m_dim + cross_rows - 1) / cross_rows, [=](int64_t task) {
    const int64_t s_dim = s0 + s1, row_length = num_heads * (2 * e_dim + 1);
    std::vector<float> query(e_dim), sums(e_dim), weights(RoundUpToLanes(s_dim));
    std::vector<const float*> rows(s_dim);
    const int64_t end = std::min(m_dim, (task + 1) * cross_rows);
    for (int64_t m = task * cross_rows; m < end; ++m) {
      const int64_t b = m / t_dim, t = m % t_dim;
      for (int64_t s = 0; s < s_dim; ++s) {
        rows[s] = s < s0 ? shared_data + s * row_length
                         : batch_data + (b * s1 + s - s0) * row_length;
      }
      for (int64_t j = 0; j < e_dim; ++j) query[j] = ToFloat(normed_data[m * e_dim + j]);
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t h = 0; h < num_heads; ++h) {
        float top = std::numeric_limits<float>::lowest();
        for (int64_t s = 0; s < s_dim; ++s) {
          float logit = std::numeric_limits<float>::lowest();
          if (memory_allowed[t * s_dim + s]) {
            logit = Dot(query.data(), rows[s] + h * e_dim, e_dim) +
                    rows[s][2 * num_heads * e_dim + h];
          }
          weights[s] = logit;
          top = std::max(top, logit);
        }
        const float total = ExpShiftedSum(weights.data(), s_dim, top);
        for (int64_t s = 0; s < s_dim; ++s) {
          if (weights[s] == 0.0f) continue;  // Masked (or underflowed).
          const float w = weights[s] / total;
          const float* value = rows[s] + (num_heads + h) * e_dim;
          for (int64_t j = 0; j < e_dim; ++j) sums[j] += w * value[j];
        }
      }
      float* dest = out + m * e_dim;
      for (int64_t j = 0; j < e_dim; ++j) {
        dest[j] = P::Round(dest[j] + P::Round(sums[j] + cross_bias[j]));
      }
    }
  }};
  RunPhases(pool, {normalize(kNorm1Scale, op.x, out),
                   DensePhase<Epilogue::kStore>(weights(kSelfQkv, e_dim, 3 * e_dim),
                                                normed.data(), m_dim, qkv.data(), 3 * e_dim),
                   self_attention,
                   DensePhase<Epilogue::kAdd>(weights(kSelfOut, e_dim, e_dim), attended_data,
                                              m_dim, out, e_dim),
                   normalize(kNorm2Scale, out, nullptr), cross_attention,
                   normalize(kNorm3Scale, out, nullptr),
                   DensePhase<Epilogue::kGelu>(weights(kFfnIn, e_dim, op.f_dim), normed.data(),
                                               m_dim, hidden.data(), op.f_dim),
                   DensePhase<Epilogue::kAdd>(weights(kFfnOut, op.f_dim, e_dim), hidden.data(),
                                              m_dim, out, e_dim)});
}

// Whether `panels` and `bias` are a K x N Dense layer packed for PackedDense (float32) or
// PackedDenseBf16 (bfloat16) with a float32 bias.
bool IsPacked(const ffi::AnyBuffer& panels, const ffi::AnyBuffer& bias, int64_t k_dim,
              int64_t n_dim, bool bf16) {
  const int64_t panel_count = (n_dim + kPanelWidth - 1) / kPanelWidth;
  const std::array<int64_t, 3> f32_dims{panel_count, k_dim, kPanelWidth};
  const std::array<int64_t, 4> bf16_dims{panel_count, k_dim / 2, kPanelWidth, 2};
  const std::array<int64_t, 1> bias_dims{n_dim};
  const bool panels_ok =
      bf16 ? panels.element_type() == ffi::DataType::BF16 && k_dim % 2 == 0 &&
                 SameDims(panels.dimensions(), bf16_dims)
           : panels.element_type() == ffi::DataType::F32 &&
                 SameDims(panels.dimensions(), f32_dims);
  return panels_ok && bias.element_type() == ffi::DataType::F32 &&
         SameDims(bias.dimensions(), bias_dims);
}

// DpjaxDecoderLayer: one pre-norm decoder layer in eval mode as dpjax.models.transformer's
// DecoderLayer computes it (nn.TransformerDecoderLayer with norm_first, exact GELU, no dropout):
//   x += SelfAttention(LN1(x)); x += CrossAttention(LN2(x), memory); x += FFN(LN3(x)),
// the memory rows folded with the cross-attention's query and out projections (H (2E + 1)
// floats per row, transformer.fold_cross_attention): the rows of shared_memory (S0, H (2E + 1)),
// the same for every sequence (the timestep's), then those of batch_memory (B, S1, H (2E + 1)).
// Float32 activations in and out; the Dense layers' panels float32, or bfloat16 for the
// bfloat16 module's arithmetic (Precision<uint16_t>). Its 9 steps run as the phases of one
// RunPhases: at batch 1 separate calls spent more time waking the pool and in XLA's small ops
// between them than in their work.
ffi::Error DecoderLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> shared_memory, ffi::Buffer<ffi::F32> batch_memory,
                        ffi::Buffer<ffi::PRED> self_mask, ffi::Buffer<ffi::PRED> memory_mask,
                        ffi::RemainingArgs params, ffi::ResultBuffer<ffi::F32> y,
                        int64_t num_heads, float epsilon) {
  const auto invalid = [] {
    return ffi::Error::InvalidArgument(
        "cpu_kernels decoder_layer: expected float32 x (B, T, E) with E divisible by num_heads, "
        "shared_memory (S0, H (2E + 1)), batch_memory (B, S1, H (2E + 1)), masks (T, T) and "
        "(T, S0 + S1), y (B, T, E), then 15 parameters: per LayerNorm float32 scale and bias "
        "(E,), per Dense its panels (ceil(N / 32), K, 32) float32 or (ceil(N / 32), K / 2, 32, 2) "
        "bfloat16, all alike, and float32 bias (N,), in the order norm1, self_qkv (E -> 3E), "
        "self_out, norm2, the cross-attention's out-projection bias (E,), norm3, ffn_in (E -> F), "
        "ffn_out (F -> E)");
  };
  std::vector<ffi::AnyBuffer> p;
  for (size_t i = 0; i < params.size(); ++i) {
    auto buffer = params.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return invalid();
    p.push_back(*buffer);
  }
  const auto x_dims = x.dimensions();
  const auto shared_dims = shared_memory.dimensions();
  const auto batch_dims = batch_memory.dimensions();
  if (p.size() != kDecoderParams || x_dims.size() != 3 || shared_dims.size() != 2 ||
      batch_dims.size() != 3 || !SameDims(y->dimensions(), x_dims)) {
    return invalid();
  }
  DecoderOperands op{x.typed_data(), shared_memory.typed_data(), batch_memory.typed_data(),
                     self_mask.typed_data(), memory_mask.typed_data(), {},
                     x_dims[0], x_dims[1], x_dims[2],
                     static_cast<int64_t>(p[kFfnInBias].element_count()), shared_dims[0],
                     batch_dims[1], num_heads, epsilon, y->typed_data()};
  for (int i = 0; i < kDecoderParams; ++i) op.params[i] = p[i].untyped_data();
  const int64_t e_dim = op.e_dim, f_dim = op.f_dim;
  const std::array<int64_t, 2> self_mask_dims{op.t_dim, op.t_dim};
  const std::array<int64_t, 2> memory_mask_dims{op.t_dim, op.s0 + op.s1};
  const std::array<int64_t, 1> vector_dims{e_dim};
  bool vectors_ok = true;  // The LayerNorms' parameters and the cross-attention's bias.
  for (int index : {kNorm1Scale, kNorm1Bias, kNorm2Scale, kNorm2Bias, kCrossOutBias, kNorm3Scale,
                    kNorm3Bias}) {
    vectors_ok = vectors_ok && p[index].element_type() == ffi::DataType::F32 &&
                 SameDims(p[index].dimensions(), vector_dims);
  }
  const bool bf16 = p[kSelfQkv].element_type() == ffi::DataType::BF16;
  if (!vectors_ok || num_heads <= 0 || e_dim % num_heads != 0 ||
      shared_dims[1] != num_heads * (2 * e_dim + 1) || batch_dims[0] != op.b_dim ||
      batch_dims[2] != shared_dims[1] ||
      !SameDims(self_mask.dimensions(), self_mask_dims) ||
      !SameDims(memory_mask.dimensions(), memory_mask_dims) ||
      !IsPacked(p[kSelfQkv], p[kSelfQkvBias], e_dim, 3 * e_dim, bf16) ||
      !IsPacked(p[kSelfOut], p[kSelfOutBias], e_dim, e_dim, bf16) ||
      !IsPacked(p[kFfnIn], p[kFfnInBias], e_dim, f_dim, bf16) ||
      !IsPacked(p[kFfnOut], p[kFfnOutBias], f_dim, e_dim, bf16)) {
    return invalid();
  }
  if (!bf16) {
    RunDecoderLayer<float>(pool, op);
    return ffi::Error::Success();
  }
#ifdef __AVX512BF16__
  RunDecoderLayer<uint16_t>(pool, op);
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "cpu_kernels decoder_layer (bfloat16): this CPU has no AVX512-BF16");
#endif
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

constexpr int64_t kPositionMajorMaxPixels = 36;  // cpu_kernels.py: _POSITION_MAJOR_MAX_PIXELS

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
    return TapsAtPosition(q / n);
  }
  // The taps inside the image for output position `position` (row-major into (Ho, Wo)).
  Taps TapsAtPosition(int64_t position) const {
    const int64_t oy = position / wo, ox = position % wo;
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

constexpr auto kConvBlocks = BlockTable<ConvBlockFn>([](auto rows) { return &ConvBlock<rows>; });

#ifdef __AVX512BF16__
// ConvBlock for bfloat16 x and a (C_out / 32, K / 2, 32, 2) panel (PackedDenseBf16's layout):
// consecutive k of a segment are adjacent channels, so each pair of them is one 32-bit load.
// Needs even C (then every tap range and segment starts on a pair).
template <int kRows>
void ConvBlockBf16(const uint16_t* const* rows, uint16_t* const* outs, const uint16_t* panel,
                   const Taps& taps, int64_t length, int64_t row_stride) {
  __m512 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t ky = taps.ky_begin; ky < taps.ky_end; ++ky) {
    const uint16_t* segments[kRows];
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) segments[i] = rows[i] + ky * row_stride;
    const uint16_t* weights = panel + ky * length * kPanelWidth;
    for (int64_t j = taps.j_begin; j < taps.j_end; j += 2) {
      const __m512bh w_lo = (__m512bh)_mm512_loadu_si512(weights + j * kPanelWidth);
      const __m512bh w_hi = (__m512bh)_mm512_loadu_si512(weights + j * kPanelWidth + 32);
#pragma GCC unroll 16
      for (int i = 0; i < kRows; ++i) {
        uint32_t pair;
        std::memcpy(&pair, segments[i] + j, sizeof(pair));
        const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(pair));
        lo[i] = _mm512_dpbf16_ps(lo[i], xv, w_lo);
        hi[i] = _mm512_dpbf16_ps(hi[i], xv, w_hi);
      }
    }
  }
  // Rounded to nearest even, as XLA converts.
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(outs[i]), (__m256i)_mm512_cvtneps_pbh(lo[i]));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(outs[i] + 16),
                        (__m256i)_mm512_cvtneps_pbh(hi[i]));
  }
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// out[0:32] = in[0:32] rounded to bfloat16 (to nearest even, as XLA converts).
inline void StoreRoundedRow(const float* in, uint16_t* out) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out),
                      (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in)));
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(out + 16),
                      (__m256i)_mm512_cvtneps_pbh(_mm512_loadu_ps(in + 16)));
}

// ConvBlockBf16 on AMX tiles (PanelBlockAmx): a pixel's segment is not at a fixed stride from
// the next one's, so each 16 k-pairs of the rows are copied into a tile-shaped buffer first
// (zero past the taps' range, whose weights then come from a zero-padded copy as well).
template <int kRows>
void ConvBlockAmx(const uint16_t* const* rows, uint16_t* const* outs, const uint16_t* panel,
                  const Taps& taps, int64_t length, int64_t row_stride) {
  if (!AmxPermitted()) {
    ConvBlockBf16<kRows>(rows, outs, panel, taps, length, row_stride);
    return;
  }
  constexpr int64_t kChunk = 2 * kAmxPairs;  // Values of a segment per tile step.
  alignas(64) uint16_t x_tile[kRows * kChunk];
  alignas(64) uint16_t tail_weights[kAmxPairs * 2 * kPanelWidth];
  alignas(64) float sums[kRows * kPanelWidth];
  StartPanelTiles(kRows);
  for (int64_t ky = taps.ky_begin; ky < taps.ky_end; ++ky) {
    const uint16_t* weights = panel + ky * length * kPanelWidth;
    for (int64_t j = taps.j_begin; j < taps.j_end; j += kChunk) {
      const int64_t count = std::min(kChunk, taps.j_end - j);
      for (int i = 0; i < kRows; ++i) {
        const uint16_t* segment = rows[i] + ky * row_stride + j;
        std::copy(segment, segment + count, x_tile + i * kChunk);
        std::fill(x_tile + i * kChunk + count, x_tile + (i + 1) * kChunk, uint16_t{0});
      }
      const uint16_t* w = weights + j * kPanelWidth;
      if (count < kChunk) {
        std::copy(w, w + count * kPanelWidth, tail_weights);
        std::fill(tail_weights + count * kPanelWidth, std::end(tail_weights), uint16_t{0});
        w = tail_weights;
      }
      KeepStoresForTiles(x_tile, w);
      _tile_loadd(2, x_tile, kChunk * sizeof(uint16_t));
      _tile_loadd(3, w, kPanelRowBytes);
      _tile_loadd(4, w + kPanelWidth, kPanelRowBytes);
      _tile_dpbf16ps(0, 2, 3);
      _tile_dpbf16ps(1, 2, 4);
    }
  }
  _tile_stored(0, sums, kPanelWidth * sizeof(float));
  _tile_stored(1, sums + 16, kPanelWidth * sizeof(float));
  _tile_release();
  for (int i = 0; i < kRows; ++i) StoreRoundedRow(sums + i * kPanelWidth, outs[i]);
}
#endif

using ConvBlockBf16Fn = void (*)(const uint16_t* const*, uint16_t* const*, const uint16_t*,
                                 const Taps&, int64_t, int64_t);

constexpr auto kConvBlocksBf16 = BlockTable<ConvBlockBf16Fn>([](auto rows) {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return &ConvBlockAmx<rows>;
#else
  return &ConvBlockBf16<rows>;
#endif
});
#endif

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

constexpr auto kKernelGradBlocks =
    BlockTable<KernelGradBlockFn>([](auto rows) { return &KernelGradBlock<rows>; });

#ifdef __AVX512BF16__
// KernelGradBlock for bfloat16 operands in image pairs (PairImages): each uint32_t of `segment`
// and `dy` holds two images' values at one place, so a pixel pair's patch value is one
// broadcast, 16 columns' gradients one vector, and vdpbf16ps sums both images' products.
template <int kRows>
void KernelGradBlockBf16(const uint32_t* segment, const int64_t* x_offsets, const uint32_t* dy,
                         const int64_t* dy_offsets, int64_t count, float* dw, int64_t n_dim) {
  __m512 lo[kRows], hi[kRows];
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) lo[i] = hi[i] = _mm512_setzero_ps();
  for (int64_t p = 0; p < count; ++p) {
    const uint32_t* patch = segment + x_offsets[p];
    const __m512bh g_lo = (__m512bh)_mm512_loadu_si512(dy + dy_offsets[p]);
    const __m512bh g_hi = (__m512bh)_mm512_loadu_si512(dy + dy_offsets[p] + 16);
#pragma GCC unroll 16
    for (int i = 0; i < kRows; ++i) {
      const __m512bh xv = (__m512bh)_mm512_set1_epi32(static_cast<int>(patch[i]));
      lo[i] = _mm512_dpbf16_ps(lo[i], xv, g_lo);
      hi[i] = _mm512_dpbf16_ps(hi[i], xv, g_hi);
    }
  }
#pragma GCC unroll 16
  for (int i = 0; i < kRows; ++i) {
    _mm512_storeu_ps(dw + i * n_dim, _mm512_add_ps(_mm512_loadu_ps(dw + i * n_dim), lo[i]));
    _mm512_storeu_ps(dw + i * n_dim + 16,
                     _mm512_add_ps(_mm512_loadu_ps(dw + i * n_dim + 16), hi[i]));
  }
}

using KernelGradBlockBf16Fn = void (*)(const uint32_t*, const int64_t*, const uint32_t*,
                                       const int64_t*, int64_t, float*, int64_t);

constexpr auto kKernelGradBlocksBf16 =
    BlockTable<KernelGradBlockBf16Fn>([](auto rows) { return &KernelGradBlockBf16<rows>; });
#endif

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

// y (N, Ho, Wo, C_out) = conv(x, kernel) in float32 sums, x padded (its outer `pad` rows and
// columns zeros) and the kernel packed by `blocks`' layout: (C_out / 32, KH·KW·C, 32) float32 or
// (C_out / 32, KH·KW·C / 2, 32, 2) bfloat16 pairs; y in T too. Tasks: up to 96 pixels of one
// run x one panel.
template <typename T, typename Blocks>
void ConvOverPanels(ffi::ThreadPool& pool, const Blocks& blocks, const ConvGeometry& g,
                    const T* x_data, const T* panel_data, int64_t panel_count, T* y_data,
                    int64_t n_dim) {
  const int64_t run = g.RunLength(), k_dim = g.kh * g.SegmentLength();
  const int64_t blocks_per_run = (run + kConvPixelsPerTask - 1) / kConvPixelsPerTask;
  const int64_t tasks = g.Pixels() / run * blocks_per_run * panel_count;
  ParallelFor(pool, tasks, [=, &g, &blocks](int64_t task) {
    const int64_t p = task % panel_count, block = task / panel_count;
    const int64_t run_begin = block / blocks_per_run * run;
    const int64_t begin = run_begin + block % blocks_per_run * kConvPixelsPerTask;
    const int64_t end = std::min(run_begin + run, begin + kConvPixelsPerTask);
    const T* panel = panel_data + p * k_dim * kPanelWidth;
    const Taps taps = g.TapsAt(begin);
    const T* rows[kMaxRows];
    T* outs[kMaxRows];
    for (int64_t q0 = begin; q0 < end; q0 += kMaxRows) {
      const int64_t count = std::min<int64_t>(kMaxRows, end - q0);
      for (int64_t i = 0; i < count; ++i) {
        const int64_t m = g.Pixel(q0 + i);
        rows[i] = x_data + g.PixelOffset(m);
        outs[i] = y_data + m * n_dim + p * kPanelWidth;
      }
      blocks[count - 1](rows, outs, panel, taps, g.SegmentLength(), g.RowStride());
    }
  });
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The bfloat16 convolution on AMX tiles, 16 images at a time (N a multiple of 16, KW·C of 32):
// an A tile is the 16 images' 32 consecutive values of a kernel row's segment at one place of
// the input, rows a whole image apart, read in place; a B tile 16 k-pairs of one half of a panel
// (as PanelBlockAmx's). So one tdpbf16ps sums 32 products for 16 images x 16 output channels at
// one output position, taps in the zero border skipped (all 16 images share the position; whole
// kernel rows only where C is not a multiple of 32), any stride. Two positions x a panel's two
// halves are the 2 x 2 tiles of sums; rounded to bfloat16 as ConvBlockBf16 does.
constexpr int64_t kImagesPerTile = 16;
constexpr int64_t kPositionsPerConvTask = 16;

void ConvAmx(ffi::ThreadPool& pool, const ConvGeometry& g, const uint16_t* x,
             const uint16_t* panels, int64_t panel_count, uint16_t* y, int64_t n_dim) {
  const int64_t image_blocks = g.n / kImagesPerTile, pixels = g.ho * g.wo;
  const int64_t k_dim = g.kh * g.SegmentLength(), image_size = g.hp * g.wp * g.c;
  const int64_t chunks = (pixels + kPositionsPerConvTask - 1) / kPositionsPerConvTask;
  ParallelFor(pool, image_blocks * chunks * panel_count, [=, &g](int64_t task) {
    const int64_t p = task % panel_count, chunk = task / panel_count % chunks;
    const int64_t block = task / panel_count / chunks;
    const uint16_t* panel = panels + p * k_dim * kPanelWidth;
    const uint16_t* images = x + block * kImagesPerTile * image_size;
    uint16_t* out = y + block * kImagesPerTile * pixels * n_dim + p * kPanelWidth;
    ConfigureSquareTiles();
    const int64_t x_stride = image_size * sizeof(uint16_t);
    alignas(64) float sums[kImagesPerTile * kPanelWidth];
    const int64_t end = std::min(pixels, (chunk + 1) * kPositionsPerConvTask);
    for (int64_t q0 = chunk * kPositionsPerConvTask; q0 < end; q0 += 2) {
      const int64_t count = std::min<int64_t>(2, end - q0);
      Taps taps[2];
      const uint16_t* corners[2];
      Taps all{g.kh, 0, g.SegmentLength(), 0};  // The union of both positions' taps.
      for (int64_t i = 0; i < count; ++i) {
        const int64_t q = q0 + i;
        taps[i] = g.TapsAtPosition(q);
        if (g.c % (2 * kAmxPairs) != 0) {  // Tile steps span taps: whole kernel rows.
          taps[i].j_begin = 0;
          taps[i].j_end = g.SegmentLength();
        }
        corners[i] = images + (q / g.wo * g.stride * g.wp + q % g.wo * g.stride) * g.c;
        all = {std::min(all.ky_begin, taps[i].ky_begin), std::max(all.ky_end, taps[i].ky_end),
               std::min(all.j_begin, taps[i].j_begin), std::max(all.j_end, taps[i].j_end)};
      }
      _tile_zero(0);
      _tile_zero(1);
      _tile_zero(2);
      _tile_zero(3);
      for (int64_t ky = all.ky_begin; ky < all.ky_end; ++ky) {
        const uint16_t* weights = panel + ky * g.SegmentLength() * kPanelWidth;
        for (int64_t j = all.j_begin; j < all.j_end; j += 2 * kAmxPairs) {
          _tile_loadd(6, weights + j * kPanelWidth, kPanelRowBytes);
          _tile_loadd(7, weights + j * kPanelWidth + kPanelWidth, kPanelRowBytes);
          const auto inside = [&](int64_t i) {
            return ky >= taps[i].ky_begin && ky < taps[i].ky_end && j >= taps[i].j_begin &&
                   j < taps[i].j_end;
          };
          if (inside(0)) {
            _tile_loadd(4, corners[0] + ky * g.RowStride() + j, x_stride);
            _tile_dpbf16ps(0, 4, 6);
            _tile_dpbf16ps(1, 4, 7);
          }
          if (count == 2 && inside(1)) {
            _tile_loadd(5, corners[1] + ky * g.RowStride() + j, x_stride);
            _tile_dpbf16ps(2, 5, 6);
            _tile_dpbf16ps(3, 5, 7);
          }
        }
      }
      const auto write = [&](int64_t i) {  // The sums of position q0 + i, stored in `sums`.
        for (int64_t image = 0; image < kImagesPerTile; ++image) {
          StoreRoundedRow(sums + image * kPanelWidth, out + (image * pixels + q0 + i) * n_dim);
        }
      };
      constexpr int64_t kSumsStride = kPanelWidth * sizeof(float);
      _tile_stored(0, sums, kSumsStride);
      _tile_stored(1, sums + 16, kSumsStride);
      write(0);
      if (count == 2) {
        _tile_stored(2, sums, kSumsStride);
        _tile_stored(3, sums + 16, kSumsStride);
        write(1);
      }
    }
    _tile_release();
  });
}
#endif

// The checks of a conv forward call, then ConvOverPanels with `blocks`; T is float (panels
// (C_out / 32, K, 32)) or uint16_t bfloat16 (pairs: (C_out / 32, K / 2, 32, 2), C even).
template <typename T, typename Blocks, typename Buffer, typename Result>
ffi::Error CheckedConv(ffi::ThreadPool& pool, const Blocks& blocks, const Buffer& x,
                       const Buffer& panels, Result& y, int64_t kh, int64_t kw, int64_t stride,
                       int64_t pad) {
  constexpr int64_t kPair = sizeof(T) == 2 ? 2 : 1;
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  const int64_t n_dim = y_dims.size() == 4 ? y_dims[3] : 0;
  if (auto error = CheckConvOperands(x_dims, kh, kw, stride, pad, n_dim, y_dims, "conv");
      error.failure()) {
    return error;
  }
  if (x_dims[3] % kPair != 0 || p_dims.size() != (kPair == 2 ? 4 : 3) ||
      p_dims[0] * kPanelWidth != n_dim || p_dims[1] * kPair != kh * kw * x_dims[3] ||
      p_dims[2] != kPanelWidth || (kPair == 2 && p_dims[3] != 2)) {
    return ffi::Error::InvalidArgument(
        kPair == 2 ? "cpu_kernels conv (bfloat16): expected an even C and panels (C_out / 32, "
                     "KH * KW * C / 2, 32, 2)"
                   : "cpu_kernels conv: expected panels (C_out / 32, KH * KW * C, 32)");
  }
  ConvGeometry g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1],
                 y_dims[2], kh,        kw,        stride,    pad};
  const T* x_data = reinterpret_cast<const T*>(x.typed_data());
  const T* panel_data = reinterpret_cast<const T*>(panels.typed_data());
  T* y_data = reinterpret_cast<T*>(y->typed_data());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  // bfloat16: 16 images at a time on tiles, any rest of them as below.
  if (std::is_same_v<T, uint16_t> && g.SegmentLength() % (2 * kAmxPairs) == 0 &&
      g.n >= kImagesPerTile &&
      AmxPermitted()) {
    const int64_t tiled = g.n / kImagesPerTile * kImagesPerTile;
    ConvAmx(pool, ConvGeometry{tiled, g.hp, g.wp, g.c, g.ho, g.wo, kh, kw, stride, pad},
            reinterpret_cast<const uint16_t*>(x_data),
            reinterpret_cast<const uint16_t*>(panel_data), p_dims[0],
            reinterpret_cast<uint16_t*>(y_data), n_dim);
    x_data += tiled * g.hp * g.wp * g.c;
    y_data += tiled * g.ho * g.wo * n_dim;
    g.n -= tiled;
    if (g.n == 0) return ffi::Error::Success();
  }
#endif
  ConvOverPanels(pool, blocks, g, x_data, panel_data, p_dims[0], y_data, n_dim);
  return ffi::Error::Success();
}

ffi::Error ConvForward(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                       ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y, int64_t kh,
                       int64_t kw, int64_t stride, int64_t pad) {
  return CheckedConv<float>(pool, kConvBlocks, x, panels, y, kh, kw, stride, pad);
}

// DpjaxConvBf16: ConvForward of bfloat16 x and kernel (float32 sums rounded once to a bfloat16
// y), C even.
ffi::Error ConvForwardBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                           ffi::Buffer<ffi::BF16> panels, ffi::ResultBuffer<ffi::BF16> y,
                           int64_t kh, int64_t kw, int64_t stride, int64_t pad) {
#ifdef __AVX512BF16__
  return CheckedConv<uint16_t>(pool, kConvBlocksBf16, x, panels, y, kh, kw, stride, pad);
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "cpu_kernels conv (bfloat16): this CPU has no AVX512-BF16");
#endif
}

// Winograd F(2x2, 3x3) (Lavin & Gray 2016) for float32 stride-1 3x3 convolutions on maps larger
// than the position-major ones: each 2 x 2 block of output pixels ("tile") reads a 4 x 4 patch
// d of the padded input, and y_tile = A^T [(G g G^T) ⊙ (B^T d B)] A. Per tile and channel pair
// that is 16 products where the direct convolution does 36: on ResNet-18's 19 x 19 and 10 x 10
// maps, 2.0-2.25x fewer FLOPs (the float32 step is bound by the FMA rate). The kernel comes
// transformed (U = G g G^T, `cpu_kernels.winograd_panels`) as (16, C_out / 32, C, 32) panels;
// a task transforms kWinogradTiles tiles' patches into V (16, tiles, C), multiplies each of the
// 16 elements' (tiles, C) rows with its panels into M (16, tiles, C_out) — PanelBlock's GEMM,
// its operands cache-resident — and transforms M back into y. Transforms only add and subtract,
// so products and sums are rounded as in a direct convolution, in a different order.
constexpr int64_t kWinogradTiles = 12;

// B^T d B for one 4 x 4 patch (16 channels per vector), d[row][col] → v[4 row + col].
inline void PatchTransform(const Vec16 d[4][4], Vec16 v[16]) {
  Vec16 t[4][4];
  for (int col = 0; col < 4; ++col) {
    t[0][col] = d[0][col] - d[2][col];
    t[1][col] = d[1][col] + d[2][col];
    t[2][col] = d[2][col] - d[1][col];
    t[3][col] = d[1][col] - d[3][col];
  }
  for (int row = 0; row < 4; ++row) {
    v[4 * row + 0] = t[row][0] - t[row][2];
    v[4 * row + 1] = t[row][1] + t[row][2];
    v[4 * row + 2] = t[row][2] - t[row][1];
    v[4 * row + 3] = t[row][1] - t[row][3];
  }
}

// A^T m A: m[4 row + col] → the tile's outputs y[row][col], 2 x 2.
inline void TileTransform(const Vec16 m[16], Vec16 y[2][2]) {
  Vec16 s[2][4];
  for (int col = 0; col < 4; ++col) {
    s[0][col] = m[col] + m[4 + col] + m[8 + col];
    s[1][col] = m[4 + col] - m[8 + col] - m[12 + col];
  }
  for (int row = 0; row < 2; ++row) {
    y[row][0] = s[row][0] + s[row][1] + s[row][2];
    y[row][1] = s[row][1] - s[row][2] - s[row][3];
  }
}

// The 2 x 2 output tiles of a 3x3 convolution of x padded (N, Hp, Wp, C) into (N, Ho, Wo, ·),
// Ho = Hp - 2 and Wo = Wp - 2, numbered image by image and row-major within one; a tile's
// output pixel (row, col) is also its 4 x 4 patch's corner in x.
struct WinogradTiles {
  int64_t n, hp, wp, c, ho, wo;

  int64_t Across() const { return (wo + 1) / 2; }
  int64_t PerImage() const { return (ho + 1) / 2 * Across(); }
  int64_t Count() const { return n * PerImage(); }
  int64_t Image(int64_t tile) const { return tile / PerImage(); }
  int64_t Row(int64_t tile) const { return tile % PerImage() / Across() * 2; }
  int64_t Col(int64_t tile) const { return tile % Across() * 2; }
};

// v (16, `rows`, C) [e][t] = B^T d B for tiles t = 0 .. count - 1 from `first`, d their patches.
void TransformPatches(const WinogradTiles& g, const float* x, int64_t first, int64_t count,
                      float* v, int64_t rows) {
  for (int64_t t = 0; t < count; ++t) {
    const int64_t image = g.Image(first + t), row = g.Row(first + t), col = g.Col(first + t);
    const float* patch = x + ((image * g.hp + row) * g.wp + col) * g.c;
    // Odd Ho or Wo: the last tiles' patches reach one row or column past the padded input.
    const int64_t inside_rows = std::min<int64_t>(4, g.hp - row);
    const int64_t inside_cols = std::min<int64_t>(4, g.wp - col);
    for (int64_t c0 = 0; c0 < g.c; c0 += 16) {
      Vec16 d[4][4], transformed[16];
      for (int i = 0; i < 4; ++i) {
        for (int j = 0; j < 4; ++j) {
          d[i][j] = i < inside_rows && j < inside_cols
                        ? Load16Floats(patch + (i * g.wp + j) * g.c + c0)
                        : Vec16{};
        }
      }
      PatchTransform(d, transformed);
      for (int e = 0; e < 16; ++e) {
        *reinterpret_cast<Vec16*>(v + (e * rows + t) * g.c + c0) = transformed[e];
      }
    }
  }
}

// Whether x (N, Hp, Wp, C), C a multiple of 16, and out (N, Hp - 2, Wp - 2, C_out), C_out a
// multiple of 32, are the operands of a Winograd convolution.
bool WinogradOperands(const ffi::Span<const int64_t>& x_dims,
                      const ffi::Span<const int64_t>& out_dims) {
  return x_dims.size() == 4 && out_dims.size() == 4 && x_dims[3] % 16 == 0 && x_dims[1] >= 3 &&
         x_dims[2] >= 3 && out_dims[0] == x_dims[0] && out_dims[1] == x_dims[1] - 2 &&
         out_dims[2] == x_dims[2] - 2 && out_dims[3] % kPanelWidth == 0;
}

// y (N, Hp - 2, Wp - 2, C_out) = the 3x3 convolution of x padded (N, Hp, Wp, C), C a multiple of
// 16, with the kernel whose transform `panels` holds.
ffi::Error WinogradConv(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> panels, ffi::ResultBuffer<ffi::F32> y) {
  const auto x_dims = x.dimensions();
  const auto p_dims = panels.dimensions();
  const auto y_dims = y->dimensions();
  if (!WinogradOperands(x_dims, y_dims) || p_dims.size() != 4 || p_dims[0] != 16 ||
      p_dims[2] != x_dims[3] || p_dims[3] != kPanelWidth || y_dims[3] != p_dims[1] * kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_conv: expected x (N, Hp, Wp, C), C a multiple of 16, panels (16, "
        "C_out / 32, C, 32) and y (N, Hp - 2, Wp - 2, C_out)");
  }
  const WinogradTiles g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], y_dims[1], y_dims[2]};
  const int64_t c = g.c, c_out = y_dims[3], panel_count = p_dims[1], tiles = g.Count();
  const float* x_data = x.typed_data();
  const float* panel_data = panels.typed_data();
  float* y_data = y->typed_data();
  const int64_t tasks = (tiles + kWinogradTiles - 1) / kWinogradTiles;
  ParallelFor(pool, tasks, [=](int64_t task) {
    thread_local std::vector<float> v_buffer, m_buffer;
    v_buffer.resize(16 * kWinogradTiles * c);
    m_buffer.resize(16 * kWinogradTiles * c_out);
    float* v_data = v_buffer.data();
    float* m_data = m_buffer.data();
    const int64_t first = task * kWinogradTiles;
    const int64_t count = std::min(kWinogradTiles, tiles - first);
    TransformPatches(g, x_data, first, count, v_data, kWinogradTiles);
    for (int64_t e = 0; e < 16; ++e) {
      const float* v_rows = v_data + e * kWinogradTiles * c;
      float* m_rows = m_data + e * kWinogradTiles * c_out;
      for (int64_t p = 0; p < panel_count; ++p) {
        const float* panel = panel_data + (e * panel_count + p) * c * kPanelWidth;
        for (int64_t m0 = 0; m0 < count; m0 += kMaxRows) {
          const int64_t block = std::min<int64_t>(kMaxRows, count - m0);
          kBlocks[block - 1](v_rows, panel, m_rows, c, c_out, m0, p * kPanelWidth);
        }
      }
    }
    for (int64_t t = 0; t < count; ++t) {
      const int64_t row = g.Row(first + t), col = g.Col(first + t);
      float* out = y_data + ((g.Image(first + t) * g.ho + row) * g.wo + col) * c_out;
      const int rows = std::min<int64_t>(2, g.ho - row), cols = std::min<int64_t>(2, g.wo - col);
      for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
        Vec16 m[16], tile[2][2];
        for (int e = 0; e < 16; ++e) {
          m[e] = Load16Floats(m_data + (e * kWinogradTiles + t) * c_out + c0);
        }
        TileTransform(m, tile);
        for (int i = 0; i < rows; ++i) {
          for (int j = 0; j < cols; ++j) {
            *reinterpret_cast<Vec16*>(out + (i * g.wo + j) * c_out + c0) = tile[i][j];
          }
        }
      }
    }
  });
  return ffi::Error::Success();
}

// The geometry of a kernel-gradient call, after its checks: dw (KH, KW, C, C_out) for padded
// x (N, Hp, Wp, C) and dy (N, Ho, Wo, C_out).
ffi::Error KernelGradGeometry(const ffi::Span<const int64_t>& x_dims,
                              const ffi::Span<const int64_t>& dy_dims,
                              const ffi::Span<const int64_t>& w_dims, int64_t stride, int64_t pad,
                              ConvGeometry* g) {
  if (w_dims.size() != 4 || x_dims.size() != 4 || w_dims[2] != x_dims[3]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels conv_kernel_grad: expected dw (KH, KW, C, C_out) for x (N, Hp, Wp, C)");
  }
  if (auto error = CheckConvOperands(x_dims, w_dims[0], w_dims[1], stride, pad, w_dims[3],
                                     dy_dims, "conv_kernel_grad");
      error.failure()) {
    return error;
  }
  *g = ConvGeometry{x_dims[0], x_dims[1], x_dims[2], x_dims[3], dy_dims[1],
                    dy_dims[2], w_dims[0], w_dims[1], stride,    pad};
  return ffi::Error::Success();
}

// dw += the other chunks' sums of it (chunks - 1 of `size` floats each in `partial`).
void AddPartials(ffi::ThreadPool& pool, float* dw, const float* partial, int64_t chunks,
                 int64_t size) {
  constexpr int64_t kFloatsPerTask = 1 << 14;
  ParallelFor(pool, (size + kFloatsPerTask - 1) / kFloatsPerTask, [=](int64_t task) {
    const int64_t begin = task * kFloatsPerTask, end = std::min(size, begin + kFloatsPerTask);
    for (int64_t c = 1; c < chunks; ++c) {
      const float* part = partial + (c - 1) * size;
      for (int64_t i = begin; i < end; ++i) dw[i] += part[i];
    }
  });
}

constexpr int64_t kRowBlockTasksPerThread = 4;

// Copies `count` rows of `length` values, `stride` apart in `source`, to rows `out_stride` apart.
template <typename T>
void CopyRows(const T* source, int64_t stride, int64_t count, int64_t length, T* out,
              int64_t out_stride) {
  for (int64_t i = 0; i < count; ++i) {
    std::copy_n(source + i * stride, length, out + i * out_stride);
  }
}

// KernelGradOverPanels on small maps (ConvGeometry::PositionMajor), whose pixels go position
// by position: there one position's pixels are a whole image apart in x and dy, at strides
// (e.g. 50 KB, 18 KB) that map every one of them into the same two sets of the L1 cache, so
// each patch value and gradient row was a cache miss. Here x and dy are first copied position-
// major, (Hp·Wp, N, C) and (Ho·Wo, N, C_out), each image's row padded by a cache line so that
// consecutive images' rows fall into different sets. Tasks own ranges of dw's 12-row blocks
// with all of their columns: every x line is read by one task, for all 32-column panels.
template <typename T, typename Blocks>
void KernelGradByRowBlocks(ffi::ThreadPool& pool, const Blocks& blocks, const ConvGeometry& g,
                           const T* x_data, const T* dy_data, float* dw_data, int64_t n_dim) {
  constexpr int64_t kLinePad = 64 / sizeof(T);
  const int64_t places = g.hp * g.wp, positions = g.ho * g.wo, c = g.c;
  const int64_t x_row = c + kLinePad, dy_row = n_dim + kLinePad;
  std::unique_ptr<T[]> x_by_place(new T[places * g.n * x_row]);
  std::unique_ptr<T[]> dy_by_position(new T[positions * g.n * dy_row]);
  T* xt = x_by_place.get();
  T* dyt = dy_by_position.get();
  ParallelFor(pool, places + positions, [=, &g](int64_t task) {
    if (task < places) {
      CopyRows(x_data + task * c, places * c, g.n, c, xt + task * g.n * x_row, x_row);
    } else {
      const int64_t position = task - places;
      CopyRows(dy_data + position * n_dim, positions * n_dim, g.n, n_dim,
               dyt + position * g.n * dy_row, dy_row);
    }
  });
  const int64_t length = g.SegmentLength(), per_row = (length + kMaxRows - 1) / kMaxRows;
  const int64_t row_blocks = g.kh * per_row;
  const int64_t tasks =
      std::min(row_blocks, kRowBlockTasksPerThread * (pool.num_threads() + 1));
  ParallelFor(pool, tasks, [=, &g, &blocks](int64_t task) {
    const int64_t first = task * row_blocks / tasks, last = (task + 1) * row_blocks / tasks;
    for (int64_t b = first; b < last; ++b) {
      const int64_t ky = b / per_row, j0 = b % per_row * kMaxRows;
      const int64_t rows = std::min<int64_t>(kMaxRows, length - j0);
      std::fill_n(dw_data + (ky * length + j0) * n_dim, rows * n_dim, 0.0f);
    }
    int64_t x_offsets[kGradPixelsPerBlock], dy_offsets[kGradPixelsPerBlock];
    for (int64_t position = 0; position < positions; ++position) {
      const Taps taps = g.TapsAtPosition(position);
      const int64_t corner = (position / g.wo * g.wp + position % g.wo) * g.stride;
      for (int64_t i0 = 0; i0 < g.n; i0 += kGradPixelsPerBlock) {
        const int64_t count = std::min(kGradPixelsPerBlock, g.n - i0);
        for (int64_t i = 0; i < count; ++i) {
          x_offsets[i] = (corner * g.n + i0 + i) * x_row;
          dy_offsets[i] = (position * g.n + i0 + i) * dy_row;
        }
        for (int64_t b = first; b < last; ++b) {
          const int64_t ky = b / per_row, j0 = b % per_row * kMaxRows;
          if (ky < taps.ky_begin || ky >= taps.ky_end) continue;
          const int64_t hi = std::min({j0 + kMaxRows, length, taps.j_end});
          // The block's values tap by tap: a tap's C values are one image row of x_by_place.
          for (int64_t lo = std::max(j0, taps.j_begin), end; lo < hi; lo = end) {
            const int64_t kx = lo / c;
            end = std::min(hi, (kx + 1) * c);
            const T* segment = xt + (ky * g.wp + kx) * g.n * x_row + lo % c;
            float* out = dw_data + (ky * length + lo) * n_dim;
            for (int64_t col = 0; col < n_dim; col += kPanelWidth) {
              blocks[end - lo - 1](segment, x_offsets, dyt + col, dy_offsets, count, out + col,
                                   n_dim);
            }
          }
        }
      }
    }
  });
}

// dw (KH, KW, C, C_out) = sum over output pixels m of patch(m)^T dy[m], x padded as for
// ConvForward, with `blocks` over elements T of x and dy (float; or, for bfloat16, uint32_t
// image pairs). Small maps go by KernelGradByRowBlocks. Otherwise tasks are (pixel chunk, group
// of 32-column panels): each chunk sums into its own copy of dw (added up at the end), so there
// are enough tasks to share while the copies stay few: many pixels (high-resolution layers)
// split into chunks, wide kernels into groups. Within a task, pixels go in blocks of up to
// kGradPixelsPerBlock: their dy rows and x patches stay in L2 while every (12-row, 32-column)
// tile of dw is summed over them in registers.
template <typename T, typename Blocks>
void KernelGradOverPanels(ffi::ThreadPool& pool, const Blocks& blocks, const ConvGeometry& g,
                          const T* x_data, const T* dy_data, float* dw_data, int64_t n_dim) {
  if (g.PositionMajor()) {
    KernelGradByRowBlocks(pool, blocks, g, x_data, dy_data, dw_data, n_dim);
    return;
  }
  const int64_t pixels = g.Pixels(), length = g.SegmentLength(), k_dim = g.kh * length;
  const int64_t panels = n_dim / kPanelWidth;
  const int64_t wanted_tasks = 2 * (pool.num_threads() + 1);
  const int64_t chunks = std::clamp<int64_t>(pixels / kGradPixelsPerChunk, 1, wanted_tasks);
  const int64_t groups = std::min(panels, (wanted_tasks + chunks - 1) / chunks);
  std::vector<float> partial(static_cast<size_t>((chunks - 1) * k_dim * n_dim));
  ParallelFor(pool, chunks * groups, [=, &g, &blocks, &partial](int64_t task) {
    const int64_t chunk = task / groups, group = task % groups;
    const int64_t col_begin = group * panels / groups * kPanelWidth;
    const int64_t col_end = (group + 1) * panels / groups * kPanelWidth;
    float* sum = chunk == 0 ? dw_data : partial.data() + (chunk - 1) * k_dim * n_dim;
    for (int64_t k = 0; k < k_dim; ++k) {
      std::fill(sum + k * n_dim + col_begin, sum + k * n_dim + col_end, 0.0f);
    }
    int64_t x_offsets[kGradPixelsPerBlock], dy_offsets[kGradPixelsPerBlock];
    const int64_t chunk_end = (chunk + 1) * pixels / chunks;
    for (int64_t m0 = chunk * pixels / chunks, m1; m0 < chunk_end; m0 = m1) {
      m1 = std::min(chunk_end, m0 + kGradPixelsPerBlock);
      for (int64_t m = m0; m < m1; ++m) {
        x_offsets[m - m0] = g.PixelOffset(m);
        dy_offsets[m - m0] = m * n_dim;
      }
      for (int64_t ky = 0; ky < g.kh; ++ky) {
        for (int64_t j = 0; j < length; j += kMaxRows) {
          const int64_t rows = std::min<int64_t>(kMaxRows, length - j);
          const T* segment = x_data + ky * g.RowStride() + j;
          float* out = sum + (ky * length + j) * n_dim;
          for (int64_t col = col_begin; col < col_end; col += kPanelWidth) {
            blocks[rows - 1](segment, x_offsets, dy_data + col, dy_offsets, m1 - m0, out + col,
                             n_dim);
          }
        }
      }
    }
  });
  AddPartials(pool, dw_data, partial.data(), chunks, k_dim * n_dim);
}

ffi::Error ConvKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x, ffi::Buffer<ffi::F32> dy,
                          ffi::ResultBuffer<ffi::F32> dw, int64_t stride, int64_t pad) {
  ConvGeometry g;
  if (auto error = KernelGradGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(), stride,
                                      pad, &g);
      error.failure()) {
    return error;
  }
  KernelGradOverPanels(pool, kKernelGradBlocks, g, x.typed_data(), dy.typed_data(),
                       dw->typed_data(), dw->dimensions()[3]);
  return ffi::Error::Success();
}

// A dy (2 x 2 outputs of a tile, 16 channels per vector) A^T → s[4 row + col], 4 x 4: the
// transposed TileTransform.
inline void TileGradTransform(const Vec16 dy[2][2], Vec16 s[16]) {
  Vec16 t[4][2];
  for (int col = 0; col < 2; ++col) {
    t[0][col] = dy[0][col];
    t[1][col] = dy[0][col] + dy[1][col];
    t[2][col] = dy[0][col] - dy[1][col];
    t[3][col] = -dy[1][col];
  }
  for (int row = 0; row < 4; ++row) {
    s[4 * row + 0] = t[row][0];
    s[4 * row + 1] = t[row][0] + t[row][1];
    s[4 * row + 2] = t[row][0] - t[row][1];
    s[4 * row + 3] = -t[row][1];
  }
}

// G^T s G: the 4 x 4 sums s[4 row + col] → the kernel's 3 x 3 gradient w[row][col].
inline void KernelGradTransform(const Vec16 s[16], Vec16 w[3][3]) {
  Vec16 t[3][4];
  for (int col = 0; col < 4; ++col) {
    t[0][col] = s[col] + 0.5f * (s[4 + col] + s[8 + col]);
    t[1][col] = 0.5f * (s[4 + col] - s[8 + col]);
    t[2][col] = 0.5f * (s[4 + col] + s[8 + col]) + s[12 + col];
  }
  for (int row = 0; row < 3; ++row) {
    w[row][0] = t[row][0] + 0.5f * (t[row][1] + t[row][2]);
    w[row][1] = 0.5f * (t[row][1] - t[row][2]);
    w[row][2] = 0.5f * (t[row][1] + t[row][2]) + t[row][3];
  }
}

constexpr int64_t kWinogradGradTiles = 48;
constexpr int64_t kWinogradGradChunksPerThread = 2;

// dw (3, 3, C, C_out) of WinogradConv's convolution for dy (N, Hp - 2, Wp - 2, C_out), by the
// same transform backwards: with U = G g G^T and the tile's outputs A^T (U ⊙ V) A, the kernel's
// gradient is G^T [Σ over tiles of V ⊙ (A dy A^T)] G (dy zero past the map's edge). Tasks are
// chunks of tiles, each summing S (16, C, C_out) of its own (added up at the end); within one,
// kWinogradGradTiles tiles at a time have their V (16, tiles, C) and A dy A^T (16, tiles, C_out)
// made in cache, and KernelGradBlock sums their products into S.
ffi::Error WinogradKernelGrad(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                              ffi::Buffer<ffi::F32> dy, ffi::ResultBuffer<ffi::F32> dw) {
  const auto x_dims = x.dimensions();
  const auto dy_dims = dy.dimensions();
  const auto w_dims = dw->dimensions();
  if (!WinogradOperands(x_dims, dy_dims) || w_dims.size() != 4 || w_dims[0] != 3 ||
      w_dims[1] != 3 || w_dims[2] != x_dims[3] || w_dims[3] != dy_dims[3]) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_kernel_grad: expected x (N, Hp, Wp, C), C a multiple of 16, dy "
        "(N, Hp - 2, Wp - 2, C_out), C_out a multiple of 32, and dw (3, 3, C, C_out)");
  }
  const WinogradTiles g{x_dims[0], x_dims[1], x_dims[2], x_dims[3], dy_dims[1], dy_dims[2]};
  const int64_t c = g.c, c_out = dy_dims[3], tiles = g.Count(), size = 16 * c * c_out;
  const int64_t most_chunks = kWinogradGradChunksPerThread * (pool.num_threads() + 1);
  const int64_t chunks = std::clamp<int64_t>(tiles / kWinogradGradTiles, 1, most_chunks);
  std::vector<float> sums(chunks * size, 0.0f);
  const float* x_data = x.typed_data();
  const float* dy_data = dy.typed_data();
  float* sum_data = sums.data();
  ParallelFor(pool, chunks, [=](int64_t chunk) {
    thread_local std::vector<float> v_buffer, dy_buffer;
    v_buffer.resize(16 * kWinogradGradTiles * c);
    dy_buffer.resize(16 * kWinogradGradTiles * c_out);
    float* v_data = v_buffer.data();
    float* transformed_dy = dy_buffer.data();
    float* s_data = sum_data + chunk * size;
    int64_t v_offsets[kWinogradGradTiles], dy_offsets[kWinogradGradTiles];
    for (int64_t t = 0; t < kWinogradGradTiles; ++t) {
      v_offsets[t] = t * c;
      dy_offsets[t] = t * c_out;
    }
    const int64_t end = (chunk + 1) * tiles / chunks;
    for (int64_t first = chunk * tiles / chunks; first < end; first += kWinogradGradTiles) {
      const int64_t count = std::min(kWinogradGradTiles, end - first);
      TransformPatches(g, x_data, first, count, v_data, kWinogradGradTiles);
      for (int64_t t = 0; t < count; ++t) {
        const int64_t row = g.Row(first + t), col = g.Col(first + t);
        const float* grads = dy_data + ((g.Image(first + t) * g.ho + row) * g.wo + col) * c_out;
        const int out_rows = std::min<int64_t>(2, g.ho - row);
        const int out_cols = std::min<int64_t>(2, g.wo - col);
        for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
          Vec16 tile[2][2], s[16];
          for (int i = 0; i < 2; ++i) {
            for (int j = 0; j < 2; ++j) {
              tile[i][j] = i < out_rows && j < out_cols
                               ? Load16Floats(grads + (i * g.wo + j) * c_out + c0)
                               : Vec16{};
            }
          }
          TileGradTransform(tile, s);
          for (int e = 0; e < 16; ++e) {
            float* to = transformed_dy + (e * kWinogradGradTiles + t) * c_out + c0;
            *reinterpret_cast<Vec16*>(to) = s[e];
          }
        }
      }
      for (int64_t e = 0; e < 16; ++e) {
        const float* v_rows = v_data + e * kWinogradGradTiles * c;
        const float* dy_rows = transformed_dy + e * kWinogradGradTiles * c_out;
        for (int64_t c0 = 0; c0 < c; c0 += kMaxRows) {
          const int64_t block = std::min<int64_t>(kMaxRows, c - c0);
          float* out = s_data + (e * c + c0) * c_out;
          for (int64_t col = 0; col < c_out; col += kPanelWidth) {
            kKernelGradBlocks[block - 1](v_rows + c0, v_offsets, dy_rows + col, dy_offsets, count,
                                         out + col, c_out);
          }
        }
      }
    }
  });
  AddPartials(pool, sum_data, sum_data + size, chunks, size);
  float* w = dw->typed_data();
  ParallelFor(pool, c, [=](int64_t channel) {
    for (int64_t c0 = 0; c0 < c_out; c0 += 16) {
      Vec16 s[16], kernel[3][3];
      for (int e = 0; e < 16; ++e) s[e] = Load16Floats(sum_data + (e * c + channel) * c_out + c0);
      KernelGradTransform(s, kernel);
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          *reinterpret_cast<Vec16*>(w + ((i * 3 + j) * c + channel) * c_out + c0) = kernel[i][j];
        }
      }
    }
  });
  return ffi::Error::Success();
}

// `values` (N, rest) bfloat16 → (ceil(N / 2), rest) image pairs: out[i][j] holds values[2i][j]
// in its low and values[2i + 1][j] in its high 16 bits (zero past an odd N's last image).
std::unique_ptr<uint32_t[]> PairImages(ffi::ThreadPool& pool, const uint16_t* values, int64_t n,
                                       int64_t rest) {
  const int64_t pairs = (n + 1) / 2;
  std::unique_ptr<uint32_t[]> out(new uint32_t[pairs * rest]);
  uint32_t* out_data = out.get();
  ParallelFor(pool, pairs, [=](int64_t pair) {
    const uint16_t* first = values + 2 * pair * rest;
    const uint16_t* second = first + rest;
    uint32_t* to = out_data + pair * rest;
    if (2 * pair + 1 == n) {
      for (int64_t j = 0; j < rest; ++j) to[j] = first[j];
      return;
    }
    for (int64_t j = 0; j < rest; ++j) {
      to[j] = static_cast<uint32_t>(first[j]) | static_cast<uint32_t>(second[j]) << 16;
    }
  });
  return out;
}

#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
// The bfloat16 kernel gradient on AMX tiles, for KW·C a multiple of 16. One tdpbf16ps sums, for
// 16 rows of dw (16 consecutive values of a kernel row's segment: 16 channels of one tap, or for
// C below 16 several taps') and 16 of its columns (output channels o), the products of 16 image
// pairs at one output position: its A tile holds those 16 values of x for the 16 pairs, its B
// tile dy at (position, o), each value the pair's two images side by side (as
// KernelGradBlockBf16 takes them). So both are laid out once per call in blocks of 16 pairs
// (PairBlocks): x as (pair block, position, C, 16 pairs) — an A tile is 1 KB in one piece — and
// dy as (pair block, position, 16 pairs, C_out). Every product is of a real pixel (images past N
// are zeros), taps in the zero border are skipped (all 16 pairs share the position), and any
// stride is the same loop. Needs 16 pairs or more to fill the tiles: 1 × 1 stride-1
// convolutions count each pixel as an image (PointwiseAsPixels), which any batch fills.
constexpr int64_t kPairsPerBlock = 16;

// 16 bfloat16 values of two images as 16 pairs (first's in the low 16 bits); zeros past N.
inline __m512i PairOf16(const uint16_t* first, const uint16_t* second) {
  if (first == nullptr) return _mm512_setzero_si512();
  const __m512i low = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(first)));
  if (second == nullptr) return low;
  const __m512i high = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(second)));
  return _mm512_or_si512(low, _mm512_slli_epi32(high, 16));
}

// rows[i] = column i of the 16 x 16 matrix rows[0..15] of 32-bit values (its transpose).
inline void Transpose16x16(__m512i rows[16]) {
  __m512i t[16], u[16];
  for (int k = 0; k < 16; k += 2) {
    t[k] = _mm512_unpacklo_epi32(rows[k], rows[k + 1]);
    t[k + 1] = _mm512_unpackhi_epi32(rows[k], rows[k + 1]);
  }
  // u[4k + j], 128-bit lane L: rows 4k .. 4k + 3 of column 4L + j.
  for (int k = 0; k < 16; k += 4) {
    u[k] = _mm512_unpacklo_epi64(t[k], t[k + 2]);
    u[k + 1] = _mm512_unpackhi_epi64(t[k], t[k + 2]);
    u[k + 2] = _mm512_unpacklo_epi64(t[k + 1], t[k + 3]);
    u[k + 3] = _mm512_unpackhi_epi64(t[k + 1], t[k + 3]);
  }
  for (int j = 0; j < 4; ++j) {
    const __m512i even_top = _mm512_shuffle_i32x4(u[j], u[4 + j], 0x88);  // Lanes 0, 2.
    const __m512i odd_top = _mm512_shuffle_i32x4(u[j], u[4 + j], 0xDD);   // Lanes 1, 3.
    const __m512i even_bottom = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0x88);
    const __m512i odd_bottom = _mm512_shuffle_i32x4(u[8 + j], u[12 + j], 0xDD);
    rows[j] = _mm512_shuffle_i32x4(even_top, even_bottom, 0x88);
    rows[8 + j] = _mm512_shuffle_i32x4(even_top, even_bottom, 0xDD);
    rows[4 + j] = _mm512_shuffle_i32x4(odd_top, odd_bottom, 0x88);
    rows[12 + j] = _mm512_shuffle_i32x4(odd_top, odd_bottom, 0xDD);
  }
}

// values (N, positions, C) bfloat16, C a multiple of 16 → (ceil(N / 32), positions, C, 16)
// image pairs, or with `pairs_inner` false (ceil(N / 32), positions, 16, C): pair i's place
// holds values[2i] in its low and values[2i + 1] in its high 16 bits (zero past N).
std::unique_ptr<uint32_t[]> PairBlocks(ffi::ThreadPool& pool, const uint16_t* values, int64_t n,
                                       int64_t positions, int64_t c, bool pairs_inner) {
  const int64_t blocks = (n + 2 * kPairsPerBlock - 1) / (2 * kPairsPerBlock);
  const int64_t slab = kPairsPerBlock * c;  // One position of one block.
  std::unique_ptr<uint32_t[]> out(new uint32_t[blocks * positions * slab]);
  uint32_t* out_data = out.get();
  constexpr int64_t kPositionsPerTask = 8;
  const int64_t tasks_per_block = (positions + kPositionsPerTask - 1) / kPositionsPerTask;
  ParallelFor(pool, blocks * tasks_per_block, [=](int64_t task) {
    const int64_t block = task / tasks_per_block;
    const int64_t begin = task % tasks_per_block * kPositionsPerTask;
    const int64_t end = std::min(positions, begin + kPositionsPerTask);
    const uint16_t* firsts[kPairsPerBlock];
    const uint16_t* seconds[kPairsPerBlock];
    for (int64_t pair = 0; pair < kPairsPerBlock; ++pair) {
      const int64_t image = 2 * (block * kPairsPerBlock + pair);
      firsts[pair] = image < n ? values + image * positions * c : nullptr;
      seconds[pair] = image + 1 < n ? firsts[pair] + positions * c : nullptr;
    }
    for (int64_t position = begin; position < end; ++position) {
      uint32_t* to = out_data + (block * positions + position) * slab;
      const int64_t from = position * c;
      for (int64_t c0 = 0; c0 < c; c0 += kPairsPerBlock) {
        __m512i rows[kPairsPerBlock];
        for (int64_t pair = 0; pair < kPairsPerBlock; ++pair) {
          const int64_t at = from + c0;
          rows[pair] = PairOf16(firsts[pair] ? firsts[pair] + at : nullptr,
                                seconds[pair] ? seconds[pair] + at : nullptr);
        }
        if (pairs_inner) {
          Transpose16x16(rows);
          for (int64_t i = 0; i < kPairsPerBlock; ++i) {
            _mm512_storeu_si512(to + (c0 + i) * kPairsPerBlock, rows[i]);
          }
        } else {
          for (int64_t pair = 0; pair < kPairsPerBlock; ++pair) {
            _mm512_storeu_si512(to + pair * c + c0, rows[pair]);
          }
        }
      }
    }
  });
  return out;
}

// A 1 × 1 stride-1 convolution with each pixel as an image of one pixel.
ConvGeometry PointwiseAsPixels(const ConvGeometry& g) {
  if (g.kh != 1 || g.kw != 1 || g.stride != 1 || g.hp != g.ho || g.wp != g.wo) return g;
  return ConvGeometry{g.Pixels(), 1, 1, g.c, 1, 1, 1, 1, 1, 0};
}

// Tile blocks (16 pairs at one position) whose products a tile of dw sums between its load and
// store, so that their A and B tiles stay in cache meanwhile.
constexpr int64_t kTileBlocksPerStep = 16;

void KernelGradAmx(ffi::ThreadPool& pool, const uint16_t* x, const uint16_t* dy,
                   const ConvGeometry& geometry, float* dw, int64_t n_dim) {
  const ConvGeometry g = PointwiseAsPixels(geometry);
  const int64_t positions = g.hp * g.wp, pixels = g.ho * g.wo;
  // (N, positions, C) as (N, positions · C / 16, 16): the same layout for C below 16.
  const auto x_blocks = PairBlocks(pool, x, g.n, positions * g.c / kAmxPairs, kAmxPairs, true);
  const auto dy_blocks = PairBlocks(pool, dy, g.n, pixels, n_dim, false);
  KeepStoresForTiles(x_blocks.get(), dy_blocks.get());
  const int64_t pair_blocks = (g.n + 2 * kPairsPerBlock - 1) / (2 * kPairsPerBlock);
  const int64_t blocks = pair_blocks * pixels, length = g.SegmentLength(), k_dim = g.kh * length;
  std::vector<Taps> inside(pixels);  // The taps of each output position inside the image.
  for (int64_t q = 0; q < pixels; ++q) inside[q] = g.TapsAtPosition(q);
  const int64_t panels = n_dim / kPanelWidth;
  const int64_t wanted_tasks = 2 * (pool.num_threads() + 1);
  const int64_t chunks =
      std::clamp<int64_t>(blocks * kPairsPerBlock / kGradPixelsPerChunk, 1, wanted_tasks);
  const int64_t groups = std::min(panels, (wanted_tasks + chunks - 1) / chunks);
  std::vector<float> partial(static_cast<size_t>((chunks - 1) * k_dim * n_dim));
  const uint32_t* xs = x_blocks.get();
  const uint32_t* dys = dy_blocks.get();
  const Taps* inside_data = inside.data();
  ParallelFor(pool, chunks * groups, [=, &g, &partial](int64_t task) {
    const int64_t chunk = task / groups, group = task % groups;
    const int64_t col_begin = group * panels / groups * kPanelWidth;
    const int64_t col_end = (group + 1) * panels / groups * kPanelWidth;
    const int64_t block_begin = chunk * blocks / chunks, block_end = (chunk + 1) * blocks / chunks;
    float* sum = chunk == 0 ? dw : partial.data() + (chunk - 1) * k_dim * n_dim;
    ConfigureSquareTiles();
    const int64_t dw_stride = n_dim * sizeof(float), dy_stride = n_dim * sizeof(uint32_t);
    const int64_t x_stride = kPairsPerBlock * sizeof(uint32_t);
    int64_t x_offsets[kTileBlocksPerStep];  // Of each block's receptive field's corner.
    for (int64_t b0 = block_begin; b0 < block_end; b0 += kTileBlocksPerStep) {
      const int64_t b1 = std::min(block_end, b0 + kTileBlocksPerStep);
      for (int64_t b = b0; b < b1; ++b) {
        const int64_t pair_block = b / pixels, q = b % pixels;
        const int64_t origin = q / g.wo * g.stride * g.wp + q % g.wo * g.stride;
        x_offsets[b - b0] = (pair_block * positions + origin) * g.c * kPairsPerBlock;
      }
      for (int64_t col = col_begin; col < col_end; col += kPanelWidth) {
        for (int64_t ky = 0; ky < g.kh; ++ky) {
          for (int64_t j = 0; j < length; j += 2 * kAmxPairs) {
            const bool two_row_tiles = j + kAmxPairs < length;
            float* out = sum + (ky * length + j) * n_dim + col;
            float* out_lower = out + kAmxPairs * n_dim;
            if (b0 == block_begin) {
              _tile_zero(0);
              _tile_zero(1);
              _tile_zero(2);
              _tile_zero(3);
            } else {
              _tile_loadd(0, out, dw_stride);
              _tile_loadd(1, out + 16, dw_stride);
              if (two_row_tiles) {
                _tile_loadd(2, out_lower, dw_stride);
                _tile_loadd(3, out_lower + 16, dw_stride);
              }
            }
            const int64_t row_offset = (ky * g.wp * g.c + j) * kPairsPerBlock;
            for (int64_t b = b0; b < b1; ++b) {
              const Taps& taps = inside_data[b % pixels];
              if (ky < taps.ky_begin || ky >= taps.ky_end || j >= taps.j_end ||
                  j + 2 * kAmxPairs <= taps.j_begin) {
                continue;
              }
              const uint32_t* grads = dys + b * kPairsPerBlock * n_dim + col;
              const uint32_t* a = xs + x_offsets[b - b0] + row_offset;
              _tile_loadd(4, grads, dy_stride);
              _tile_loadd(5, grads + 16, dy_stride);
              _tile_loadd(6, a, x_stride);
              _tile_dpbf16ps(0, 6, 4);
              _tile_dpbf16ps(1, 6, 5);
              if (two_row_tiles) {
                _tile_loadd(7, a + kAmxPairs * kPairsPerBlock, x_stride);
                _tile_dpbf16ps(2, 7, 4);
                _tile_dpbf16ps(3, 7, 5);
              }
            }
            _tile_stored(0, out, dw_stride);
            _tile_stored(1, out + 16, dw_stride);
            if (two_row_tiles) {
              _tile_stored(2, out_lower, dw_stride);
              _tile_stored(3, out_lower + 16, dw_stride);
            }
          }
        }
      }
    }
    _tile_release();
  });
  AddPartials(pool, dw, partial.data(), chunks, k_dim * n_dim);
}
#endif

// DpjaxConvKernelGradBf16: ConvKernelGrad of bfloat16 x and dy with float32 sums. vdpbf16ps
// sums over pairs of the reduced axis, here pixels; the pairs are two images' same pixel, so
// that the x and dy of both sit side by side after one interleaving pass and the pixel
// arithmetic is ConvKernelGrad's over ceil(N / 2) "images".
ffi::Error ConvKernelGradBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> x,
                              ffi::Buffer<ffi::BF16> dy, ffi::ResultBuffer<ffi::F32> dw,
                              int64_t stride, int64_t pad) {
#ifdef __AVX512BF16__
  ConvGeometry g;
  if (auto error = KernelGradGeometry(x.dimensions(), dy.dimensions(), dw->dimensions(), stride,
                                      pad, &g);
      error.failure()) {
    return error;
  }
  const int64_t n = g.n, n_dim = dw->dimensions()[3];
  const uint16_t* x_data = reinterpret_cast<const uint16_t*>(x.typed_data());
  const uint16_t* dy_data = reinterpret_cast<const uint16_t*>(dy.typed_data());
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  if (g.SegmentLength() % kAmxPairs == 0 && g.hp * g.wp * g.c % kAmxPairs == 0 &&
      AmxPermitted()) {
    KernelGradAmx(pool, x_data, dy_data, g, dw->typed_data(), n_dim);
    return ffi::Error::Success();
  }
#endif
  const auto x_pairs = PairImages(pool, x_data, n,
                                  g.hp * g.wp * g.c);
  const auto dy_pairs = PairImages(pool, dy_data, n,
                                   g.ho * g.wo * n_dim);
  g.n = (n + 1) / 2;
  KernelGradOverPanels(pool, kKernelGradBlocksBf16, g, x_pairs.get(), dy_pairs.get(),
                       dw->typed_data(), n_dim);
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "cpu_kernels conv_kernel_grad (bfloat16): this CPU has no AVX512-BF16");
#endif
}

// DpjaxChannelMoments: first (N, C) = sum_p u[n, p, :] and second (N, C) = sum_p u[n, p, :] *
// v[n, p, :] in float32, for u and v (N, P, C) both float32 or both bfloat16, C a multiple of 16:
// GroupNorm's statistics (u = v = x: sums of x and x^2) and those of its backward pass (u = dy,
// v = x). XLA:CPU ran these reductions as YNNPACK calls at 1-2 G values/s (10 ms per sum over
// the stem's 128 x 38 x 38 x 64 features). Sums in float32 over runs of kMomentRun positions,
// the runs' sums added up in double. One image per task.
constexpr int64_t kMomentRun = 64;

template <typename T, typename Buffer>
ffi::Error ChannelMoments(ffi::ThreadPool pool, Buffer u, Buffer v, ffi::ResultBuffer<ffi::F32> first,
                          ffi::ResultBuffer<ffi::F32> second) {
  const auto dims = u.dimensions();
  if (dims.size() != 3 || !SameDims(v.dimensions(), dims) || dims[2] % 16 != 0 ||
      first->dimensions().size() != 2 || first->dimensions()[0] != dims[0] ||
      first->dimensions()[1] != dims[2] || !SameDims(second->dimensions(), first->dimensions())) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels channel_moments: expected u and v (N, P, C), C a multiple of 16, and "
        "results (N, C)");
  }
  const int64_t p_dim = dims[1], c = dims[2];
  const T* u_data = reinterpret_cast<const T*>(u.untyped_data());
  const T* v_data = reinterpret_cast<const T*>(v.untyped_data());
  float* first_data = first->typed_data();
  float* second_data = second->typed_data();
  ParallelFor(pool, dims[0], [=](int64_t image) {
    std::vector<double> totals(2 * c, 0.0);
    const T* us = u_data + image * p_dim * c;
    const T* vs = v_data + image * p_dim * c;
    for (int64_t p0 = 0; p0 < p_dim; p0 += kMomentRun) {
      const int64_t p1 = std::min(p_dim, p0 + kMomentRun);
      for (int64_t c0 = 0; c0 < c; c0 += 16) {
        Vec16 sum{}, products{};
        for (int64_t p = p0; p < p1; ++p) {
          const Vec16 a = Load16Floats(us + p * c + c0);
          sum += a;
          products += a * Load16Floats(vs + p * c + c0);
        }
        for (int64_t i = 0; i < 16; ++i) {
          totals[c0 + i] += sum[i];
          totals[c + c0 + i] += products[i];
        }
      }
    }
    for (int64_t i = 0; i < c; ++i) {
      first_data[image * c + i] = static_cast<float>(totals[i]);
      second_data[image * c + i] = static_cast<float>(totals[c + i]);
    }
  });
  return ffi::Error::Success();
}

ffi::Error ChannelMomentsF32(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> u, ffi::Buffer<ffi::F32> v,
                             ffi::ResultBuffer<ffi::F32> first, ffi::ResultBuffer<ffi::F32> second) {
  return ChannelMoments<float>(pool, u, v, first, second);
}

ffi::Error ChannelMomentsBf16(ffi::ThreadPool pool, ffi::Buffer<ffi::BF16> u,
                              ffi::Buffer<ffi::BF16> v, ffi::ResultBuffer<ffi::F32> first,
                              ffi::ResultBuffer<ffi::F32> second) {
  return ChannelMoments<uint16_t>(pool, u, v, first, second);
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

// WinogradConv's panels (16, C_out / 32, C, 32) of a (3, 3, C, C_out) kernel g: U = G g G^T per
// channel pair, G = [[1, 0, 0], [1/2, 1/2, 1/2], [1/2, -1/2, 1/2], [0, 0, 1]]; with `mirror`,
// those of the input gradient's kernel (mirrored in space, channel axes swapped), (16, C / 32,
// C_out, 32). (An einsum in XLA took 60 ms of thread time per training step.) A task per input
// channel of the transformed kernel.
ffi::Error WinogradPanels(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> kernel,
                          ffi::ResultBuffer<ffi::F32> panels, bool mirror) {
  const auto w_dims = kernel.dimensions();
  const auto p_dims = panels->dimensions();
  const bool four_dims = w_dims.size() == 4 && p_dims.size() == 4;
  const int64_t c_in = !four_dims ? 0 : mirror ? w_dims[3] : w_dims[2];
  const int64_t c_out = !four_dims ? 0 : mirror ? w_dims[2] : w_dims[3];
  if (!four_dims || w_dims[0] != 3 || w_dims[1] != 3 || p_dims[0] != 16 ||
      p_dims[1] * kPanelWidth != c_out || p_dims[2] != c_in || p_dims[3] != kPanelWidth) {
    return ffi::Error::InvalidArgument(
        "cpu_kernels winograd_panels: expected kernel (3, 3, C, C_out), C_out a multiple of 32, "
        "and panels (16, C_out / 32, C, 32) (C and C_out swapped when mirrored)");
  }
  const float* w = kernel.typed_data();
  float* out = panels->typed_data();
  const int64_t panel_count = p_dims[1];
  ParallelFor(pool, c_in, [=](int64_t a) {
    for (int64_t b = 0; b < c_out; ++b) {
      // g[i][j]: the transformed kernel's tap (i, j) from input channel a to output channel b.
      float g[3][3], t[4][3];
      for (int i = 0; i < 3; ++i) {
        for (int j = 0; j < 3; ++j) {
          g[i][j] = mirror ? w[((2 - i) * 3 + (2 - j)) * w_dims[2] * w_dims[3] + b * w_dims[3] + a]
                           : w[(i * 3 + j) * w_dims[2] * w_dims[3] + a * w_dims[3] + b];
        }
      }
      for (int j = 0; j < 3; ++j) {
        t[0][j] = g[0][j];
        t[1][j] = 0.5f * (g[0][j] + g[1][j] + g[2][j]);
        t[2][j] = 0.5f * (g[0][j] - g[1][j] + g[2][j]);
        t[3][j] = g[2][j];
      }
      float* panel = out + (b / kPanelWidth * c_in + a) * kPanelWidth + b % kPanelWidth;
      const int64_t element_stride = panel_count * c_in * kPanelWidth;
      for (int r = 0; r < 4; ++r) {
        const float u[4] = {t[r][0], 0.5f * (t[r][0] + t[r][1] + t[r][2]),
                            0.5f * (t[r][0] - t[r][1] + t[r][2]), t[r][2]};
        for (int col = 0; col < 4; ++col) panel[(4 * r + col) * element_stride] = u[col];
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
        // The window's valid input pixels, in row-major offset order.
        const float* pixels[kPoolWindow * kPoolWindow];
        int32_t offsets[kPoolWindow * kPoolWindow];
        int valid = 0;
        for (int64_t ky = 0; ky < kPoolWindow; ++ky) {
          const int64_t iy = oy * kPoolStride - kPoolPad + ky;
          for (int64_t kx = 0; kx < kPoolWindow; ++kx) {
            const int64_t ix = ox * kPoolStride - kPoolPad + kx;
            if (iy < 0 || iy >= h || ix < 0 || ix >= w) continue;
            pixels[valid] = image + (iy * w + ix) * c;
            offsets[valid++] = static_cast<int32_t>(ky * kPoolWindow + kx);
          }
        }
        // Strict: ties keep the earlier offset. A NaN always wins, as in torch. Sixteen
        // channels at a time (the vector lanes), then the rest one by one.
        int64_t j = 0;
        for (; j + 16 <= c; j += 16) {
          Vec16 best = Vec16{} - std::numeric_limits<float>::infinity();
          Vec16i which = Vec16i{};
          for (int v = 0; v < valid; ++v) {
            const Vec16 pixel = *reinterpret_cast<const Vec16*>(pixels[v] + j);
            const Vec16i larger = (pixel > best) | (pixel != pixel);
            best = larger ? pixel : best;
            which = larger ? offsets[v] + Vec16i{} : which;
          }
          *reinterpret_cast<Vec16*>(y_data + out + j) = best;
          for (int lane = 0; lane < 16; ++lane) a_data[out + j + lane] = which[lane];
        }
        for (; j < c; ++j) {
          float best = -std::numeric_limits<float>::infinity();
          int8_t which = 0;
          for (int v = 0; v < valid; ++v) {
            const float pixel = pixels[v][j];
            if (pixel > best || std::isnan(pixel)) {
              best = pixel;
              which = static_cast<int8_t>(offsets[v]);
            }
          }
          y_data[out + j] = best;
          a_data[out + j] = which;
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

// Whether the bfloat16 kernels run on AMX tiles (the CPU has them and Linux lets us use them).
extern "C" int DpjaxHasAmxTiles() {
#if defined(__AMX_TILE__) && defined(__AMX_BF16__)
  return AmxPermitted() ? 1 : 0;
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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxDecoderLayer, DecoderLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("epsilon"));

namespace {

// The operands of a conv forward call (x, panels → y) in T: float32, or bfloat16 throughout.
template <ffi::DataType T>
auto ConvBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<T>>()
      .template Attr<int64_t>("kh")
      .template Attr<int64_t>("kw")
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("pad");
}

// The operands of a kernel-gradient call (x, dy in T → float32 dw).
template <ffi::DataType T>
auto KernelGradBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Attr<int64_t>("stride")
      .template Attr<int64_t>("pad");
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConv, ConvForward, ConvBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvBf16, ConvForwardBf16, ConvBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradConv, WinogradConv,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvKernelGrad, ConvKernelGrad,
                              KernelGradBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvKernelGradBf16, ConvKernelGradBf16,
                              KernelGradBinding<ffi::BF16>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradKernelGrad, WinogradKernelGrad,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>());

// The operands of a channel-moments call (u, v in T → float32 first, second).
template <ffi::DataType T>
auto MomentsBinding() {
  return ffi::Ffi::Bind()
      .Ctx<ffi::ThreadPool>()
      .template Arg<ffi::Buffer<T>>()
      .template Arg<ffi::Buffer<T>>()
      .template Ret<ffi::Buffer<ffi::F32>>()
      .template Ret<ffi::Buffer<ffi::F32>>();
}

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxChannelMoments, ChannelMomentsF32, MomentsBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxChannelMomentsBf16, ChannelMomentsBf16,
                              MomentsBinding<ffi::BF16>());

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
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxWinogradPanels, WinogradPanels,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("mirror"));
