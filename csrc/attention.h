// Argument checks shared by the device registrations of lmkern::attention_fwd,
// lmkern::attention_bwd and lmkern::attention_with_kv_cache_fwd. The Python layer has
// already given friendlier errors for the public API; these guard direct torch.ops calls
// and everything a kernel relies on for memory safety.
#pragma once

#include <ATen/ATen.h>

#include <array>
#include <optional>

#include "apply_rotary.h"

namespace lmkern {

inline bool is_kernel_dtype(at::ScalarType dtype) {
  return dtype == at::kFloat || dtype == at::kHalf || dtype == at::kBFloat16;
}

// `tensor` must be 4-D, of `like`'s dtype and device, contiguous in its last dimension.
inline void check_attention_tensor(const char* op, const char* name, const at::Tensor& tensor, const at::Tensor& like) {
  TORCH_CHECK(tensor.dim() == 4, op, ": ", name, " must be 4-D, got shape ", tensor.sizes());
  TORCH_CHECK(
      tensor.scalar_type() == like.scalar_type() && tensor.device() == like.device(), op, ": ", name,
      " must be ", like.scalar_type(), " on ", like.device(), ", got ", tensor.scalar_type(), " on ", tensor.device());
  TORCH_CHECK(
      tensor.size(3) <= 1 || tensor.stride(3) == 1, op, ": ", name,
      " must be contiguous in its last dimension, got strides ", tensor.strides());
}

// q (B, H, Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) with H a multiple of H_kv;
// mask None or (B, H, Lq, Lk) bool or float (any strides).
inline void check_attention_args(
    const char* op, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
    const std::optional<at::Tensor>& mask) {
  TORCH_CHECK(
      is_kernel_dtype(q.scalar_type()), op, ": q must be float32, float16 or bfloat16, got ", q.scalar_type());
  check_attention_tensor(op, "q", q, q);
  check_attention_tensor(op, "k", k, q);
  check_attention_tensor(op, "v", v, q);
  TORCH_CHECK(
      k.size(0) == q.size(0) && k.size(3) == q.size(3), op, ": k must have shape (", q.size(0), ", H_kv, Lk, ",
      q.size(3), ") to match q ", q.sizes(), ", got ", k.sizes());
  TORCH_CHECK(
      v.size(0) == k.size(0) && v.size(1) == k.size(1) && v.size(2) == k.size(2), op, ": v must have shape (",
      k.size(0), ", ", k.size(1), ", ", k.size(2), ", Dv) to match k, got ", v.sizes());
  TORCH_CHECK(
      k.size(1) > 0 && q.size(1) % k.size(1) == 0, op, ": the query heads (", q.size(1),
      ") must be a multiple of the key/value heads (", k.size(1), ")");
  if (mask.has_value()) {
    const auto dtype = mask->scalar_type();
    TORCH_CHECK(
        dtype == at::kBool || is_kernel_dtype(dtype), op, ": mask must be bool, float32, float16 or bfloat16, got ",
        dtype);
    TORCH_CHECK(
        mask->sizes() == at::IntArrayRef({q.size(0), q.size(1), q.size(2), k.size(2)}), op,
        ": mask must have shape (B, H, Lq, Lk) = (", q.size(0), ", ", q.size(1), ", ", q.size(2), ", ", k.size(2),
        "), got ", mask->sizes());
    TORCH_CHECK(mask->device() == q.device(), op, ": mask must be on ", q.device(), ", got ", mask->device());
  }
}

// relative_bias None or (H | 1, Lq + Lk - 1) float, q's device, any strides.
inline void check_relative_bias(
    const char* op, const at::Tensor& q, const at::Tensor& k, const std::optional<at::Tensor>& relative_bias) {
  if (!relative_bias.has_value()) {
    return;
  }
  const at::Tensor& bias = *relative_bias;
  const int64_t distances = q.size(2) + k.size(2) - 1;
  TORCH_CHECK(
      bias.dim() == 2 && (bias.size(0) == 1 || bias.size(0) == q.size(1)) && bias.size(1) == distances, op,
      ": relative_bias must have shape (H | 1, Lq + Lk - 1) = (", q.size(1), " | 1, ", distances, "), got ",
      bias.sizes());
  TORCH_CHECK(
      is_kernel_dtype(bias.scalar_type()) && bias.device() == q.device(), op,
      ": relative_bias must be float32, float16 or bfloat16 on ", q.device(), ", got ", bias.scalar_type(), " on ",
      bias.device());
}

// grad_out and out (B, H, Lq, Dv) like q's dtype; lse (B, H, Lq) float32, contiguous.
inline void check_attention_bwd_args(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const char* op = "attention_bwd") {
  const std::array<int64_t, 4> out_shape_values{q.size(0), q.size(1), q.size(2), v.size(3)};
  const at::IntArrayRef out_shape(out_shape_values);
  check_attention_tensor(op, "grad_out", grad_out, q);
  check_attention_tensor(op, "out", out, q);
  TORCH_CHECK(
      grad_out.sizes() == out_shape && out.sizes() == out_shape, op, ": grad_out and out must have shape ",
      out_shape, ", got ", grad_out.sizes(), " and ", out.sizes());
  TORCH_CHECK(
      lse.scalar_type() == at::kFloat && lse.is_contiguous() && lse.device() == q.device() &&
          lse.sizes() == out_shape.slice(0, 3),
      op, ": lse must be a contiguous float32 tensor of shape ", out_shape.slice(0, 3), " on ", q.device(), ", got ",
      lse.scalar_type(), " ", lse.sizes());
}

// q (B, H, Lq, D); caches (B, H_kv, L_max, D | Dv); cache_seqlens (B,) int32/int64;
// k_new, v_new (B, H_kv, L_new, D | Dv) or both absent.
inline void check_kv_cache_args(
    const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin) {
  const char* op = "attention_with_kv_cache_fwd";
  check_attention_args(op, q, k_cache, v_cache, std::nullopt);
  TORCH_CHECK(
      (cache_seqlens.scalar_type() == at::kInt || cache_seqlens.scalar_type() == at::kLong) &&
          cache_seqlens.dim() == 1 && cache_seqlens.size(0) == q.size(0) && cache_seqlens.device() == q.device(),
      op, ": cache_seqlens must be int32 or int64 of shape (", q.size(0), ",) on ", q.device(), ", got ",
      cache_seqlens.scalar_type(), " ", cache_seqlens.sizes());
  TORCH_CHECK(k_new.has_value() == v_new.has_value(), op, ": k_new and v_new must be given together, or neither");
  if (k_new.has_value()) {
    check_attention_tensor(op, "k_new", *k_new, q);
    check_attention_tensor(op, "v_new", *v_new, q);
    const int64_t new_len = k_new->size(2);
    TORCH_CHECK(
        k_new->sizes() == at::IntArrayRef({k_cache.size(0), k_cache.size(1), new_len, k_cache.size(3)}) &&
            v_new->sizes() == at::IntArrayRef({v_cache.size(0), v_cache.size(1), new_len, v_cache.size(3)}),
        op, ": k_new and v_new must have shapes (B, H_kv, L_new, D) and (B, H_kv, L_new, Dv) like the caches, got ",
        k_new->sizes(), " and ", v_new->sizes());
  }
  TORCH_CHECK(
      rotary_cos.has_value() == rotary_sin.has_value(), op,
      ": rotary_cos and rotary_sin must be given together, or neither");
  if (rotary_cos.has_value()) {
    check_rotary_caches(q, *rotary_cos, *rotary_sin, op, "rotary_cos and rotary_sin");
  }
}

}  // namespace lmkern
