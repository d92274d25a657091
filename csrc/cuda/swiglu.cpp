// CUDA registration of lmkern::swiglu_fwd / swiglu_bwd_: the gate and up matmuls are ATen's
// (cuBLAS, in csrc/swiglu.h), then the pure-CUDA launchers in swiglu_kernels.cu on the
// current device and stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../swiglu.h"
#include "swiglu_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

cuda::GatedParams gated_params(const at::Tensor& gate, const at::Tensor& up, Activation activation, const at::Tensor& h) {
  cuda::GatedParams params{};
  params.gate = gate.const_data_ptr();
  params.gate_row_stride = gate.stride(0);
  params.up = up.const_data_ptr();
  params.up_row_stride = up.stride(0);
  params.h = h.defined() ? h.data_ptr() : nullptr;
  params.n_rows = gate.size(0);
  params.n_cols = gate.size(1);
  params.activation = activation;
  params.dtype = cuda::to_float_type(gate.scalar_type());
  return params;
}

void gated_fwd_cuda(const at::Tensor& gate, const at::Tensor& up, Activation activation, const at::Tensor& h) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  cuda::GatedParams params = gated_params(gate, up, activation, h);
  params.vectorized = cuda::rows_vectorizable({gate, up, h});
  C10_CUDA_CHECK(cuda::gated_fwd(params, c10::cuda::getCurrentCUDAStream()));
}

void gated_bwd_cuda(
    const at::Tensor& grad_gate,
    const at::Tensor& grad_up,
    const at::Tensor& gate,
    const at::Tensor& up,
    Activation activation,
    const at::Tensor& h) {
  const c10::cuda::CUDAGuard device_guard(gate.device());
  cuda::GatedParams params = gated_params(gate, up, activation, h);
  params.grad_gate = grad_gate.data_ptr();
  params.grad_gate_row_stride = grad_gate.stride(0);
  params.grad_up = grad_up.data_ptr();
  params.grad_up_row_stride = grad_up.stride(0);
  params.vectorized = cuda::rows_vectorizable({grad_gate, grad_up, gate, up, h});
  C10_CUDA_CHECK(cuda::gated_bwd(params, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("swiglu_fwd", &swiglu_fwd<gated_fwd_cuda>);
  m.impl("swiglu_bwd_", &swiglu_bwd_<gated_bwd_cuda>);
}

}  // namespace lmkern
