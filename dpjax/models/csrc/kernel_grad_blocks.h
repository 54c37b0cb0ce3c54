// Register blocks of kernel gradients (dw += patch^T dy over pixels), float32 and bfloat16 image
// pairs, shared by the direct kernel gradients (conv_kernel_grad.cc) and Winograd's
// (winograd.cc), and the sum of their chunks' partial results.

#ifndef DPJAX_MODELS_CSRC_KERNEL_GRAD_BLOCKS_H_
#define DPJAX_MODELS_CSRC_KERNEL_GRAD_BLOCKS_H_

#include <algorithm>
#include <cstdint>
#include <cstring>

#include <immintrin.h>

#include "dense_blocks.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {

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

// dw += the other chunks' sums of it (chunks - 1 of `size` floats each in `partial`).
inline void AddPartials(ffi::ThreadPool& pool, float* dw, const float* partial, int64_t chunks,
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

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_KERNEL_GRAD_BLOCKS_H_
