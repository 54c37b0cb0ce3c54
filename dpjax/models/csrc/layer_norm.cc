// DpjaxLayerNorm: LayerNorm over the last axis as flax.linen.LayerNorm computes it; XLA runs
// each of its two row reductions as a YNNPACK call, ~110 us at batch 28 (25 norms per step).

#include <cstdint>

#include "layer_norm.h"
#include "parallel.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxLayerNorm, LayerNorm,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<float>("epsilon"));

}  // namespace dpjax
