// CUDA registration of lmkern::cross_entropy_fwd[_]: the current device and stream, then
// the pure-CUDA launcher in cross_entropy_kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../cross_entropy.h"
#include "cross_entropy_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

at::Tensor cross_entropy_into_cuda(
    const at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    double z_loss,
    const at::Tensor& grad_logits) {
  const c10::cuda::CUDAGuard device_guard(logits.device());
  at::Tensor loss = at::empty({logits.size(0)}, logits.options().dtype(at::kFloat));
  cuda::CrossEntropyParams params{};
  params.logits = logits.const_data_ptr();
  params.logits_row_stride = logits.stride(0);
  params.grad_logits = grad_logits.data_ptr();
  params.grad_row_stride = grad_logits.stride(0);
  params.target = target.const_data_ptr<int64_t>();
  params.weight = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  params.loss = loss.data_ptr<float>();
  params.n_rows = logits.size(0);
  params.vocab = logits.size(1);
  params.ignore_index = ignore_index;
  params.label_smoothing = static_cast<float>(label_smoothing);
  params.z_loss = static_cast<float>(z_loss);
  params.dtype = cuda::to_float_type(logits.scalar_type());
  C10_CUDA_CHECK(cuda::cross_entropy_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd<cross_entropy_into_cuda>);
  m.impl("cross_entropy_fwd_", &cross_entropy_fwd_<cross_entropy_into_cuda>);
}

}  // namespace lmkern
