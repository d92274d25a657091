// lmkern::attention_with_kv_cache_fwd on CPU: writes the new keys and values into the
// caches, then runs the flash attention forward (attention_kernel.h) over each sequence's
// keys, bottom-right aligned.
#include <torch/library.h>

#include <utility>

#include "../attention.h"
#include "attention_kernel.h"

namespace lmkern {
namespace {

at::Tensor attention_with_kv_cache_fwd_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale,
    int64_t window_left) {
  check_kv_cache_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new);
  const int64_t capacity = k_cache.size(2);
  const int64_t new_len = k_new.has_value() ? k_new->size(2) : 0;
  const at::Tensor lengths = cache_seqlens.to(at::kLong).contiguous();
  AttentionProblem p = make_attention_problem(
      q, k_cache, v_cache, std::nullopt, /*is_causal=*/true, /*causal_shift=*/0, scale, 0.0, 0, window_left);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = lengths.const_data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(
        length >= 0 && length + new_len <= capacity, "cache_seqlens[", b, "] = ", length, ": with ", new_len,
        " new keys the sequence must fit in the cache's ", capacity, " positions, and its length must be >= 0");
    p.kv_len[b] = length + new_len;
    p.shift[b] = p.kv_len[b] - p.seqlen_q;  // bottom-right alignment: the last query sees the last key
  }
  if (new_len > 0) {
    for (auto [cache, update] : {std::pair{k_cache, *k_new}, std::pair{v_cache, *v_new}}) {
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t length = lengths.const_data_ptr<int64_t>()[b];
        cache[b].narrow(1, length, new_len).copy_(update[b]);
      }
    }
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_kernels().forward(p, q, k_cache, v_cache, out, lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_with_kv_cache_fwd", &attention_with_kv_cache_fwd_cpu);
}

}  // namespace lmkern
