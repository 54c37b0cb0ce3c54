// How the direct convolution kernels (conv.cc, conv_kernel_grad.cc) read a padded NHWC input:
// each output pixel's receptive field as segments found in place, and the operand checks.

#ifndef DPJAX_MODELS_CSRC_CONV_GEOMETRY_H_
#define DPJAX_MODELS_CSRC_CONV_GEOMETRY_H_

#include <cstdint>
#include <string>

#include "dense_blocks.h"
#include "xla_ffi.h"

namespace dpjax {

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

inline ffi::Error CheckConvOperands(const ffi::Span<const int64_t>& x_dims, int64_t kh, int64_t kw,
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

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_CONV_GEOMETRY_H_
