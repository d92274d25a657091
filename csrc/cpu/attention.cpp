// lmkern::attention_fwd and lmkern::attention_bwd on CPU: argument checks and outputs
// around the flash attention kernel (attention_kernel.h, which says how it works).
#include <torch/library.h>

#include "../attention.h"
#include "attention_kernel.h"

namespace lmkern {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed, int64_t window_left) {
  check_attention_args("attention_fwd", q, k, v, mask);
  const AttentionProblem p =
      make_attention_problem(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_kernels().forward(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, int64_t causal_shift, double scale,
    double dropout_p, int64_t seed, int64_t window_left) {
  check_attention_args("attention_bwd", q, k, v, mask);
  check_attention_bwd_args(grad_out, q, v, out, lse);
  const AttentionProblem p =
      make_attention_problem(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  attention_kernels().backward(p, grad_out, q, k, v, out, lse, dq, dk, dv);
  return {dq, dk, dv};
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
}

}  // namespace lmkern
