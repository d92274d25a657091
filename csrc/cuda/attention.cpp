// CUDA registration of lmkern::attention_fwd and lmkern::attention_bwd (schemas and contract
// in csrc/lmkern.cpp): argument checks, the current device and stream, then the pure-CUDA
// launchers of attention_kernels.cu.
//
// The CUDA kernels run a subset of the contract; anything else raises an error that names the
// case and the backend that runs it:
//   - float16 and bfloat16 (not float32), head dim 64 or 128, v's head dim equal to q's;
//   - masks: none, or boolean key padding, a (B, H, Lq, Lk) mask broadcast from (B, 1, 1, Lk)
//     (strides 0 over heads and queries), the BERT case;
//   - no dropout;
//   - no relative_bias.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../attention.h"
#include "attention_binding.h"
#include "attention_kernels.h"

namespace lmkern {
namespace {

// Points params at the mask's (B, Lk) key-padding rows and returns them (the caller keeps them
// alive until the launch); an undefined tensor without a mask, or without query rows to mask.
at::Tensor set_key_padding(const char* op, const std::optional<at::Tensor>& mask, cuda::AttentionParams& params) {
  if (!mask.has_value() || mask->size(1) == 0 || mask->size(2) == 0) return {};
  const bool key_padding = mask->scalar_type() == at::kBool && (mask->size(1) == 1 || mask->stride(1) == 0) &&
                           (mask->size(2) == 1 || mask->stride(2) == 0);
  TORCH_CHECK(
      key_padding, op, ": native CUDA attention takes only boolean key-padding masks, (B, H, Lq, Lk) broadcast from ",
      "(B, 1, 1, Lk); got a ", mask->scalar_type(), " mask with strides ", mask->strides(),
      " (backend=\"triton\" takes any mask)");
  at::Tensor rows = mask->select(2, 0).select(1, 0);  // (B, Lk)
  if (rows.size(1) > 1 && rows.stride(1) != 1) rows = rows.contiguous();
  params.key_padding_mask = rows.const_data_ptr<bool>();
  params.mask_batch_stride = rows.stride(0);
  return rows;
}

void check_no_relative_bias(const char* op, const std::optional<at::Tensor>& relative_bias) {
  TORCH_CHECK(
      !relative_bias.has_value(), op, ": native CUDA attention takes no relative_bias (backend=\"triton\" does)");
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t /*seed*/, int64_t window_left,
    const std::optional<at::Tensor>& relative_bias) {
  const char* op = "attention_fwd";
  check_attention_args(op, q_in, k_in, v_in, mask);
  check_no_relative_bias(op, relative_bias);
  check_native_cuda(op, q_in, k_in, v_in, dropout_p);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor v = with_aligned_rows(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());                                 // (B, H, Lq, D)
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, H, Lq)
  cuda::AttentionParams params =
      make_params(q, k, v, out, lse.data_ptr<float>(), scale, is_causal, causal_shift, window_left);
  const at::Tensor padding = set_key_padding(op, mask, params);
  C10_CUDA_CHECK(cuda::attention_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    int64_t causal_shift, double scale, double dropout_p, int64_t /*seed*/, int64_t window_left,
    const std::optional<at::Tensor>& relative_bias) {
  const char* op = "attention_bwd";
  check_attention_args(op, q_in, k_in, v_in, mask);
  check_no_relative_bias(op, relative_bias);
  check_attention_bwd_args(grad_out_in, q_in, v_in, out_in, lse);
  check_native_cuda(op, q_in, k_in, v_in, dropout_p);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor v = with_aligned_rows(v_in);
  const at::Tensor out = with_aligned_rows(out_in);
  const at::Tensor grad_out = with_aligned_rows(grad_out_in);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  at::Tensor delta = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // workspace
  cuda::AttentionParams params =
      make_params(q, k, v, out, lse.data_ptr<float>(), scale, is_causal, causal_shift, window_left);
  const at::Tensor padding = set_key_padding(op, mask, params);
  const cuda::AttentionGrads grads{
      strided(grad_out), strided(dq), strided(dk), strided(dv), delta.data_ptr<float>()};
  C10_CUDA_CHECK(cuda::attention_bwd(params, grads, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
}

}  // namespace lmkern
