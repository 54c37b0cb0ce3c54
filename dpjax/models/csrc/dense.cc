// DpjaxPackedDense: y (M, N) = x (M, K) @ W (K, N) for small M, W pre-packed as (N / 32, K, 32)
// panels (dense_blocks.h). DpjaxPackedDenseBf16: the same for bfloat16 x and W with float32 sums,
// W packed as (N / 32, K / 2, 32, 2), where the CPU has AVX512-BF16 (on AMX tiles where it has
// AMX).

#include <cstdint>

#include "dense_blocks.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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
  DenseOverPanels(pool, kStreamedBlocks, x_data, panel_data, y_data, p_dims[0],
                  k_dim * kPanelWidth, k_dim, m_dim, n_dim);
  return ffi::Error::Success();
}

#ifdef __AVX512BF16__
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

}  // namespace dpjax
