// 16-lane float vectors (GCC vector extensions: AVX-512, or pairs of AVX registers) and the
// elementwise functions the kernels need in vectorizable form: lane sums and dot products,
// bfloat16 conversion, exp, erf and GELU.

#ifndef DPJAX_MODELS_CSRC_VECTOR_MATH_H_
#define DPJAX_MODELS_CSRC_VECTOR_MATH_H_

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

namespace dpjax {

// Reductions keep kLanes independent partial sums, which the compiler holds in vector
// registers: one running sum would wait out an add's latency for every element.
constexpr int64_t kLanes = 16;

typedef float Vec16 __attribute__((vector_size(64), aligned(4)));
typedef int32_t Vec16i __attribute__((vector_size(64), aligned(4)));
typedef uint16_t Vec16h __attribute__((vector_size(32), aligned(2)));

inline Vec16 Load16Floats(const float* p) { return *reinterpret_cast<const Vec16*>(p); }
inline Vec16 Load16Floats(const uint16_t* p) {  // bfloat16 bits: a float's upper half.
  return reinterpret_cast<Vec16>(
      __builtin_convertvector(*reinterpret_cast<const Vec16h*>(p), Vec16i) << 16);
}

// The sum of v's lanes, pairwise: four dependent adds, where lane after lane took sixteen (a
// batch-28 sampling step's attention spent most of its time there).
inline float SumLanes(Vec16 v) {
  typedef float Vec8 __attribute__((vector_size(32)));
  typedef float Vec4 __attribute__((vector_size(16)));
  const Vec8 halves = __builtin_shufflevector(v, v, 0, 1, 2, 3, 4, 5, 6, 7) +
                      __builtin_shufflevector(v, v, 8, 9, 10, 11, 12, 13, 14, 15);
  const Vec4 quarters = __builtin_shufflevector(halves, halves, 0, 1, 2, 3) +
                        __builtin_shufflevector(halves, halves, 4, 5, 6, 7);
  return (quarters[0] + quarters[2]) + (quarters[1] + quarters[3]);
}

inline float Dot(const float* a, const float* b, int64_t n) {
  Vec16 lanes = {};
  int64_t j = 0;
  for (; j + kLanes <= n; j += kLanes) {
    lanes += *reinterpret_cast<const Vec16*>(a + j) * *reinterpret_cast<const Vec16*>(b + j);
  }
  float total = 0.0f;
  for (; j < n; ++j) total += a[j] * b[j];
  return total + SumLanes(lanes);
}

// A float as a bfloat16 (uint16_t bits; round to nearest even, as XLA converts), or as itself.
// Branch-free, so that loops of it vectorize.
template <typename T>
T FromFloat(float value) {
  if constexpr (std::is_same_v<T, float>) {
    return value;
  } else {
    uint32_t bits;
    std::memcpy(&bits, &value, sizeof(bits));
    const uint32_t rounded = (bits + 0x7fffu + ((bits >> 16) & 1u)) >> 16;
    return static_cast<uint16_t>((bits & 0x7fffffffu) > 0x7f800000u ? 0x7fc0u : rounded);
  }
}

// exp(x) on 16 lanes as Cephes' expf computes it (within 1.2e-7 of std::exp): x = n ln 2 + r,
// |r| <= ln 2 / 2, exp(x) = 2^n p(r); 0 below -87.34 (float32's smallest normal), so that
// masked logits (lowest) weigh nothing, as in XLA's softmax; NaN stays NaN. libm's expf, one
// value at a time, took a third of a batch-28 sampling step's attention.
inline Vec16 ExpLanes(Vec16 x) {
  constexpr float kHigh = 88.3762626647949f, kLow = -87.3365447505531f;
  constexpr float kLog2e = 1.44269504088896341f;
  constexpr float kLn2High = 0.693359375f, kLn2Low = -2.12194440e-4f;  // ln 2 in two parts.
  Vec16 bounded = x < kHigh ? x : kHigh;
  bounded = bounded > kLow ? bounded : kLow;
  // n = floor(x log2(e) + 1/2); the conversion to int truncates toward zero.
  const Vec16 shifted = bounded * kLog2e + 0.5f;
  Vec16i whole = __builtin_convertvector(shifted, Vec16i);
  whole -= __builtin_convertvector(whole, Vec16) > shifted ? 1 : 0;
  const Vec16 n = __builtin_convertvector(whole, Vec16);
  const Vec16 r = bounded - n * kLn2High - n * kLn2Low;
  Vec16 p = r * 1.9875691500e-4f + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.0f;
  const Vec16i exponent = (whole + 127) << 23;
  Vec16 power;
  std::memcpy(&power, &exponent, sizeof(power));
  const Vec16 result = x > kLow ? p * power : 0.0f;
  return x == x ? result : x;  // NaN stays NaN.
}

// logits[s] = exp(logits[s] - top) for s < count, in place; returns their sum. `logits` has room
// for count rounded up to 16.
inline float ExpShiftedSum(float* logits, int64_t count, float top) {
  for (int64_t s = 0; s < count; s += kLanes) {
    Vec16 lanes;
    std::memcpy(&lanes, logits + s, sizeof(lanes));
    lanes = ExpLanes(lanes - top);
    std::memcpy(logits + s, &lanes, sizeof(lanes));
  }
  float total = 0.0f;
  for (int64_t s = 0; s < count; ++s) total += logits[s];
  return total;
}

inline int64_t RoundUpToLanes(int64_t count) { return (count + kLanes - 1) / kLanes * kLanes; }

// erf(x) to 2e-7 as Eigen's float erf computes it: a rational function of x on [-4, 4], which
// vectorizes (libm's erfcf took 9 ns a value, half of a batch-1 sampling step's time).
inline float Erf(float x) {
  x = std::clamp(x, -4.0f, 4.0f);
  const float x2 = x * x;
  float p = -2.72614225801306e-10f;
  p = p * x2 + 2.77068142495902e-08f;
  p = p * x2 - 2.10102402082508e-06f;
  p = p * x2 - 5.69250639462346e-05f;
  p = p * x2 - 7.34990630326855e-04f;
  p = p * x2 - 2.95459980854025e-03f;
  p = p * x2 - 1.60960333262415e-02f;
  float q = -1.45660718464996e-05f;
  q = q * x2 - 2.13374055278905e-04f;
  q = q * x2 - 1.68282697438203e-03f;
  q = q * x2 - 7.37332916720468e-03f;
  q = q * x2 - 1.42647390514189e-02f;
  return x * p / q;
}

// jax.nn.gelu(x, approximate=False) = 0.5 x erfc(-x / sqrt(2)) = 0.5 x (1 + erf(x / sqrt(2))).
inline float Gelu(float x) {
  return 0.5f * x * (1.0f + Erf(x * static_cast<float>(M_SQRT1_2)));
}

// A bfloat16 (uint16_t bits) as a float, or a float as itself.
inline float ToFloat(float value) { return value; }
inline float ToFloat(uint16_t bits) {
  const uint32_t widened = static_cast<uint32_t>(bits) << 16;
  float value;
  std::memcpy(&value, &widened, sizeof(value));
  return value;
}

}  // namespace dpjax

#endif  // DPJAX_MODELS_CSRC_VECTOR_MATH_H_
