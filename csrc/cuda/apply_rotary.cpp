// CUDA registration of lmkern::apply_rotary / apply_rotary_: the current device and
// stream, then the pure-CUDA launcher in apply_rotary_kernels.cu.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "../apply_rotary.h"
#include "apply_rotary_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

void apply_rotary_cuda(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate, const at::Tensor& out) {
  const c10::cuda::CUDAGuard device_guard(x.device());
  cuda::ApplyRotaryParams params{};
  params.x = x.const_data_ptr();
  params.out = out.data_ptr();
  for (int dim = 0; dim < 4; ++dim) {
    params.x_stride[dim] = x.stride(dim);
    params.out_stride[dim] = out.stride(dim);
  }
  params.cos = cos.const_data_ptr();
  params.sin = sin.const_data_ptr();
  params.positions = positions.const_data_ptr<int64_t>();
  params.positions_stride[0] = positions.stride(0);
  params.positions_stride[1] = positions.stride(1);
  params.batch = x.size(0);
  params.heads = x.size(1);
  params.seqlen = x.size(2);
  params.head_dim = x.size(3);
  params.half = cos.size(1);
  params.max_positions = cos.size(0);
  params.interleaved = interleaved;
  params.conjugate = conjugate;
  params.copy_rest = !out.is_same(x);
  params.dtype = cuda::to_float_type(x.scalar_type());
  params.cache_dtype = cuda::to_float_type(cos.scalar_type());
  C10_CUDA_CHECK(cuda::apply_rotary(params, c10::cuda::getCurrentCUDAStream()));
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("apply_rotary", &apply_rotary<apply_rotary_cuda>);
  m.impl("apply_rotary_", &apply_rotary_<apply_rotary_cuda>);
}

}  // namespace lmkern
