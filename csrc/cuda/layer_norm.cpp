// CUDA registration of lmkern::layer_norm_fwd / layer_norm_bwd: the current device and
// stream, then the pure-CUDA launchers in layer_norm_kernels.cu; the weight and bias
// gradients are the sums of the kernel's per-block partial sums.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../layer_norm.h"
#include "layer_norm_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

const float* optional_floats(const std::optional<at::Tensor>& tensor) {
  return tensor.has_value() ? tensor->const_data_ptr<float>() : nullptr;
}

void check_row_width(const at::Tensor& rows, const char* op) {
  const int64_t row_bytes = rows.size(1) * static_cast<int64_t>(rows.element_size());
  TORCH_CHECK_VALUE(
      row_bytes <= cuda::kMaxLayerNormRowBytes, op, ": the CUDA kernels hold rows of at most ",
      cuda::kMaxLayerNormRowBytes, " bytes, got ", rows.size(1), " ", rows.scalar_type(), " elements");
}

void layer_norm_fwd_cuda(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    float eps,
    const Dropout& dropout,
    const at::Tensor& out,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& summed,
    bool rms) {
  check_row_width(x, "layer_norm_fwd");
  const c10::cuda::CUDAGuard device_guard(x.device());
  cuda::LayerNormFwdParams params{};
  params.x = x.const_data_ptr();
  params.x_row_stride = x.stride(0);
  params.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  params.residual_row_stride = residual.has_value() ? residual->stride(0) : 0;
  params.weight = optional_floats(weight);
  params.bias = optional_floats(bias);
  params.out = out.data_ptr();
  params.summed = summed.defined() ? summed.data_ptr() : nullptr;
  params.mean = rms ? nullptr : mean.data_ptr<float>();
  params.rstd = rstd.data_ptr<float>();
  params.n_rows = x.size(0);
  params.width = x.size(1);
  params.eps = eps;
  params.dropout = dropout;
  params.vectorized = cuda::rows_vectorizable({x, residual.value_or(at::Tensor()), out, summed});
  params.dtype = cuda::to_float_type(x.scalar_type());
  C10_CUDA_CHECK(cuda::layer_norm_fwd(params, rms, c10::cuda::getCurrentCUDAStream()));
}

void layer_norm_bwd_cuda(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_sum,
    const at::Tensor& summed,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const Dropout& dropout,
    const at::Tensor& grad_summed,
    const at::Tensor& grad_x,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias,
    bool rms) {
  check_row_width(summed, "layer_norm_bwd");
  const c10::cuda::CUDAGuard device_guard(summed.device());
  cuda::LayerNormBwdParams params{};
  params.n_rows = summed.size(0);
  params.width = summed.size(1);
  params.dtype = cuda::to_float_type(summed.scalar_type());
  C10_CUDA_CHECK(cuda::layer_norm_bwd_blocks(params.n_rows, params.width, params.dtype, &params.blocks));
  at::Tensor partial = at::empty({params.blocks, 2, params.width}, summed.options().dtype(at::kFloat));
  params.grad_out = grad_out.const_data_ptr();
  params.grad_out_row_stride = grad_out.stride(0);
  params.grad_sum = grad_sum.has_value() ? grad_sum->const_data_ptr() : nullptr;
  params.grad_sum_row_stride = grad_sum.has_value() ? grad_sum->stride(0) : 0;
  params.summed = summed.const_data_ptr();
  params.summed_row_stride = summed.stride(0);
  params.weight = optional_floats(weight);
  params.mean = rms ? nullptr : mean.const_data_ptr<float>();
  params.rstd = rstd.const_data_ptr<float>();
  params.grad_summed = grad_summed.data_ptr();
  params.grad_x = grad_x.defined() ? grad_x.data_ptr() : nullptr;
  params.partial = partial.data_ptr<float>();
  params.dropout = dropout;
  params.vectorized =
      cuda::rows_vectorizable({grad_out, grad_sum.value_or(at::Tensor()), summed, grad_summed, grad_x});
  C10_CUDA_CHECK(cuda::layer_norm_bwd(params, rms, c10::cuda::getCurrentCUDAStream()));
  // A fixed-order sum over the blocks' partial sums (zero rows give zeros).
  for (int64_t which : {0, 1}) {
    at::Tensor total = which == 0 ? grad_weight : grad_bias;  // a handle on the op's output
    if (total.defined()) {
      at::sum_out(total, partial.select(1, which), 0);
    }
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd<layer_norm_fwd_cuda>);
  m.impl("layer_norm_bwd", &layer_norm_bwd<layer_norm_bwd_cuda>);
}

}  // namespace lmkern
