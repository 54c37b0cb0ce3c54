// DpjaxDecoderLayer: a whole pre-norm decoder layer (LayerNorms, dense blocks, attention, GELU
// and the residual additions) in one call, its steps as dependent phases of one parallel run
// (RunPhases); float32, or with bfloat16 weights as the bfloat16 module computes.

#include <algorithm>
#include <array>
#include <cstdint>
#include <cstring>
#include <limits>
#include <vector>

#include "attention.h"
#include "dense_blocks.h"
#include "layer_norm.h"
#include "parallel.h"
#include "vector_math.h"
#include "xla_ffi.h"

namespace dpjax {
namespace {

// A Dense layer packed as PackedDense or PackedDenseBf16 take it: K x N weights W (float, or
// uint16_t bfloat16 bits) as ceil(N / 32) panels of K * 32 values, float32 bias (N,).
template <typename W>
struct PackedWeights {
  const W* panels;
  const float* bias;
  int64_t k_dim, n_dim;
  int64_t PanelCount() const { return (n_dim + kPanelWidth - 1) / kPanelWidth; }
};

// A decoder layer's arithmetic for weights W: float32 throughout (float), or as the bfloat16
// module computes it (uint16_t): bfloat16 dense inputs and weights with float32 sums, and every
// activation the module stores in bfloat16 rounded to it (softmax and statistics in float32).
template <typename W>
struct Precision;

template <>
struct Precision<float> {
  static float Round(float value) { return value; }
  static void Block(int64_t rows, const float* x, const float* panel, float* tile,
                    int64_t k_dim) {
    kStreamedBlocks[rows - 1](x, panel, tile, k_dim, kPanelWidth, 0, 0);
  }
};

#ifdef __AVX512BF16__
template <>
struct Precision<uint16_t> {
  static float Round(float value) {
    const uint32_t bits = static_cast<uint32_t>(FromFloat<uint16_t>(value)) << 16;
    float rounded;
    std::memcpy(&rounded, &bits, sizeof(rounded));
    return rounded;
  }
  static void Block(int64_t rows, const uint16_t* x, const uint16_t* panel, float* tile,
                    int64_t k_dim) {
    kBlocksBf16[rows - 1](x, panel, tile, k_dim / 2, kPanelWidth, 0, 0);
  }
};
#endif

enum class Epilogue { kStore, kGelu, kAdd };

// out = epilogue(x (M, K) @ W + bias), out's rows `stride` apart, a run of panels per thread
// (`PanelRuns`): kStore writes the sums (float out), kGelu their GELU (out: a dense input, W),
// kAdd adds them to out (float: a residual connection).
template <Epilogue kEpilogue, typename W, typename Out>
Phase DensePhase(const PackedWeights<W>& w, const W* x, int64_t m_dim, Out* out,
                 int64_t stride, int64_t threads) {
  using P = Precision<W>;
  const PanelRuns runs(w.PanelCount(), threads);
  return {runs.Tasks(), [=](int64_t task) {
    for (int64_t p = runs.Begin(task); p < runs.End(task); ++p) {
      float tile[kMaxRows * kPanelWidth];
      const int64_t col = p * kPanelWidth;
      const int64_t cols = std::min(kPanelWidth, w.n_dim - col);
      const W* panel = w.panels + p * w.k_dim * kPanelWidth;
      // The panel's bias, zero past N (the padding columns are computed, not stored).
      float bias[kPanelWidth] = {};
      std::copy(w.bias + col, w.bias + col + cols, bias);
      for (int64_t m0 = 0; m0 < m_dim; m0 += kMaxRows) {
        const int64_t rows = std::min<int64_t>(kMaxRows, m_dim - m0);
        P::Block(rows, x + m0 * w.k_dim, panel, tile, w.k_dim);
        for (int64_t i = 0; i < rows; ++i) {
          // Whole rows of the tile first (32 wide, in local memory): these loops vectorize.
          float* sums = tile + i * kPanelWidth;
          for (int64_t c = 0; c < kPanelWidth; ++c) sums[c] = P::Round(sums[c] + bias[c]);
          if constexpr (kEpilogue == Epilogue::kGelu) {
            for (int64_t c = 0; c < kPanelWidth; ++c) sums[c] = Gelu(sums[c]);
          }
          Out* dest = out + (m0 + i) * stride + col;
          for (int64_t c = 0; c < cols; ++c) {
            if constexpr (kEpilogue == Epilogue::kAdd) {
              dest[c] = P::Round(dest[c] + sums[c]);
            } else {
              dest[c] = FromFloat<Out>(sums[c]);
            }
          }
        }
      }
    }
  }};
}

// DpjaxDecoderLayer's parameters, in the order of the call's remaining operands.
enum DecoderParam {
  kNorm1Scale, kNorm1Bias, kSelfQkv, kSelfQkvBias, kSelfOut, kSelfOutBias,
  kNorm2Scale, kNorm2Bias, kCrossOutBias,
  kNorm3Scale, kNorm3Bias, kFfnIn, kFfnInBias, kFfnOut, kFfnOutBias, kDecoderParams
};

// Attention tasks: at batch 1 a phase's few tasks (one per head, 4 rows) keep both threads
// busy; at larger batches whole sequences and 16 rows per task claim their work with fewer
// atomic operations and read each sequence's rows once (batch 28: the self-attention phase
// 230 -> 120 us).
constexpr int64_t kSequencesForWholeTasks = 8;
constexpr int64_t kCrossRowsPerSmallTask = 4, kCrossRowsPerTask = 16;

struct DecoderOperands {
  const float* x;
  const float* shared_memory;
  const float* batch_memory;
  const bool* self_mask;
  const bool* memory_mask;
  std::array<const void*, kDecoderParams> params;
  int64_t b_dim, t_dim, e_dim, f_dim, s0, s1, num_heads;
  float epsilon;
  float* out;
};

template <typename W>
void RunDecoderLayer(ffi::ThreadPool& pool, const DecoderOperands& op) {
  using P = Precision<W>;
  const int64_t threads = pool.num_threads();
  const int64_t m_dim = op.b_dim * op.t_dim, e_dim = op.e_dim, t_dim = op.t_dim;
  const int64_t d_dim = e_dim / op.num_heads, num_heads = op.num_heads, s0 = op.s0, s1 = op.s1;
  auto weights = [&](int index, int64_t k_dim, int64_t n_dim) {
    return PackedWeights<W>{static_cast<const W*>(op.params[index]),
                            static_cast<const float*>(op.params[index + 1]), k_dim, n_dim};
  };
  std::vector<W> normed(m_dim * e_dim), attended(m_dim * e_dim), hidden(m_dim * op.f_dim);
  std::vector<float> qkv(m_dim * 3 * e_dim);
  // Normalizes the rows of `source` (float) into `normed`, copying them to `copy` unless null.
  auto normalize = [&](int index, const float* source, float* copy) -> Phase {
    const float* scale = static_cast<const float*>(op.params[index]);
    const float* bias = static_cast<const float*>(op.params[index + 1]);
    W* dest = normed.data();
    const float epsilon = op.epsilon;
    return {(m_dim + kNormRowsPerTask - 1) / kNormRowsPerTask, [=](int64_t task) {
              const int64_t end = std::min(m_dim, (task + 1) * kNormRowsPerTask);
              for (int64_t m = task * kNormRowsPerTask; m < end; ++m) {
                if (copy) std::copy(source + m * e_dim, source + (m + 1) * e_dim, copy + m * e_dim);
                NormalizeRow(source + m * e_dim, scale, bias, epsilon, e_dim, dest + m * e_dim);
              }
            }};
  };
  const float* qkv_data = qkv.data();
  const float* shared_data = op.shared_memory;
  const float* batch_data = op.batch_memory;
  const bool* self_allowed = op.self_mask;
  const bool* memory_allowed = op.memory_mask;
  W* attended_data = attended.data();
  const int64_t heads_per_task = op.b_dim >= kSequencesForWholeTasks ? num_heads : 1;
  const Phase self_attention{op.b_dim * num_heads / heads_per_task, [=](int64_t task) {
    for (int64_t head = task * heads_per_task; head < (task + 1) * heads_per_task; ++head) {
      const int64_t b = head / num_heads, offset = (head % num_heads) * d_dim;
      const float* rows = qkv_data + b * t_dim * 3 * e_dim + offset;
      AttendHead(
          rows, 3 * e_dim, t_dim, t_dim, d_dim, self_allowed,
          [=](int64_t s) { return rows + s * 3 * e_dim + e_dim; },
          [=](int64_t s) { return rows + s * 3 * e_dim + 2 * e_dim; },
          attended_data + b * t_dim * e_dim + offset, e_dim);
    }
  }};
  float* out = op.out;
  const W* normed_data = normed.data();
  const float* cross_bias = static_cast<const float*>(op.params[kCrossOutBias]);
  // Folded memory rows (transformer.fold_cross_attention): per head h, score_h (E), then per
  // head value_h (E), then per head offset_h. Row m of out gains
  //   sum_h sum_s softmax_s(mask ? normed[m] . score_h(s) + offset_h(s) : lowest) value_h(s)
  // plus the out-projection's bias: the cross-attention with its q and out projections
  // already applied to the memory's keys and values.
  const int64_t cross_rows = op.b_dim >= kSequencesForWholeTasks ? kCrossRowsPerTask
                                                                   : kCrossRowsPerSmallTask;
  const Phase cross_attention{(m_dim + cross_rows - 1) / cross_rows, [=](int64_t task) {
    const int64_t s_dim = s0 + s1, row_length = num_heads * (2 * e_dim + 1);
    std::vector<float> query(e_dim), sums(e_dim), weights(RoundUpToLanes(s_dim));
    std::vector<const float*> rows(s_dim);
    const int64_t end = std::min(m_dim, (task + 1) * cross_rows);
    for (int64_t m = task * cross_rows; m < end; ++m) {
      const int64_t b = m / t_dim, t = m % t_dim;
      for (int64_t s = 0; s < s_dim; ++s) {
        rows[s] = s < s0 ? shared_data + s * row_length
                         : batch_data + (b * s1 + s - s0) * row_length;
      }
      for (int64_t j = 0; j < e_dim; ++j) query[j] = ToFloat(normed_data[m * e_dim + j]);
      std::fill(sums.begin(), sums.end(), 0.0f);
      for (int64_t h = 0; h < num_heads; ++h) {
        float top = std::numeric_limits<float>::lowest();
        for (int64_t s = 0; s < s_dim; ++s) {
          float logit = std::numeric_limits<float>::lowest();
          if (memory_allowed[t * s_dim + s]) {
            logit = Dot(query.data(), rows[s] + h * e_dim, e_dim) +
                    rows[s][2 * num_heads * e_dim + h];
          }
          weights[s] = logit;
          top = std::max(top, logit);
        }
        const float total = ExpShiftedSum(weights.data(), s_dim, top);
        for (int64_t s = 0; s < s_dim; ++s) {
          if (weights[s] == 0.0f) continue;  // Masked (or underflowed).
          const float w = weights[s] / total;
          const float* value = rows[s] + (num_heads + h) * e_dim;
          for (int64_t j = 0; j < e_dim; ++j) sums[j] += w * value[j];
        }
      }
      float* dest = out + m * e_dim;
      for (int64_t j = 0; j < e_dim; ++j) {
        dest[j] = P::Round(dest[j] + P::Round(sums[j] + cross_bias[j]));
      }
    }
  }};
  RunPhases(pool, {normalize(kNorm1Scale, op.x, out),
                   DensePhase<Epilogue::kStore>(weights(kSelfQkv, e_dim, 3 * e_dim),
                                                normed.data(), m_dim, qkv.data(), 3 * e_dim,
                                                threads),
                   self_attention,
                   DensePhase<Epilogue::kAdd>(weights(kSelfOut, e_dim, e_dim), attended_data,
                                              m_dim, out, e_dim, threads),
                   normalize(kNorm2Scale, out, nullptr), cross_attention,
                   normalize(kNorm3Scale, out, nullptr),
                   DensePhase<Epilogue::kGelu>(weights(kFfnIn, e_dim, op.f_dim), normed.data(),
                                               m_dim, hidden.data(), op.f_dim, threads),
                   DensePhase<Epilogue::kAdd>(weights(kFfnOut, op.f_dim, e_dim), hidden.data(),
                                              m_dim, out, e_dim, threads)});
}

// Whether `panels` and `bias` are a K x N Dense layer packed for PackedDense (float32) or
// PackedDenseBf16 (bfloat16) with a float32 bias.
bool IsPacked(const ffi::AnyBuffer& panels, const ffi::AnyBuffer& bias, int64_t k_dim,
              int64_t n_dim, bool bf16) {
  const int64_t panel_count = (n_dim + kPanelWidth - 1) / kPanelWidth;
  const std::array<int64_t, 3> f32_dims{panel_count, k_dim, kPanelWidth};
  const std::array<int64_t, 4> bf16_dims{panel_count, k_dim / 2, kPanelWidth, 2};
  const std::array<int64_t, 1> bias_dims{n_dim};
  const bool panels_ok =
      bf16 ? panels.element_type() == ffi::DataType::BF16 && k_dim % 2 == 0 &&
                 SameDims(panels.dimensions(), bf16_dims)
           : panels.element_type() == ffi::DataType::F32 &&
                 SameDims(panels.dimensions(), f32_dims);
  return panels_ok && bias.element_type() == ffi::DataType::F32 &&
         SameDims(bias.dimensions(), bias_dims);
}

// DpjaxDecoderLayer: one pre-norm decoder layer in eval mode as dpjax.models.transformer's
// DecoderLayer computes it (nn.TransformerDecoderLayer with norm_first, exact GELU, no dropout):
//   x += SelfAttention(LN1(x)); x += CrossAttention(LN2(x), memory); x += FFN(LN3(x)),
// the memory rows folded with the cross-attention's query and out projections (H (2E + 1)
// floats per row, transformer.fold_cross_attention): the rows of shared_memory (S0, H (2E + 1)),
// the same for every sequence (the timestep's), then those of batch_memory (B, S1, H (2E + 1)).
// Float32 activations in and out; the Dense layers' panels float32, or bfloat16 for the
// bfloat16 module's arithmetic (Precision<uint16_t>). Its 9 steps run as the phases of one
// RunPhases: at batch 1 separate calls spent more time waking the pool and in XLA's small ops
// between them than in their work.
ffi::Error DecoderLayer(ffi::ThreadPool pool, ffi::Buffer<ffi::F32> x,
                        ffi::Buffer<ffi::F32> shared_memory, ffi::Buffer<ffi::F32> batch_memory,
                        ffi::Buffer<ffi::PRED> self_mask, ffi::Buffer<ffi::PRED> memory_mask,
                        ffi::RemainingArgs params, ffi::ResultBuffer<ffi::F32> y,
                        int64_t num_heads, float epsilon) {
  const auto invalid = [] {
    return ffi::Error::InvalidArgument(
        "cpu_kernels decoder_layer: expected float32 x (B, T, E) with E divisible by num_heads, "
        "shared_memory (S0, H (2E + 1)), batch_memory (B, S1, H (2E + 1)), masks (T, T) and "
        "(T, S0 + S1), y (B, T, E), then 15 parameters: per LayerNorm float32 scale and bias "
        "(E,), per Dense its panels (ceil(N / 32), K, 32) float32 or (ceil(N / 32), K / 2, 32, 2) "
        "bfloat16, all alike, and float32 bias (N,), in the order norm1, self_qkv (E -> 3E), "
        "self_out, norm2, the cross-attention's out-projection bias (E,), norm3, ffn_in (E -> F), "
        "ffn_out (F -> E)");
  };
  std::vector<ffi::AnyBuffer> p;
  for (size_t i = 0; i < params.size(); ++i) {
    auto buffer = params.get<ffi::AnyBuffer>(i);
    if (!buffer.has_value()) return invalid();
    p.push_back(*buffer);
  }
  const auto x_dims = x.dimensions();
  const auto shared_dims = shared_memory.dimensions();
  const auto batch_dims = batch_memory.dimensions();
  if (p.size() != kDecoderParams || x_dims.size() != 3 || shared_dims.size() != 2 ||
      batch_dims.size() != 3 || !SameDims(y->dimensions(), x_dims)) {
    return invalid();
  }
  DecoderOperands op{x.typed_data(), shared_memory.typed_data(), batch_memory.typed_data(),
                     self_mask.typed_data(), memory_mask.typed_data(), {},
                     x_dims[0], x_dims[1], x_dims[2],
                     static_cast<int64_t>(p[kFfnInBias].element_count()), shared_dims[0],
                     batch_dims[1], num_heads, epsilon, y->typed_data()};
  for (int i = 0; i < kDecoderParams; ++i) op.params[i] = p[i].untyped_data();
  const int64_t e_dim = op.e_dim, f_dim = op.f_dim;
  const std::array<int64_t, 2> self_mask_dims{op.t_dim, op.t_dim};
  const std::array<int64_t, 2> memory_mask_dims{op.t_dim, op.s0 + op.s1};
  const std::array<int64_t, 1> vector_dims{e_dim};
  bool vectors_ok = true;  // The LayerNorms' parameters and the cross-attention's bias.
  for (int index : {kNorm1Scale, kNorm1Bias, kNorm2Scale, kNorm2Bias, kCrossOutBias, kNorm3Scale,
                    kNorm3Bias}) {
    vectors_ok = vectors_ok && p[index].element_type() == ffi::DataType::F32 &&
                 SameDims(p[index].dimensions(), vector_dims);
  }
  const bool bf16 = p[kSelfQkv].element_type() == ffi::DataType::BF16;
  if (!vectors_ok || num_heads <= 0 || e_dim % num_heads != 0 ||
      shared_dims[1] != num_heads * (2 * e_dim + 1) || batch_dims[0] != op.b_dim ||
      batch_dims[2] != shared_dims[1] ||
      !SameDims(self_mask.dimensions(), self_mask_dims) ||
      !SameDims(memory_mask.dimensions(), memory_mask_dims) ||
      !IsPacked(p[kSelfQkv], p[kSelfQkvBias], e_dim, 3 * e_dim, bf16) ||
      !IsPacked(p[kSelfOut], p[kSelfOutBias], e_dim, e_dim, bf16) ||
      !IsPacked(p[kFfnIn], p[kFfnInBias], e_dim, f_dim, bf16) ||
      !IsPacked(p[kFfnOut], p[kFfnOutBias], f_dim, e_dim, bf16)) {
    return invalid();
  }
  if (!bf16) {
    RunDecoderLayer<float>(pool, op);
    return ffi::Error::Success();
  }
#ifdef __AVX512BF16__
  RunDecoderLayer<uint16_t>(pool, op);
  return ffi::Error::Success();
#else
  return ffi::Error(ffi::ErrorCode::kUnimplemented,
                    "cpu_kernels decoder_layer (bfloat16): this CPU has no AVX512-BF16");
#endif
}

}  // namespace

XLA_FFI_DEFINE_HANDLER_SYMBOL(DpjaxDecoderLayer, DecoderLayer,
                              ffi::Ffi::Bind()
                                  .Ctx<ffi::ThreadPool>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::F32>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .Arg<ffi::Buffer<ffi::PRED>>()
                                  .RemainingArgs()
                                  .Ret<ffi::Buffer<ffi::F32>>()
                                  .Attr<int64_t>("num_heads")
                                  .Attr<float>("epsilon"));

}  // namespace dpjax
