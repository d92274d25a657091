// lmkern::attention_with_kv_cache_fwd on CPU: writes the new keys and values into the
// caches, then runs the flash attention forward (attention_kernel.h) over each sequence's
// keys, bottom-right aligned. With rotary caches the new keys are rotated straight into the
// cache as they are written, and the queries into a scratch copy (q is not modified), by
// apply_rotary's CPU kernel.
#include <torch/library.h>

#include <optional>
#include <utility>

#include "../apply_rotary.h"
#include "../attention.h"
#include "attention_kernel.h"

namespace lmkern {
namespace {

at::Tensor attention_with_kv_cache_fwd_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    const std::optional<at::Tensor>& rotary_cos, const std::optional<at::Tensor>& rotary_sin,
    bool rotary_interleaved, int64_t window_left) {
  check_kv_cache_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new, rotary_cos, rotary_sin);
  const int64_t capacity = k_cache.size(2);
  const int64_t new_len = k_new.has_value() ? k_new->size(2) : 0;
  const bool rotary = rotary_cos.has_value();
  const at::Tensor lengths = cache_seqlens.to(at::kLong).contiguous();
  const int64_t* length_of = lengths.const_data_ptr<int64_t>();
  AttentionProblem p = make_attention_problem(
      q, k_cache, v_cache, std::nullopt, /*is_causal=*/true, /*causal_shift=*/0, scale, 0.0, 0, window_left);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = length_of[b];
    TORCH_CHECK_VALUE(
        length >= 0 && length + new_len <= capacity, "cache_seqlens[", b, "] = ", length, ": with ", new_len,
        " new keys the sequence must fit in the cache's ", capacity, " positions, and its length must be >= 0");
    TORCH_CHECK_VALUE(
        !rotary || length + new_len <= rotary_cos->size(0), "cache_seqlens[", b, "] = ", length, ": with ", new_len,
        " new keys the sequence reaches position ", length + new_len - 1, ", past the ", rotary_cos->size(0),
        " positions rotary_cos and rotary_sin hold");
    p.kv_len[b] = length + new_len;
    p.shift[b] = p.kv_len[b] - p.seqlen_q;  // bottom-right alignment: the last query sees the last key
  }
  if (new_len > 0) {
    const at::Tensor new_positions = at::arange(new_len, lengths.options());
    for (int64_t b = 0; b < p.batch; ++b) {
      const int64_t length = length_of[b];
      at::Tensor k_slot = k_cache.narrow(0, b, 1).narrow(2, length, new_len);
      if (rotary) {  // the cache holds rotated keys
        apply_rotary_cpu(
            k_new->narrow(0, b, 1), *rotary_cos, *rotary_sin, (new_positions + length).unsqueeze(0),
            rotary_interleaved, /*conjugate=*/false, k_slot);
      } else {
        k_slot.copy_(k_new->narrow(0, b, 1));
      }
      v_cache.narrow(0, b, 1).narrow(2, length, new_len).copy_(v_new->narrow(0, b, 1));
    }
  }
  at::Tensor query = q;
  if (rotary) {  // into scratch: query i at position length + L_new - Lq + i, 0 before the cache (it sees nothing)
    const at::Tensor positions =
        (at::arange(q.size(2), lengths.options()) + (lengths + (new_len - q.size(2))).unsqueeze(1)).clamp_min(0);
    query = at::empty(q.sizes(), q.options());
    apply_rotary_cpu(q, *rotary_cos, *rotary_sin, positions, rotary_interleaved, /*conjugate=*/false, query);
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_kernels().forward(p, query, k_cache, v_cache, out, lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_with_kv_cache_fwd", &attention_with_kv_cache_fwd_cpu);
}

}  // namespace lmkern
