// The activations of lmkern's CUDA epilogues, one fp32 element at a time (see csrc/activation.h):
//   exact GELU: gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x)  (Phi by normcdff)
//   tanh GELU:  gelu(x) = x (1 + t) / 2, t = tanh(sqrt(2/pi) (x + 0.044715 x^3)),
//               gelu'(x) = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2
//   SiLU:       silu(x) = x s, s = sigmoid(x) = 1 / (1 + exp(-x)), silu'(x) = s (1 + x (1 - s))
#pragma once

#include <cuda_runtime.h>

#include "../activation.h"

namespace lmkern::cuda {

// act(x); the slope act'(x) into *slope when it is not nullptr. kNone is the identity.
__device__ __forceinline__ float activate(float x, Activation activation, float* slope) {
  if (activation == Activation::kGelu) {
    const float cdf = normcdff(x);
    if (slope) *slope = cdf + x * expf(-0.5f * x * x) * kInvSqrt2Pi;
    return x * cdf;
  }
  if (activation == Activation::kGeluTanh) {
    const float x_sq = x * x;
    const float t = tanhf(kSqrt2OverPi * (x + kTanhCubic * x_sq * x));
    if (slope) {
      *slope = 0.5f * (1.0f + t) + 0.5f * x * (1.0f - t * t) * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x_sq);
    }
    return 0.5f * x * (1.0f + t);
  }
  if (activation == Activation::kSilu) {
    // exp of a non-positive argument only: no overflow to inf for large |x|.
    const float e = expf(-fabsf(x));
    const float s = (x >= 0.0f ? 1.0f : e) / (1.0f + e);
    if (slope) *slope = s * (1.0f + x * (1.0f - s));
    return x * s;
  }
  if (slope) *slope = 1.0f;
  return x;
}

}  // namespace lmkern::cuda
