// The gated feed-forward's epilogue on CPU, after ATen's matmuls gate = x @ w_gate.T and
// up = x @ w_up.T:  h = act(gate) * up,  and its backward, in place:
//   d(gate) = d(h) up act'(gate),  d(up) = d(h) act(gate),  h recomputed for d(w_down).
// Rows run in parallel through fp32 buffers; the activations are activations.h's, whose
// branch-free arithmetic lets the loops vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../swiglu.h"
#include "activations.h"
#include "rows.h"

namespace lmkern {
namespace {

// gate <- act(gate) * up.
template <Activation kAct>
LMKERN_CPU_CLONES void gate_row(float* gate, const float* up, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    gate[i] = act_and_slope<kAct>(gate[i], nullptr) * up[i];
  }
}

// grad <- d(gate) = grad up act'(gate), up <- d(up) = grad act(gate), gate <- act(gate) * up.
template <Activation kAct>
LMKERN_CPU_CLONES void gate_backward_row(float* gate, float* up, float* grad, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float slope;
    const float act = act_and_slope<kAct>(gate[i], &slope);
    const float u = up[i];
    const float grad_h = grad[i];
    grad[i] = grad_h * u * slope;
    up[i] = grad_h * act;
    gate[i] = act * u;
  }
}

// Grain of parallel_for over rows of n_cols elements.
int64_t row_grain(int64_t n_cols) {
  return std::max<int64_t>(1, at::internal::GRAIN_SIZE / n_cols);
}

void gated_fwd_cpu(const at::Tensor& gate, const at::Tensor& up, Activation activation, const at::Tensor& h) {
  const int64_t n_cols = gate.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_fwd_cpu", [&] {
    const scalar_t* gate_ptr = gate.const_data_ptr<scalar_t>();
    const scalar_t* up_ptr = up.const_data_ptr<scalar_t>();
    scalar_t* h_ptr = h.data_ptr<scalar_t>();
    with_activation(activation, [&](auto act) {
      at::parallel_for(0, gate.size(0), row_grain(n_cols), [&](int64_t begin, int64_t end) {
        std::vector<float> buffers(2 * n_cols);
        float* g = buffers.data();
        float* u = g + n_cols;
        for (int64_t row = begin; row < end; ++row) {
          load_row(gate_ptr + row * gate.stride(0), n_cols, g);
          load_row(up_ptr + row * up.stride(0), n_cols, u);
          gate_row<decltype(act)::value>(g, u, n_cols);
          store_row(g, n_cols, h_ptr + row * n_cols);
        }
      });
    });
  });
}

void gated_bwd_cpu(
    const at::Tensor& grad_gate,
    const at::Tensor& grad_up,
    const at::Tensor& gate,
    const at::Tensor& up,
    Activation activation,
    const at::Tensor& h) {
  const int64_t n_cols = gate.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, gate.scalar_type(), "swiglu_bwd_cpu", [&] {
    scalar_t* grad_gate_ptr = grad_gate.data_ptr<scalar_t>();
    scalar_t* grad_up_ptr = grad_up.data_ptr<scalar_t>();
    const scalar_t* gate_ptr = gate.const_data_ptr<scalar_t>();
    const scalar_t* up_ptr = up.const_data_ptr<scalar_t>();
    scalar_t* h_ptr = h.defined() ? h.data_ptr<scalar_t>() : nullptr;
    with_activation(activation, [&](auto act) {
      at::parallel_for(0, gate.size(0), row_grain(n_cols), [&](int64_t begin, int64_t end) {
        std::vector<float> buffers(3 * n_cols);
        float* g = buffers.data();
        float* u = g + n_cols;
        float* grad = u + n_cols;
        for (int64_t row = begin; row < end; ++row) {
          scalar_t* grad_gate_row = grad_gate_ptr + row * grad_gate.stride(0);
          load_row(grad_gate_row, n_cols, grad);
          load_row(gate_ptr + row * gate.stride(0), n_cols, g);
          load_row(up_ptr + row * up.stride(0), n_cols, u);
          gate_backward_row<decltype(act)::value>(g, u, grad, n_cols);
          store_row(grad, n_cols, grad_gate_row);
          store_row(u, n_cols, grad_up_ptr + row * grad_up.stride(0));
          if (h_ptr) {
            store_row(g, n_cols, h_ptr + row * n_cols);
          }
        }
      });
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("swiglu_fwd", &swiglu_fwd<gated_fwd_cpu>);
  m.impl("swiglu_bwd_", &swiglu_bwd_<gated_bwd_cpu>);
}

}  // namespace lmkern
