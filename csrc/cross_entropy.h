// Argument checks and the two op forms (gradient in a new tensor, or over the logits)
// shared by the CPU and CUDA registrations of lmkern::cross_entropy_fwd[_].
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

namespace lmkern {

// Checks everything a kernel relies on for memory safety; the Python layer has already
// given friendlier errors for the public API, these guard direct torch.ops calls.
inline void check_cross_entropy_args(
    const at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& grad_logits) {
  TORCH_CHECK(logits.dim() == 2, "cross_entropy_fwd: logits must be 2-D (N, V), got ", logits.sizes());
  TORCH_CHECK(
      logits.scalar_type() == at::kFloat || logits.scalar_type() == at::kHalf ||
          logits.scalar_type() == at::kBFloat16,
      "cross_entropy_fwd: logits must be float32, float16 or bfloat16, got ", logits.scalar_type());
  TORCH_CHECK(logits.size(1) > 0, "cross_entropy_fwd: logits must have at least one class, got ", logits.sizes());
  TORCH_CHECK(
      logits.stride(1) == 1,
      "cross_entropy_fwd: logits must be contiguous in the last dimension, got strides ", logits.strides());
  TORCH_CHECK(
      target.dim() == 1 && target.size(0) == logits.size(0),
      "cross_entropy_fwd: target must have shape (", logits.size(0), ",), got ", target.sizes());
  TORCH_CHECK(
      target.scalar_type() == at::kLong, "cross_entropy_fwd: target must be int64, got ", target.scalar_type());
  TORCH_CHECK(target.is_contiguous(), "cross_entropy_fwd: target must be contiguous");
  TORCH_CHECK(target.device() == logits.device(), "cross_entropy_fwd: target must be on ", logits.device());
  if (weight.has_value()) {
    TORCH_CHECK(
        weight->dim() == 1 && weight->size(0) == logits.size(1),
        "cross_entropy_fwd: weight must have shape (", logits.size(1), ",), got ", weight->sizes());
    TORCH_CHECK(
        weight->scalar_type() == at::kFloat, "cross_entropy_fwd: weight must be float32, got ",
        weight->scalar_type());
    TORCH_CHECK(weight->is_contiguous(), "cross_entropy_fwd: weight must be contiguous");
    TORCH_CHECK(weight->device() == logits.device(), "cross_entropy_fwd: weight must be on ", logits.device());
  }
  TORCH_CHECK(
      grad_logits.sizes() == logits.sizes() && grad_logits.scalar_type() == logits.scalar_type() &&
          grad_logits.stride(1) == 1,
      "cross_entropy_fwd: the gradient buffer must match the logits and be contiguous in the last dimension");
}

// A device's kernel: computes the per-row loss, writing the gradient into grad_logits
// (which may be the logits themselves).
using CrossEntropyInto = at::Tensor (*)(
    const at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    double z_loss,
    const at::Tensor& grad_logits);

template <CrossEntropyInto into>
std::tuple<at::Tensor, at::Tensor> cross_entropy_fwd(
    const at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    double z_loss) {
  at::Tensor grad_logits = at::empty_like(logits, at::MemoryFormat::Contiguous);
  check_cross_entropy_args(logits, target, weight, grad_logits);
  at::Tensor loss = into(logits, target, weight, ignore_index, label_smoothing, z_loss, grad_logits);
  return {loss, grad_logits};
}

template <CrossEntropyInto into>
at::Tensor cross_entropy_fwd_(
    at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    double z_loss) {
  check_cross_entropy_args(logits, target, weight, logits);
  return into(logits, target, weight, ignore_index, label_smoothing, z_loss, logits);
}

}  // namespace lmkern
