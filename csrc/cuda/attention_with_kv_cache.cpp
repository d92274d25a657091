// CUDA registration of lmkern::attention_with_kv_cache_fwd (schema and contract in
// csrc/lmkern.cpp): the decode launcher of attention_kernels.cu, under the limits of
// check_native_cuda (attention_binding.h) plus caches whose rows are 16-byte aligned.
// Decoding appends k_new and v_new in the kernels (not in torch), so that a sequence whose new
// keys do not fit gets NaN outputs and no write, without a host-side check stalling the stream;
// with rotary caches the append kernel rotates the new keys and the attention kernel the
// queries where they land in shared memory.
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include <optional>

#include "../attention.h"
#include "attention_binding.h"
#include "attention_kernels.h"

namespace lmkern {
namespace {

at::Tensor attention_with_kv_cache_fwd_cuda(
    const at::Tensor& q_in, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens_in,
    const std::optional<at::Tensor>& k_new_in, const std::optional<at::Tensor>& v_new_in, double scale,
    const std::optional<at::Tensor>& rotary_cos_in, const std::optional<at::Tensor>& rotary_sin_in,
    bool rotary_interleaved, int64_t window_left) {
  const char* op = "attention_with_kv_cache_fwd";
  check_kv_cache_args(q_in, k_cache, v_cache, cache_seqlens_in, k_new_in, v_new_in, rotary_cos_in, rotary_sin_in);
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
  cuda::AttentionParams params =
      make_params(q, k_cache, v_cache, out, nullptr, scale, /*causal=*/true, /*causal_shift=*/0, window_left);
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
  at::Tensor rotary_cos;
  at::Tensor rotary_sin;
  if (rotary_cos_in.has_value()) {  // the kernels read fp32 caches: others are converted (allocates)
    rotary_cos = rotary_cos_in->to(at::kFloat).contiguous();
    rotary_sin = rotary_sin_in->to(at::kFloat).contiguous();
    params.rotary_cos = rotary_cos.const_data_ptr<float>();
    params.rotary_sin = rotary_sin.const_data_ptr<float>();
    params.rotary_half = rotary_cos.size(1);
    params.rotary_max_positions = rotary_cos.size(0);
    params.rotary_interleaved = rotary_interleaved;
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

TORCH_LIBRARY_IMPL(lmkern, CUDA, m) { m.impl("attention_with_kv_cache_fwd", &attention_with_kv_cache_fwd_cuda); }

}  // namespace lmkern
