// The CPU flash attention kernel's interface, shared by the ops that run it:
// lmkern::attention_fwd / attention_bwd (attention.cpp) and lmkern::attention_with_kv_cache_fwd
// (attention_with_kv_cache.cpp). Argument checks live in ../attention.h; the kernels in
// attention_kernel_body.h, compiled once per instruction set (attention_kernel_<isa>.cpp).
#pragma once

#include <ATen/ATen.h>

#include <algorithm>
#include <cstdint>
#include <optional>
#include <vector>

namespace lmkern {

// What a call attends over, for the forward and the backward alike.
struct AttentionProblem {
  int64_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v;
  float scale;
  bool causal;
  // A sliding window's left bound (-1: none): query i sees keys j >= i + shift - window_left.
  int64_t window_left;
  // Per batch: the keys of the sequence, and the causal shift (query i sees keys j <= i + shift).
  std::vector<int64_t> kv_len, shift;
  // A mask (B, H, Lq, Lk) whose values depend on the key only (a key-padding mask, bool
  // or additive, broadcast over heads and queries) is read once per call into key_bias
  // (B, Lk): 0 or -inf for a boolean one, the value for an additive one. Any other mask
  // is read element by element through `mask` (nullptr: none of that kind); so is a
  // relative bias, as a mask whose query stride is negative (make_attention_problem).
  std::vector<float> key_bias;
  const void* mask;
  at::ScalarType mask_dtype;
  int64_t mask_stride[4];
  float dropout_p, keep_scale;
  uint64_t seed;

  int64_t group() const {
    return heads / kv_heads;
  }
  // Keys [first_visible_key(b, i), visible_keys(b, i)) are the ones query i of sequence b may
  // see (an empty range when the first is not below the second).
  int64_t visible_keys(int64_t b, int64_t i) const {
    return causal ? std::clamp<int64_t>(i + shift[b] + 1, 0, kv_len[b]) : kv_len[b];
  }
  int64_t first_visible_key(int64_t b, int64_t i) const {
    return window_left < 0 ? 0 : std::clamp<int64_t>(i + shift[b] - window_left, 0, kv_len[b]);
  }
  // Queries [0, seeing_queries(b, j)) are the ones of sequence b that may see key j (the
  // window's bound; the causal one is a lower bound on the query).
  int64_t seeing_queries(int64_t b, int64_t j) const {
    return window_left < 0 ? seqlen_q : std::clamp<int64_t>(j - shift[b] + window_left + 1, 0, seqlen_q);
  }
  // Keys [0, seen_keys(b)) are the ones some query of sequence b may see. The kernels read
  // no key past it (they load zeros in its place): a causal call's later keys may hold
  // anything, NaN included, and a zero probability times NaN would still be NaN.
  int64_t seen_keys(int64_t b) const {
    return visible_keys(b, seqlen_q - 1);
  }
  // Sequence b's key bias (Lk values), or nullptr.
  const float* key_bias_row(int64_t b) const {
    return key_bias.empty() ? nullptr : key_bias.data() + b * seqlen_k;
  }
  // The element (b, h, i, j) of an element-wise mask.
  const char* mask_element(int64_t b, int64_t h, int64_t i, int64_t j) const {
    const int64_t offset = b * mask_stride[0] + h * mask_stride[1] + i * mask_stride[2] + j * mask_stride[3];
    return static_cast<const char*>(mask) + offset * c10::elementSize(mask_dtype);
  }
  // The dropout offset of element (b, h, i, j) (see csrc/philox.h).
  uint64_t dropout_offset(int64_t b, int64_t h, int64_t i, int64_t j) const {
    return static_cast<uint64_t>(((b * heads + h) * seqlen_q + i) * seqlen_k + j);
  }
};

// relative_bias: None or (H | 1, Lq + Lk - 1), adding relative_bias[h, j - i + Lq - 1] to the
// score of query i and key j; it takes the element-wise mask's place, so that `mask` must
// then be None or depend on the key only.
AttentionProblem make_attention_problem(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed, int64_t window_left,
    const std::optional<at::Tensor>& relative_bias = std::nullopt);

// The kernels of one instruction set. forward writes out (B, H, Lq, Dv) and lse (B, H, Lq),
// both contiguous; backward writes dq, dk, dv, contiguous and shaped like q, k, v;
// mask_backward writes the gradient of the additive mask, dmask (B | 1, H | 1, Lq | 1,
// Lk | 1), contiguous, summed over the dimensions where it has size 1 (the mask's own
// shape, which the problem's mask broadcasts from); or, given a 2-D dmask (H | 1,
// Lq + Lk - 1), zero-filled, the gradient of the problem's relative bias.
struct AttentionKernels {
  void (*forward)(
      const AttentionProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
      const at::Tensor& out, const at::Tensor& lse);
  void (*backward)(
      const AttentionProblem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq,
      const at::Tensor& dk, const at::Tensor& dv);
  void (*mask_backward)(
      const AttentionProblem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
      const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dmask);
};

// Whether this compiler builds the AVX2 and AVX-512 kernels: they are compiled with GCC's
// target pragma, on x86-64.
#if defined(__x86_64__) && defined(__GNUC__) && !defined(__clang__)
#define LMKERN_ATTENTION_X86_KERNELS
#endif

// One per instruction set (attention_kernel_<isa>.cpp); nullptr where this build has none.
const AttentionKernels* attention_kernels_avx512();
const AttentionKernels* attention_kernels_avx2();
const AttentionKernels* attention_kernels_default();

// The kernels for the instruction set that torch's own CPU kernels use here
// (at::get_cpu_capability(), which ATEN_CPU_CAPABILITY may lower).
const AttentionKernels& attention_kernels();

}  // namespace lmkern
