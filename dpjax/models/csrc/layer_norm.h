// One row of a LayerNorm as flax.linen.LayerNorm computes it: DpjaxLayerNorm's work and the
// decoder layer's three norms.

#ifndef DPJAX_MODELS_CSRC_LAYER_NORM_H_
#define DPJAX_MODELS_CSRC_LAYER_NORM_H_

#include <algorithm>
#include <cmath>
#include <cstdint>

#include "vector_math.h"

namespace dpjax {

constexpr int64_t kNormRowsPerTask = 64;

// y = (x - mean) * (rsqrt(var + eps) * scale) + bias over one row of e_dim floats, var =
// mean(x^2) - mean^2 clipped at 0 (flax's fast variance; sums accumulated in double).
template <typename Out>
void NormalizeRow(const float* row, const float* scale, const float* bias, float epsilon,
                  int64_t e_dim, Out* out) {
  double sum_lanes[kLanes] = {}, sum_sq_lanes[kLanes] = {};
  int64_t j = 0;
  for (; j + kLanes <= e_dim; j += kLanes) {
    for (int64_t l = 0; l < kLanes; ++l) {
      const double value = row[j + l];
      sum_lanes[l] += value;
      sum_sq_lanes[l] += value * value;
    }
  }
  double sum = 0.0, sum_sq = 0.0;
  for (; j < e_dim; ++j) {
    sum += row[j];
    sum_sq += static_cast<double>(row[j]) * row[j];
  }
  for (int64_t l = 0; l < kLanes; ++l) {
    sum += sum_lanes[l];
    sum_sq += sum_sq_lanes[l];
  }
  const float mean = static_cast<float>(sum / e_dim);
  const float var = std::max(0.0f, static_cast<float>(sum_sq / e_dim) - mean * mean);
  const float inv = 1.0f / std::sqrt(var + epsilon);
  for (int64_t j = 0; j < e_dim; ++j) {
    out[j] = FromFloat<Out>((row[j] - mean) * (inv * scale[j]) + bias[j]);
  }
}

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_LAYER_NORM_H_
