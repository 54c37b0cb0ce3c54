// The XLA FFI API (jaxlib's headers) as dpjax::ffi, and a shape check for its buffers. Every
// kernel here is an FFI handler that cpu_kernels.py registers with XLA as a custom call.

#ifndef DPJAX_MODELS_CSRC_XLA_FFI_H_
#define DPJAX_MODELS_CSRC_XLA_FFI_H_

#include <algorithm>

#include "xla/ffi/api/ffi.h"

namespace dpjax {

namespace ffi = xla::ffi;

template <typename DimsA, typename DimsB>
bool SameDims(const DimsA& a, const DimsB& b) {
  return std::equal(a.begin(), a.end(), b.begin(), b.end());
}

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_XLA_FFI_H_
