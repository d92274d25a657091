// Argument checks and parameter packing shared by the torch bindings of the CUDA attention
// kernels (attention.cpp and attention_with_kv_cache.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

#include "attention_kernels.h"
#include "torch_binding.h"

namespace lmkern {

// The kernels' own limits, checked after the contract's (check_attention_args).
inline void check_native_cuda(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, double dropout_p) {
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
inline bool rows_aligned(const at::Tensor& t) {
  if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || (t.size(3) > 1 && t.stride(3) != 1)) return false;
  for (int dim = 0; dim < 3; ++dim) {
    if (t.size(dim) > 1 && t.stride(dim) % 8 != 0) return false;
  }
  return true;
}

// t itself, or a contiguous copy when its rows are not aligned (a view sliced at an odd offset).
inline at::Tensor with_aligned_rows(const at::Tensor& t) { return rows_aligned(t) ? t : t.contiguous(); }

inline cuda::StridedTensor strided(const at::Tensor& t) {
  return {t.data_ptr(), t.stride(0), t.stride(1), t.stride(2)};
}

inline cuda::AttentionParams make_params(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out, float* lse, double scale,
    bool causal, int64_t causal_shift, int64_t window_left) {
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
  // A window wider than any query's reach bounds nothing (and would not fit the kernels' int).
  params.window_left = window_left > q.size(2) + k.size(2) + std::abs(causal_shift) ? -1 : window_left;
  params.dtype = cuda::to_float_type(q.scalar_type());
  return params;
}

}  // namespace lmkern
