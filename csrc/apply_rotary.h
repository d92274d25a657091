// Argument checks and the op forms of lmkern::apply_rotary / apply_rotary_, shared by the
// CPU and CUDA registrations: each device only writes the output allocated here (or x).
#pragma once

#include <ATen/ATen.h>
#include <ATen/MemoryOverlap.h>

namespace lmkern {

inline bool is_kernel_float(at::ScalarType type) {
  return type == at::kFloat || type == at::kHalf || type == at::kBFloat16;
}

// cos and sin as every rotary kernel reads them: contiguous (P, R / 2) of one float dtype on
// x's device, 2 <= R <= x's head dim. names: what the op calls them ("cos and sin").
inline void check_rotary_caches(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const char* op,
    const char* names = "cos and sin") {
  TORCH_CHECK(
      cos.dim() == 2 && cos.sizes() == sin.sizes() && cos.scalar_type() == sin.scalar_type() &&
          is_kernel_float(cos.scalar_type()) && cos.is_contiguous() && sin.is_contiguous() &&
          cos.device() == x.device() && sin.device() == x.device(),
      op, ": ", names, " must be contiguous (P, R / 2) tensors of one float dtype on ", x.device(), ", got ",
      cos.scalar_type(), " ", cos.sizes(), " on ", cos.device(), " and ", sin.scalar_type(), " ", sin.sizes(), " on ",
      sin.device());
  TORCH_CHECK(
      cos.size(1) >= 1 && 2 * cos.size(1) <= x.size(3), op, ": the rotary dim 2 * ", cos.size(1),
      " must lie in [2, head dim ", x.size(3), "]");
}

// Everything a kernel relies on for memory safety but the positions' values (which the
// CPU kernels check; the CUDA kernels give NaN for a position out of range); the Python
// layer has already given friendlier errors for the public API.
inline void check_apply_rotary(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, const char* op) {
  TORCH_CHECK(x.dim() == 4, op, ": x must be 4-D (B, H, L, D), got ", x.sizes());
  TORCH_CHECK(is_kernel_float(x.scalar_type()), op, ": x must be float32, float16 or bfloat16, got ", x.scalar_type());
  check_rotary_caches(x, cos, sin, op);
  TORCH_CHECK(
      positions.dim() == 2 && positions.size(0) == x.size(0) && positions.size(1) == x.size(2) &&
          positions.scalar_type() == at::kLong && positions.device() == x.device(),
      op, ": positions must be an int64 tensor of shape (", x.size(0), ", ", x.size(2), ") on ", x.device(), ", got ",
      positions.scalar_type(), " ", positions.sizes(), " on ", positions.device());
}

// A device's rotation of x into out (x itself in place, else a new tensor of x's shape):
// the first 2 cos.size(1) elements of each head rotated (by minus the angles if
// conjugate), the rest copied unless out is x. Called with at least one element.
using ApplyRotaryInto = void (*)(
    const at::Tensor& x,
    const at::Tensor& cos,
    const at::Tensor& sin,
    const at::Tensor& positions,
    bool interleaved,
    bool conjugate,
    const at::Tensor& out);

template <ApplyRotaryInto into>
at::Tensor apply_rotary(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate) {
  check_apply_rotary(x, cos, sin, positions, "apply_rotary");
  at::Tensor out = at::empty(x.sizes(), x.options());
  if (x.numel() > 0) {
    into(x, cos, sin, positions, interleaved, conjugate, out);
  }
  return out;
}

template <ApplyRotaryInto into>
void apply_rotary_(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate) {
  check_apply_rotary(x, cos, sin, positions, "apply_rotary_");
  TORCH_CHECK(
      at::has_internal_overlap(x) != at::MemOverlap::Yes, "apply_rotary_: x must not overlap itself (an expanded "
      "tensor cannot be rotated in place), got strides ", x.strides());
  if (x.numel() > 0) {
    into(x, cos, sin, positions, interleaved, conjugate, x);
  }
}

// The CPU rotation (cpu/apply_rotary.cpp) of x into out, both (B, H, L, D) with any
// strides (out may be x), at positions (B, L) int64 checked to lie in [0, P) first; for
// other ops' CPU kernels (the KV-cache append), after check_apply_rotary's checks.
void apply_rotary_cpu(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate, const at::Tensor& out);

}  // namespace lmkern
