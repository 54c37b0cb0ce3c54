// One head's masked softmax attention over already projected rows: DpjaxAttention's task and the
// decoder layer's self-attention.

#ifndef DPJAX_MODELS_CSRC_ATTENTION_H_
#define DPJAX_MODELS_CSRC_ATTENTION_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <limits>
#include <vector>

#include "vector_math.h"

namespace dpjax {

// One head of one sequence, as dpjax.models.transformer._attend computes it:
// out[t] = softmax_s(mask[t, s] ? query[t] . key(s) / sqrt(d) : lowest) @ value(s) over the
// head's d floats; query rows are q_stride apart, out rows out_stride, key(s) and value(s) point
// at row s's d floats. Out: float, or uint16_t to store bfloat16.
template <typename Out, typename KeyRow, typename ValueRow>
void AttendHead(const float* query, int64_t q_stride, int64_t t_dim, int64_t s_dim,
                int64_t d_dim, const bool* mask, KeyRow key, ValueRow value, Out* out,
                int64_t out_stride) {
  const float scale = std::sqrt(static_cast<float>(d_dim));
  std::vector<float> weights(RoundUpToLanes(s_dim)), row(d_dim);
  for (int64_t t = 0; t < t_dim; ++t) {
    float top = std::numeric_limits<float>::lowest();
    for (int64_t s = 0; s < s_dim; ++s) {
      float logit = std::numeric_limits<float>::lowest();
      if (mask[t * s_dim + s]) logit = Dot(query + t * q_stride, key(s), d_dim) / scale;
      weights[s] = logit;
      top = std::max(top, logit);
    }
    const float total = ExpShiftedSum(weights.data(), s_dim, top);
    std::fill(row.begin(), row.end(), 0.0f);
    for (int64_t s = 0; s < s_dim; ++s) {
      if (weights[s] == 0.0f) continue;  // Masked (or underflowed): adds nothing.
      const float w = weights[s] / total;
      const float* v = value(s);
      for (int64_t j = 0; j < d_dim; ++j) row[j] += w * v[j];
    }
    for (int64_t j = 0; j < d_dim; ++j) out[t * out_stride + j] = FromFloat<Out>(row[j]);
  }
}

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_ATTENTION_H_
