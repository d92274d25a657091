// CUDA registration of lmkern::linear_gelu_fwd / linear_gelu_bwd[_]: the matmul is ATen's
// (cuBLAS, in csrc/linear_gelu.h), then the pure-CUDA epilogue launchers in
// linear_gelu_kernels.cu on the current device and stream; the bias gradient is the sum
// of the backward kernel's per-block partial sums.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../linear_gelu.h"
#include "linear_gelu_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

void epilogue_fwd_cuda(
    const at::Tensor& acc,
    const std::optional<at::Tensor>& bias,
    Activation activation,
    const Dropout& dropout,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& pre,
    const at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(acc.device());
  cuda::EpilogueFwdParams params{};
  params.acc = acc.const_data_ptr();
  params.bias = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  params.residual = residual.has_value() ? residual->const_data_ptr() : nullptr;
  params.residual_row_stride = residual.has_value() ? residual->stride(0) : 0;
  params.pre = pre.defined() ? pre.data_ptr() : nullptr;
  params.out = out.data_ptr();
  params.n_rows = acc.size(0);
  params.n_cols = acc.size(1);
  params.activation = activation;
  params.dropout = dropout;
  params.vectorized = cuda::rows_vectorizable({acc, residual.value_or(at::Tensor()), out});
  params.dtype = cuda::to_float_type(acc.scalar_type());
  C10_CUDA_CHECK(cuda::epilogue_fwd(params, c10::cuda::getCurrentCUDAStream()));
}

void epilogue_bwd_cuda(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& pre,
    Activation activation,
    const Dropout& dropout,
    const at::Tensor& grad_pre,
    const at::Tensor& grad_bias,
    const at::Tensor& act) {
  const c10::cuda::CUDAGuard device_guard(grad_out.device());
  const int64_t n_rows = grad_out.size(0);
  at::Tensor partial =
      at::empty({cuda::epilogue_bwd_row_blocks(n_rows), grad_out.size(1)}, grad_out.options().dtype(at::kFloat));
  cuda::EpilogueBwdParams params{};
  params.grad_out = grad_out.const_data_ptr();
  params.grad_out_row_stride = grad_out.stride(0);
  params.pre = pre.has_value() ? pre->const_data_ptr() : nullptr;
  params.pre_row_stride = pre.has_value() ? pre->stride(0) : 0;
  params.grad_pre = grad_pre.data_ptr();
  params.act = act.defined() ? act.data_ptr() : nullptr;
  params.partial = partial.data_ptr<float>();
  params.n_rows = n_rows;
  params.n_cols = grad_out.size(1);
  params.activation = activation;
  params.dropout = dropout;
  params.vectorized = cuda::rows_vectorizable({grad_out, pre.value_or(at::Tensor()), grad_pre, act});
  params.dtype = cuda::to_float_type(grad_out.scalar_type());
  C10_CUDA_CHECK(cuda::epilogue_bwd(params, c10::cuda::getCurrentCUDAStream()));
  at::Tensor total = grad_bias;  // a handle on the op's output
  at::sum_out(total, partial, 0);  // a fixed-order sum over row blocks (zero rows give zeros)
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd<epilogue_fwd_cuda>);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd<epilogue_bwd_cuda>);
  m.impl("linear_gelu_bwd_", &linear_gelu_bwd_<epilogue_bwd_cuda>);
}

}  // namespace lmkern
