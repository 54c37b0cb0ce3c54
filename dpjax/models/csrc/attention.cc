// DpjaxAttention: masked multi-head softmax attention of already projected q, k, v for the few
// tokens of a denoising step, one (batch, head) pair per task; XLA runs these as batched
// 10 x 64 x 10 GEMMs plus head transposes, ~20 us apiece.

#include <cstdint>

#include "attention.h"
#include "parallel.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

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

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxAttention, Attention,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads"));

}  // namespace dpjax
