// The activations of lmkern's epilogues (the linear layer's GELU, the gated feed-forward's
// SiLU or GELU), named without torch headers so that the CPU kernels, the pure-CUDA kernels
// and the torch bindings share them. Their math: csrc/cpu/activations.h and
// csrc/cuda/activations.cuh, one per device.
#pragma once

namespace lmkern {

enum class Activation { kNone, kGelu, kGeluTanh, kSilu };

// GELU's constants: 1/sqrt(2), 1/sqrt(2 pi), sqrt(2/pi) and the tanh form's cubic term.
constexpr float kSqrtHalf = 0.70710678118654752f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f;
constexpr float kSqrt2OverPi = 0.79788456080286536f;
constexpr float kTanhCubic = 0.044715f;

}  // namespace lmkern
