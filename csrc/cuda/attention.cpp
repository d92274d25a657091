// CUDA registration of lmkern::attention_fwd, lmkern::attention_bwd and
// lmkern::attention_with_kv_cache_fwd (schemas and contract in csrc/lmkern.cpp): argument
// checks, the current device and stream, then the pure-CUDA launchers of attention_kernels.cu.
//
// The CUDA kernels run a subset of the contract; anything else raises an error that names the
// case and the backend that runs it:
//   - float16 and bfloat16 (not float32), head dim 64 or 128, v's head dim equal to q's;
//   - masks: none, or boolean key padding, a (B, H, Lq, Lk) mask broadcast from (B, 1, 1, Lk)
//     (strides 0 over heads and queries), the BERT case;
//   - no dropout.
// Decoding appends k_new and v_new in the kernels (not in torch), so that a sequence whose new
// keys do not fit gets NaN outputs and no write, without a host-side check stalling the stream.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <cstdint>
#include <optional>
#include <tuple>

#include "../attention.h"
#include "attention_kernels.h"
#include "torch_binding.h"

namespace lmkern {
namespace {

// The kernels' own limits, checked after the contract's (check_attention_args).
void check_native_cuda(const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
                       double dropout_p) {
  TORCH_CHECK(
      q.scalar_type() == at::kHalf || q.scalar_type() == at::kBFloat16, op,
      ": native CUDA attention takes float16 or bfloat16, got ", q.scalar_type(), " (backend=\"triton\" runs float32)");
  TORCH_CHECK(
      q.size(3) == 64 || q.size(3) == 128, op, ": native CUDA attention supports head dims 64 and 128, got ",
      q.size(3), " (backend=\"triton\" runs the others)");
  TORCH_CHECK(
      v.size(3) == q.size(3), op, ": native CUDA attention needs v's head dim equal to q's, got ", v.size(3),
      " and ", q.size(3));
  TORCH_CHECK(
      dropout_p == 0.0, op, ": dropout is not supported by native CUDA attention (dropout_p = ", dropout_p,
      "); backend=\"triton\" runs it");
  // CUDA's grid limit on its y and z dimensions; lengths leave room for the kernels' int indices.
  TORCH_CHECK(
      q.size(0) <= 65535 && q.size(1) <= 65535, op, ": native CUDA attention takes at most 65535 sequences and ",
      "65535 heads, got q of shape ", q.sizes());
  TORCH_CHECK(
      q.size(2) * (q.size(1) / k.size(1)) < (int64_t{1} << 30) && k.size(2) < (int64_t{1} << 30), op,
      ": sequences too long for native CUDA attention: q ", q.sizes(), ", k ", k.sizes());
}

// Whether every row of a (B, H, L, D) tensor starts on a 16-byte boundary, as the kernels'
// 16-byte copies need (strides of size-1 dimensions are never multiplied by a nonzero index).
bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || (t.size(3) > 1 && t.stride(3) != 1)) return false;
  for (int dim = 0; dim < 3; ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) % 8 != 0) return false;
  }
  return true;
}

// t itself, or a contiguous copy when its rows are not aligned (a view sliced at an odd offset).
at::Tensor with_aligned_rows(const at::Tensor& t) { return rows_aligned(t) ? t : t.contiguous(); }

cuda::StridedTensor strided(const at::Tensor& t) { return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)}; }

cuda::AttentionParams make_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, float* lse, double scale,
    bool causal, int64_t causal_shift) {
  cuda::AttentionParams params{};
  params.q = strided(q);
  params.k = strided(k);
  params.v = strided(v);
  params.out = strided(out);
  params.lse = lse;
  params.batch = q.size(0);
  params.heads_q = q.size(1);
  params.heads_kv = k.size(1);
  params.seqlen_q = q.size(2);
  params.seqlen_k = k.size(2);
  params.head_dim = q.size(3);
  params.scale = static_cast<float>(scale);
  params.causal = causal;
  params.causal_shift = causal_shift;
  params.dtype = cuda::to_float_type(q.scalar_type());
  return params;
}

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

std::tuple<at::Tensor, at::Tensor> attention_fwd_cuda(
    const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t /*seed*/) {
  const char* op = "attention_fwd";
  check_attention_args(op, q_in, k_in, v_in, mask);
  check_native_cuda(op, q_in, k_in, v_in, dropout_p);
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in);
  const at::Tensor k = with_aligned_rows(k_in);
  const at::Tensor v = with_aligned_rows(v_in);
  at::Tensor out = at::empty(q.sizes(), q.options());                                 // (B, H, Lq, D)
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));  // (B, H, Lq)
  cuda::AttentionParams params = make_params(q, k, v, out, lse.data_ptr<float>(), scale, is_causal, causal_shift);
  const at::Tensor padding = set_key_padding(op, mask, params);
  C10_CUDA_CHECK(cuda::attention_fwd(params, c10::cuda::getCurrentCUDAStream()));
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cuda(
    const at::Tensor& grad_out_in, const at::Tensor& q_in, const at::Tensor& k_in, const at::Tensor& v_in,
    const at::Tensor& out_in, const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal,
    int64_t causal_shift, double scale, double dropout_p, int64_t /*seed*/) {
  const char* op = "attention_bwd";
  check_attention_args(op, q_in, k_in, v_in, mask);
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
  cuda::AttentionParams params = make_params(q, k, v, out, lse.data_ptr<float>(), scale, is_causal, causal_shift);
  const at::Tensor padding = set_key_padding(op, mask, params);
  const cuda::AttentionGrads grads{
      strided(grad_out), strided(dq), strided(dk), strided(dv), delta.data_ptr<float>()};
  C10_CUDA_CHECK(cuda::attention_bwd(params, grads, c10::cuda::getCurrentCUDAStream()));
  return {dq, dk, dv};
}

at::Tensor attention_with_kv_cache_fwd_cuda(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens_in,
    const std::optional<at::Tensor>& k_new_in, const std::optional<at::Tensor>& v_new_in, double scale) {
  const char* op = "attention_with_kv_cache_fwd";
  check_kv_cache_args(q_in, k_cache, v_cache, cache_seqlens_in, k_new_in, v_new_in);
  check_native_cuda(op, q_in, k_cache, v_cache, 0.0);
  // Written in place, the caches cannot be copied into alignment.
  TORCH_CHECK(
      rows_aligned(k_cache) && rows_aligned(v_cache), op,
      ": native CUDA attention needs the caches' rows 16-byte aligned (strides multiples of 8), got strides ",
      k_cache.strides(), " and ", v_cache.strides());
  const c10::cuda::CUDAGuard device_guard(q_in.device());
  const at::Tensor q = with_aligned_rows(q_in);
  const at::Tensor cache_seqlens = cache_seqlens_in.contiguous();
  at::Tensor out = at::empty(q.sizes(), q.options());  // (B, H, Lq, D)
  cuda::AttentionParams params = make_params(q, k_cache, v_cache, out, nullptr, scale, /*causal=*/true, /*causal_shift=*/0);
  params.cache_seqlens = cache_seqlens.const_data_ptr();
  params.cache_seqlens_int64 = cache_seqlens.scalar_type() == at::kLong;
  cuda::NewKeys new_keys{};
  at::Tensor k_new;
  at::Tensor v_new;
  if (k_new_in.has_value()) {
    k_new = with_aligned_rows(*k_new_in);
    v_new = with_aligned_rows(*v_new_in);
    params.seqlen_new = k_new.size(2);
    new_keys = {strided(k_new), strided(v_new)};
  }
  int num_splits = 1;
  C10_CUDA_CHECK(cuda::attention_decode_num_splits(params, &num_splits));
  at::Tensor out_partial;
  at::Tensor lse_partial;
  cuda::DecodeSplits splits{num_splits, nullptr, nullptr};
  if (num_splits > 1) {
    const auto fp32 = q.options().dtype(at::kFloat);
    out_partial = at::empty({num_splits, q.size(0), q.size(1), q.size(2), q.size(3)}, fp32);
    lse_partial = at::empty({num_splits, q.size(0), q.size(1), q.size(2)}, fp32);
    splits.out_partial = out_partial.data_ptr<float>();
    splits.lse_partial = lse_partial.data_ptr<float>();
  }
  C10_CUDA_CHECK(cuda::attention_decode(params, new_keys, splits, c10::cuda::getCurrentCUDAStream()));
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) {
  m.impl("attention_fwd", &attention_fwd_cuda);
  m.impl("attention_bwd", &attention_bwd_cuda);
  m.impl("attention_with_kv_cache_fwd", &attention_with_kv_cache_fwd_cuda);
}

}  // namespace lmkern
