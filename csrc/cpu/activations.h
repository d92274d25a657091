// The activations of lmkern's CPU epilogues as always-inlined scalar functions of one fp32
// element, written in branch-free arithmetic (no libm call per element) so that the
// `omp simd` loops that call them vectorise. The activation is a template argument: each
// loop is compiled once per activation, with no test per element.
//   exact GELU: gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x), Phi(x) = erfc(-x / sqrt 2) / 2
//   tanh GELU:  gelu(x) = x (1 + t) / 2, t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3),
//               gelu'(x) = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2
//   SiLU:       silu(x) = x s, s = sigmoid(x) = 1 / (1 + exp(-x)), silu'(x) = s (1 + x (1 - s))
#pragma once

#include <cmath>
#include <type_traits>

#include "../activation.h"
#include "vectorize.h"

namespace lmkern {

// Phi(x), the standard normal CDF, as erfc(z) / 2 for z = -x / sqrt 2, with erfc from
// Numerical Recipes' erfcc (fractional error below 1.2e-7 everywhere, so that the tail
// x << 0 keeps its relative accuracy): erfc(a) = t exp(-a^2 + P(t)), t = 1 / (1 + a / 2)
// for a = |z|, and erfc(z) = 2 - erfc(-z) for z < 0.
[[gnu::always_inline]] inline float normal_cdf(float x) {
  const float z = -x * kSqrtHalf;
  const float a = std::fabs(z);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;  // P(t) by Horner's rule
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  // The exponent is <= 0 up to rounding (0 at a = 0); exp_nonpositive is exact there too.
  const float erfc_a = t * exp_nonpositive(p - a * a);
  return 0.5f * (z >= 0.0f ? erfc_a : 2.0f - erfc_a);
}

// tanh(u) for the tanh form as (1 + t) and (1 - t^2), each computed without cancellation
// from e = exp(-2|u|): 1 + t = 2 / (1 + e) for u >= 0 (2e / (1 + e) below), 1 - t^2 = 4e / (1 + e)^2.
[[gnu::always_inline]] inline void tanh_terms(float u, float* one_plus_t, float* one_minus_t_sq) {
  const float e = exp_nonpositive(-2.0f * std::fabs(u));
  const float inv = 1.0f / (1.0f + e);
  *one_plus_t = (u >= 0.0f ? 2.0f : 2.0f * e) * inv;
  *one_minus_t_sq = 4.0f * e * inv * inv;
}

// sigmoid(x) from e = exp(-|x|), which neither overflows nor loses the tail.
[[gnu::always_inline]] inline float sigmoid(float x) {
  const float e = exp_nonpositive(-std::fabs(x));
  return (x >= 0.0f ? 1.0f : e) / (1.0f + e);
}

template <Activation kAct>
using ActivationConstant = std::integral_constant<Activation, kAct>;

// act(x) for kAct kGelu, kGeluTanh or kSilu; act'(x) into *slope when slope is not nullptr
// (a constant at each call site, so that the unused half is compiled away).
template <Activation kAct>
[[gnu::always_inline]] inline float act_and_slope(float x, float* slope) {
  static_assert(kAct != Activation::kNone);
  if constexpr (kAct == Activation::kGelu) {
    const float cdf = normal_cdf(x);
    if (slope) *slope = cdf + x * exp_nonpositive(-0.5f * x * x) * kInvSqrt2Pi;
    return x * cdf;
  } else if constexpr (kAct == Activation::kGeluTanh) {
    const float x_sq = x * x;
    float one_plus_t, one_minus_t_sq;
    tanh_terms(kSqrt2OverPi * (x + kTanhCubic * x_sq * x), &one_plus_t, &one_minus_t_sq);
    if (slope) {
      *slope = 0.5f * one_plus_t + 0.5f * x * one_minus_t_sq * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x_sq);
    }
    return 0.5f * x * one_plus_t;
  } else {
    const float s = sigmoid(x);
    if (slope) *slope = s * (1.0f + x * (1.0f - s));
    return x * s;
  }
}

// f(ActivationConstant<a>{}) for a runtime activation other than kNone, so that f's loops
// are compiled once per activation.
template <typename F>
decltype(auto) with_activation(Activation activation, const F& f) {
  switch (activation) {
    case Activation::kGelu:
      return f(ActivationConstant<Activation::kGelu>{});
    case Activation::kGeluTanh:
      return f(ActivationConstant<Activation::kGeluTanh>{});
    default:
      return f(ActivationConstant<Activation::kSilu>{});
  }
}

}  // namespace lmkern
