// Argument checks and the op forms of lmkern::linear_gelu_fwd / linear_gelu_bwd[_], shared by
// the CPU and CUDA registrations. The matmul is ATen's (a BLAS on CPU, cuBLAS on CUDA);
// each device supplies the epilogue kernel after it and the epilogue's backward.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <string_view>
#include <tuple>

#include "activation.h"
#include "dropout.h"
#include "layer_norm.h"

namespace lmkern {

inline Activation parse_activation(std::string_view name, const char* op) {
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(name == "none", op, ": activation must be 'gelu', 'gelu_tanh' or 'none', got '", name, "'");
  return Activation::kNone;
}

// A device's forward epilogue on acc = x @ weight.T (N, F), contiguous: pre = acc + bias
// (written over acc when pre is defined, which is then acc itself), and
// out = residual + dropout(act(pre)). out may be acc itself (in place). Called with
// acc non-empty.
using EpilogueFwdInto = void (*)(
    const at::Tensor& acc,
    const std::optional<at::Tensor>& bias,
    Activation activation,
    const Dropout& dropout,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& pre,
    const at::Tensor& out);

// Returns (out, pre); pre has no elements unless kept (keep_preactivation and an
// activation other than "none").
template <EpilogueFwdInto into>
std::tuple<at::Tensor, at::Tensor> linear_gelu_fwd(
    const at::Tensor& x,
    const at::Tensor& weight,
    const std::optional<at::Tensor>& bias,
    c10::string_view activation_name,  // the schema's str
    bool keep_preactivation,
    double dropout_p,
    int64_t seed,
    const std::optional<at::Tensor>& residual) {
  constexpr const char* op = "linear_gelu_fwd";
  check_float_rows(x, op, "x");
  TORCH_CHECK(
      weight.dim() == 2 && weight.size(1) == x.size(1) && weight.scalar_type() == x.scalar_type() &&
          weight.device() == x.device(),
      op, ": weight must be ", x.scalar_type(), " of shape (F, ", x.size(1), ") on ", x.device(), ", got ",
      weight.scalar_type(), " ", weight.sizes(), " on ", weight.device());
  check_column_params(bias, x, weight.size(0), op, "bias");
  const Activation activation = parse_activation(std::string_view(activation_name.data(), activation_name.size()), op);
  check_dropout(dropout_p, op);
  at::Tensor acc = at::mm(x, weight.t());  // (N, F), contiguous
  if (residual.has_value()) {
    check_rows(*residual, acc, op, "residual");
  }
  const bool keep = keep_preactivation && activation != Activation::kNone;
  at::Tensor out = keep ? at::empty_like(acc) : acc;
  if (acc.numel() > 0) {
    into(acc, bias, activation, make_dropout(dropout_p, seed), residual, keep ? acc : at::Tensor(), out);
  }
  return {out, keep ? acc : at::empty({0}, x.options())};
}

// A device's epilogue backward: grad_pre = act'(pre) * dropout(grad_out), its column sums
// into grad_bias (float32, deterministic), and act(pre) into act when that is defined.
// pre is undefined for activation "none"; grad_pre may be grad_out itself (each element
// is read before it is written). May be called with zero rows.
using EpilogueBwdInto = void (*)(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& pre,
    Activation activation,
    const Dropout& dropout,
    const at::Tensor& grad_pre,
    const at::Tensor& grad_bias,
    const at::Tensor& act);

inline void check_linear_gelu_bwd_args(
    const at::Tensor& grad_out, const std::optional<at::Tensor>& pre, Activation activation, double dropout_p) {
  constexpr const char* op = "linear_gelu_bwd";
  check_float_rows(grad_out, op, "grad_out");
  TORCH_CHECK(
      pre.has_value() == (activation != Activation::kNone), op,
      ": preactivation must be given exactly when there is an activation");
  if (pre.has_value()) {
    check_rows(*pre, grad_out, op, "preactivation");
  }
  check_dropout(dropout_p, op);
}

// Returns (grad_pre, grad_bias, act); act has no elements unless want_activation (with an
// activation other than "none").
template <EpilogueBwdInto into>
std::tuple<at::Tensor, at::Tensor, at::Tensor> linear_gelu_bwd(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& pre,
    c10::string_view activation_name,  // the schema's str
    double dropout_p,
    int64_t seed,
    bool want_activation) {
  const Activation activation =
      parse_activation(std::string_view(activation_name.data(), activation_name.size()), "linear_gelu_bwd");
  check_linear_gelu_bwd_args(grad_out, pre, activation, dropout_p);
  const bool want = want_activation && activation != Activation::kNone;
  at::Tensor grad_pre = at::empty(grad_out.sizes(), grad_out.options());
  at::Tensor grad_bias = at::empty({grad_out.size(1)}, grad_out.options().dtype(at::kFloat));
  at::Tensor act = want ? at::empty(grad_out.sizes(), grad_out.options()) : at::empty({0}, grad_out.options());
  into(grad_out, pre, activation, make_dropout(dropout_p, seed), grad_pre, grad_bias, want ? act : at::Tensor());
  return {grad_pre, grad_bias, act};
}

// The same, writing grad_pre over grad_out (contiguous); returns (grad_bias, act).
template <EpilogueBwdInto into>
std::tuple<at::Tensor, at::Tensor> linear_gelu_bwd_(
    at::Tensor& grad_out,
    const std::optional<at::Tensor>& pre,
    c10::string_view activation_name,  // the schema's str
    double dropout_p,
    int64_t seed,
    bool want_activation) {
  const Activation activation =
      parse_activation(std::string_view(activation_name.data(), activation_name.size()), "linear_gelu_bwd_");
  check_linear_gelu_bwd_args(grad_out, pre, activation, dropout_p);
  TORCH_CHECK(grad_out.is_contiguous(), "linear_gelu_bwd_: grad_out must be contiguous to be overwritten");
  const bool want = want_activation && activation != Activation::kNone;
  at::Tensor grad_bias = at::empty({grad_out.size(1)}, grad_out.options().dtype(at::kFloat));
  at::Tensor act = want ? at::empty(grad_out.sizes(), grad_out.options()) : at::empty({0}, grad_out.options());
  into(grad_out, pre, activation, make_dropout(dropout_p, seed), grad_out, grad_bias, want ? act : at::Tensor());
  return {grad_bias, act};
}

}  // namespace lmkern
