// DpjaxMaxPool, DpjaxMaxPoolGrad: the ResNet stem's 3 x 3 stride-2 max-pool (torch's
// MaxPool2d(3, 2, 1)) over NHWC, and its gradient.

#include <algorithm>
#include <cstdint>
#include <limits>

#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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

}  // namespace dpjax
