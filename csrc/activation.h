// The activations of the CPU kernels' fused epilogues, one value at a time, as torch computes them: the sparse
// convolution's (csrc/sparse_conv.cpp, which also has vector loops of them) and Winograd's (csrc/winograd.cpp).
#pragma once

#include <cstdint>
#include <cstring>
#include <limits>

namespace vpns::epilogue {

// The activations an epilogue can apply, as sparse_conv2d's `activation` numbers them.
enum Activation : int64_t {
  kIdentity = 0,
  kRelu = 1,
  kSilu = 2,
  kRelu6 = 3,
  kHardswish = 4,
  kSigmoid = 5,
  kHardsigmoid = 6
};
constexpr int64_t kActivations = 7;
// The two made of exp (x / (1 + exp(-x)) and 1 / (1 + exp(-x))), which have vector loops of their own.
constexpr bool is_logistic(int64_t activation) { return activation == kSilu || activation == kSigmoid; }

// exp(x) for float32 without a library call, one value at a time (exp_avx2 below takes the same steps on 8
// lanes): x = n ln2 + r with |r| <= ln2 / 2 (ln2 in two parts, so n ln2 is exact), exp(r) by a degree-7
// polynomial (the Taylor coefficients up to r^7 / 7!), times 2^n as 2^a * 2^b with a + b = n, each built in the
// exponent bits (n reaches 128 at the top of the range and -150 at the bottom, beyond one exponent field; with
// one factor the input had to be clamped to [-87, 88], and exp(88.72) came out as exp(88), half its value).
// The SiLU made of it is within 3e-7 of torch's relative to the result where that is a normal float (200,001
// points in [-120, 120], 2026-12-04). Above 88.72 it is +inf and below -103.97 it is 0, as expf; NaN stays NaN
// (comparisons with NaN are false, so the clamps pass it through, and the product with it is NaN).
inline float power_of_two(float n) {    // 2^n for an integer-valued n in [-126, 127]: no float-to-int conversion
  const float biased = n + 8388735.0f;  // 2^23 + 127: n + 127 in the low mantissa bits
  int32_t bits;
  std::memcpy(&bits, &biased, sizeof(bits));
  bits = static_cast<int32_t>(static_cast<uint32_t>(bits - 0x4B000000) << 23);
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return scale;
}

inline float exp_float(float x) {
  const float clamped = x < -103.972084f ? -103.972084f : (x > 88.7228391f ? 88.7228391f : x);
  // round to nearest by adding and subtracting 1.5 * 2^23 (exact for |value| < 2^22)
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = (clamped - n * 0.693359375f) + n * 2.12194440e-4f;
  float p = 1.98412698e-4f;  // 1 / 7!
  p = p * r + 1.38888889e-3f;
  p = p * r + 8.33333333e-3f;
  p = p * r + 4.16666667e-2f;
  p = p * r + 1.66666667e-1f;
  p = p * r + 0.5f;
  p = p * r + 1.0f;
  p = p * r + 1.0f;
  const float half = (n * 0.5f + 12582912.0f) - 12582912.0f;  // n = half + (n - half), each within an exponent
  const float result = p * power_of_two(half) * power_of_two(n - half);
  return x > 88.7228391f ? std::numeric_limits<float>::infinity() : (x < -103.972084f ? 0.0f : result);
}

// The activation of one value, as torch computes it: relu keeps NaN (torch.relu), silu is x / (1 + exp(-x))
// (torch's formula: -inf gives NaN, large negative x gives -0), relu6 clamps to [0, 6] keeping NaN and -0,
// hardswish is x * clamp(x + 3, 0, 6) / 6 in that order (torch's CPU kernel: -inf gives NaN), sigmoid is
// 1 / (1 + exp(-x)) (0 at -inf, 1 at inf), hardsigmoid clamp(x + 3, 0, 6) / 6. On x86 the sparse
// convolution's epilogue runs explicit vector loops for every activation (csrc/sparse_conv.cpp, vector_epilogue),
// which match this form; the portable kernel and the other callers use it as it is.
template <int64_t kActivation>
inline float activate(float value) {
  if (kActivation == kRelu) return value < 0.0f ? 0.0f : value;
  if (kActivation == kSilu) return value / (1.0f + exp_float(-value));
  if (kActivation == kSigmoid) return 1.0f / (1.0f + exp_float(-value));
  if (kActivation == kHardsigmoid) {
    const float shifted = value + 3.0f;
    return (shifted < 0.0f ? 0.0f : (shifted > 6.0f ? 6.0f : shifted)) / 6.0f;
  }
  if (kActivation == kRelu6) return value < 0.0f ? 0.0f : (value > 6.0f ? 6.0f : value);
  if (kActivation == kHardswish) {
    float clamped = value + 3.0f;
    clamped = clamped < 0.0f ? 0.0f : (clamped > 6.0f ? 6.0f : clamped);
    return value * clamped / 6.0f;
  }
  return value;
}

inline float activate(float value, int64_t activation) {
  switch (activation) {
    case kRelu: return activate<kRelu>(value);
    case kSilu: return activate<kSilu>(value);
    case kRelu6: return activate<kRelu6>(value);
    case kHardswish: return activate<kHardswish>(value);
    case kSigmoid: return activate<kSigmoid>(value);
    case kHardsigmoid: return activate<kHardsigmoid>(value);
    default: return value;
  }
}

}  // namespace vpns::epilogue
