// DpjaxConvKernelGrad, DpjaxConvKernelGradBf16: a convolution's kernel gradient from its padded
// input and output gradient, as GEMMs whose rows are read in place. XLA:CPU runs the kernel
// gradients of the high-resolution layers as convolutions whose window is the whole feature map,
// at 25-45 GFLOP/s; these run at 170-200 on two cores. bfloat16: image pairs on vdpbf16ps, or
// AMX tiles (KernelGradAmx).

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <memory>
#include <vector>

#include <immintrin.h>

#include "amx_tiles.h"
#include "conv_geometry.h"
#include "kernel_grad_blocks.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

constexpr int64_t kGradPixelsPerBlock = 512;
constexpr int64_t kGradPixelsPerChunk = 2048;

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

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvKernelGrad, ConvKernelGrad,
                              KernelGradBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvKernelGradBf16, ConvKernelGradBf16,
                              KernelGradBinding<ffi::BF16>());

}  // namespace dpjax
