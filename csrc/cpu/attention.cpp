// lmkern::attention_fwd, attention_bwd, attention_mask_bwd and attention_relative_bias_bwd on CPU: argument checks and outputs
// around the flash attention kernel (attention_kernel.h, which says how it works).
#include <torch/library.h>

#include <array>

#include "../attention.h"
#include "attention_kernel.h"

namespace lmkern {
namespace {

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed, int64_t window_left,
    const std::optional<at::Tensor>& relative_bias) {
  check_attention_args("attention_fwd", q, k, v, mask);
  check_relative_bias("attention_fwd", q, k, relative_bias);
  const AttentionProblem p = make_attention_problem(
      q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_kernels().forward(p, q, k, v, out, lse);
  return {out, lse};
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, int64_t causal_shift, double scale,
    double dropout_p, int64_t seed, int64_t window_left, const std::optional<at::Tensor>& relative_bias) {
  check_attention_args("attention_bwd", q, k, v, mask);
  check_relative_bias("attention_bwd", q, k, relative_bias);
  check_attention_bwd_args(grad_out, q, v, out, lse);
  const AttentionProblem p = make_attention_problem(
      q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias);
  at::Tensor dq = at::empty(q.sizes(), q.options());
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  attention_kernels().backward(p, grad_out, q, k, v, out, lse, dq, dk, dv);
  return {dq, dk, dv};
}

at::Tensor attention_mask_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const at::Tensor& mask, bool is_causal, int64_t causal_shift, double scale,
    double dropout_p, int64_t seed, int64_t window_left, const std::optional<at::Tensor>& relative_bias) {
  const char* op = "attention_mask_bwd";
  const std::array<int64_t, 4> scores{q.size(0), q.size(1), q.size(2), k.size(2)};
  TORCH_CHECK(
      mask.dim() == 4 && mask.is_floating_point(), op,
      ": mask must be a 4-D float tensor (B | 1, H | 1, Lq | 1, Lk | 1), got ", mask.scalar_type(), " of shape ",
      mask.sizes());
  for (int d = 0; d < 4; ++d) {
    TORCH_CHECK(
        mask.size(d) == 1 || mask.size(d) == scores[d], op, ": mask must broadcast to (B, H, Lq, Lk) = ",
        at::IntArrayRef(scores), " (each dimension equal or 1), got ", mask.sizes());
  }
  const at::Tensor broadcast = mask.expand(scores);
  check_attention_args(op, q, k, v, broadcast);
  check_relative_bias(op, q, k, relative_bias);
  check_attention_bwd_args(grad_out, q, v, out, lse, op);
  const AttentionProblem p = make_attention_problem(
      q, k, v, broadcast, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias);
  // The kernel sums in fp32; a half-precision mask gets its gradient rounded once, at the end.
  at::Tensor dmask = at::empty(mask.sizes(), mask.options().dtype(at::kFloat));
  attention_kernels().mask_backward(p, grad_out, q, k, v, out, lse, dmask);
  return dmask.to(mask.scalar_type());
}

at::Tensor attention_relative_bias_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, const at::Tensor& relative_bias, bool is_causal,
    int64_t causal_shift, double scale, double dropout_p, int64_t seed, int64_t window_left) {
  const char* op = "attention_relative_bias_bwd";
  check_attention_args(op, q, k, v, mask);
  check_relative_bias(op, q, k, relative_bias);
  check_attention_bwd_args(grad_out, q, v, out, lse, op);
  const AttentionProblem p = make_attention_problem(
      q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias);
  // Summed in fp32 (the kernel adds into it); a half-precision bias gets its gradient rounded once, at the end.
  at::Tensor grad = at::zeros(relative_bias.sizes(), relative_bias.options().dtype(at::kFloat));
  attention_kernels().mask_backward(p, grad_out, q, k, v, out, lse, grad);
  return grad.to(relative_bias.scalar_type());
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_mask_bwd", &attention_mask_bwd_cpu);
  m.impl("attention_relative_bias_bwd", &attention_relative_bias_bwd_cpu);
}

}  // namespace lmkern
