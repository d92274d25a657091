// Argument checks and the op forms of lmkern::swiglu_fwd / swiglu_bwd_, shared by the CPU
// and CUDA registrations. The gate and up matmuls are ATen's (a BLAS on CPU, cuBLAS on
// CUDA), each writing its half of one (2, N, F) buffer; each device supplies the gated
// epilogue h = act(gate) * up after them and its backward.
#pragma once

#include <ATen/ATen.h>

#include <string_view>
#include <tuple>

#include "activation.h"
#include "layer_norm.h"

namespace lmkern {

inline Activation parse_gated_activation(c10::string_view name_view, const char* op) {
  const std::string_view name(name_view.data(), name_view.size());
  if (name == "gelu") return Activation::kGelu;
  if (name == "gelu_tanh") return Activation::kGeluTanh;
  TORCH_CHECK(name == "silu", op, ": activation must be 'silu', 'gelu' or 'gelu_tanh', got '", name, "'");
  return Activation::kSilu;
}

// A device's forward epilogue h = act(gate) * up on (R, F) rows, last dims contiguous
// (gate and up any row strides; h contiguous). Called with R and F non-zero.
using GatedFwdInto = void (*)(const at::Tensor& gate, const at::Tensor& up, Activation activation, const at::Tensor& h);

// A device's backward of it, in place: grad_gate holds d(h) and receives d(gate) =
// d(h) up act'(gate); grad_up receives d(up) = d(h) act(gate); h receives act(gate) * up
// when it is defined. Rows any stride, last dims contiguous. Called with R and F non-zero.
using GatedBwdInto = void (*)(
    const at::Tensor& grad_gate,
    const at::Tensor& grad_up,
    const at::Tensor& gate,
    const at::Tensor& up,
    Activation activation,
    const at::Tensor& h);

// Returns (h (N, F), gate_up (2, N, F)).
template <GatedFwdInto into>
std::tuple<at::Tensor, at::Tensor> swiglu_fwd(
    const at::Tensor& x, const at::Tensor& w_gate, const at::Tensor& w_up, c10::string_view activation_name) {
  constexpr const char* op = "swiglu_fwd";
  check_float_rows(x, op, "x");
  const Activation activation = parse_gated_activation(activation_name, op);
  for (const auto& [weight, name] : {std::pair{&w_gate, "w_gate"}, std::pair{&w_up, "w_up"}}) {
    TORCH_CHECK(
        weight->dim() == 2 && weight->size(1) == x.size(1) && weight->size(0) == w_gate.size(0) &&
            weight->scalar_type() == x.scalar_type() && weight->device() == x.device(),
        op, ": ", name, " must be ", x.scalar_type(), " of shape (", w_gate.size(0), ", ", x.size(1), ") on ",
        x.device(), ", got ", weight->scalar_type(), " ", weight->sizes(), " on ", weight->device());
  }
  at::Tensor gate_up = at::empty({2, x.size(0), w_gate.size(0)}, x.options());
  at::Tensor gate = gate_up.select(0, 0);
  at::Tensor up = gate_up.select(0, 1);
  at::mm_out(gate, x, w_gate.t());
  at::mm_out(up, x, w_up.t());
  at::Tensor h = at::empty({x.size(0), w_gate.size(0)}, x.options());
  if (h.numel() > 0) {
    into(gate, up, activation, h);
  }
  return {h, gate_up};
}

// Returns h (R, F) if want_activation, else an empty tensor.
template <GatedBwdInto into>
at::Tensor swiglu_bwd_(
    at::Tensor& grad_gate,
    at::Tensor& grad_up,
    const at::Tensor& gate,
    const at::Tensor& up,
    c10::string_view activation_name,
    bool want_activation) {
  constexpr const char* op = "swiglu_bwd_";
  check_float_rows(grad_gate, op, "grad_gate");
  check_rows(grad_up, grad_gate, op, "grad_up");
  check_rows(gate, grad_gate, op, "gate");
  check_rows(up, grad_gate, op, "up");
  const Activation activation = parse_gated_activation(activation_name, op);
  at::Tensor h = want_activation ? at::empty(grad_gate.sizes(), grad_gate.options()) : at::empty({0}, grad_gate.options());
  if (grad_gate.numel() > 0) {
    into(grad_gate, grad_up, gate, up, activation, want_activation ? h : at::Tensor());
  }
  return h;
}

}  // namespace lmkern
