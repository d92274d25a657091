// lmkern::attention_with_kv_cache_fwd on CPU: writes the new keys and values into the
// caches, then runs the flash attention forward (attention_kernel.h) over each sequence's
// keys, bottom-right aligned. With rotary caches the new keys are rotated straight into the
// cache as they are written, and the queries into a scratch copy (q is not modified), by
// apply_rotary's CPU kernel.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>
#include <utility>

#include "../apply_rotary.h"
#include "../attention.h"
#include "attention_kernel.h"

namespace lmkern {
namespace {

// cache[b, :, lengths[b] + n] = rows[b, :, n] for rows (B, H, L_new, D) into cache (B, H,
// capacity, D), both contiguous in D and of one dtype: one parallel pass of row copies,
// where ATen slices per sequence cost more than the copies at decoding's one token each.
void write_rows(at::Tensor& cache, const at::Tensor& rows, const int64_t* length_of) {
  const int64_t heads = rows.size(1);
  const int64_t new_len = rows.size(2);
  const int64_t row_bytes = rows.size(3) * rows.element_size();
  const int64_t element = rows.element_size();
  char* dst = static_cast<char*>(cache.data_ptr());
  const char* src = static_cast<const char*>(rows.const_data_ptr());
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, new_len * row_bytes));
  at::parallel_for(0, rows.size(0) * heads, grain, [&](int64_t begin, int64_t end) {
    for (int64_t bh = begin; bh < end; ++bh) {
      const int64_t b = bh / heads;
      const int64_t h = bh % heads;
      for (int64_t n = 0; n < new_len; ++n) {
        const int64_t to = b * cache.stride(0) + h * cache.stride(1) + (length_of[b] + n) * cache.stride(2);
        const int64_t from = b * rows.stride(0) + h * rows.stride(1) + n * rows.stride(2);
        std::memcpy(dst + to * element, src + from * element, row_bytes);
      }
    }
  });
}

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
    if (rotary) {  // the cache holds rotated keys: rotated at their positions, then written
      const at::Tensor positions = at::arange(new_len, lengths.options()) + lengths.unsqueeze(1);  // (B, L_new)
      const at::Tensor rotated = at::empty(k_new->sizes(), k_new->options());
      apply_rotary_cpu(*k_new, *rotary_cos, *rotary_sin, positions, rotary_interleaved, /*conjugate=*/false, rotated);
      write_rows(k_cache, rotated, length_of);
    } else {
      write_rows(k_cache, *k_new, length_of);
    }
    write_rows(v_cache, *v_new, length_of);
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
