// DpjaxConv, DpjaxConvBf16: a convolution over an already padded NHWC input as a GEMM whose rows
// are read in place from the input (conv_geometry.h), float32, or bfloat16 operands with float32
// sums (on AMX tiles for 16 images or more, ConvAmx). XLA:CPU ran these forwards at 55-100
// GFLOP/s on the 2-core VM, these run at 170-200. DpjaxPackConvKernel: their kernels' panels.

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include <immintrin.h>

#include "amx_tiles.h"
#include "conv_geometry.h"
#include "dense_blocks.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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

constexpr int64_t kConvPixelsPerTask = 96;

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConv, ConvForward, ConvBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxConvBf16, ConvForwardBf16, ConvBinding<ffi::BF16>());

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxPackConvKernel, PackConvKernel,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<bool>("mirror"));

}  // namespace dpjax
