// DpjaxChannelMoments, DpjaxChannelMomentsBf16: GroupNorm's per-(sample, channel) sums in one
// pass each, for its statistics and its backward pass.

#include <cstdint>
#include <vector>

#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxChannelMoments, ChannelMomentsF32, MomentsBinding<ffi::F32>());
XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxChannelMomentsBf16, ChannelMomentsBf16,
                              MomentsBinding<ffi::BF16>());

}  // namespace dpjax
