// The epilogue of lmkern's linear layer on CPU, after ATen's matmul acc = x @ weight.T:
//   pre = acc + bias,  out = residual + dropout(act(pre))
// and its backward: d(pre) = act'(pre) dropout(d(out)), d(bias) = sum_rows d(pre). Rows run
// in parallel through an fp32 buffer; GELU (exact or tanh) is activations.h's, whose
// branch-free arithmetic lets the loops vectorise.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <vector>

#include "../linear_gelu.h"
#include "activations.h"
#include "rows.h"
#include "vectorize.h"

namespace lmkern {
namespace {

template <Activation kAct>
LMKERN_CPU_CLONES void activate_row(float* v, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    v[i] = act_and_slope<kAct>(v[i], nullptr);
  }
}

template <Activation kAct>
LMKERN_CPU_CLONES void activation_backward_row(float* v, float* grad, int64_t n) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    float slope;
    v[i] = act_and_slope<kAct>(v[i], &slope);
    grad[i] *= slope;
  }
}

// v <- act(v).
void activate(float* v, int64_t n, Activation activation) {
  if (activation != Activation::kNone) {
    with_activation(activation, [&](auto act) { activate_row<decltype(act)::value>(v, n); });
  }
}

// grad <- act'(v) grad and v <- act(v), for an activation other than "none".
void activation_backward(float* v, float* grad, int64_t n, Activation activation) {
  with_activation(activation, [&](auto act) { activation_backward_row<decltype(act)::value>(v, grad, n); });
}

void epilogue_fwd_cpu(
    const at::Tensor& acc,
    const std::optional<at::Tensor>& bias,
    Activation activation,
    const Dropout& dropout,
    const std::optional<at::Tensor>& residual,
    const at::Tensor& pre,
    const at::Tensor& out) {
  const int64_t n_rows = acc.size(0);
  const int64_t n_cols = acc.size(1);
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / n_cols);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, acc.scalar_type(), "linear_gelu_fwd_cpu", [&] {
    // acc may be pre or out itself: each element is read before it is written.
    const scalar_t* acc_ptr = acc.const_data_ptr<scalar_t>();
    scalar_t* pre_ptr = pre.defined() ? pre.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    const scalar_t* residual_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const int64_t residual_stride = residual.has_value() ? residual->stride(0) : 0;
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(n_cols);
      float* v = buffer.data();
      for (int64_t row = begin; row < end; ++row) {
        load_row(acc_ptr + row * n_cols, n_cols, v);
        if (b) {
          add_row(b, n_cols, v);
        }
        if (pre_ptr) {
          store_row(v, n_cols, pre_ptr + row * n_cols);
        }
        activate(v, n_cols, activation);
        if (dropout.p > 0.0f) {
          dropout_row(v, n_cols, dropout, row * n_cols);
        }
        if (residual_ptr) {
          add_row(residual_ptr + row * residual_stride, n_cols, v);
        }
        store_row(v, n_cols, out_ptr + row * n_cols);
      }
    });
  });
}

void epilogue_bwd_cpu(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& pre,
    Activation activation,
    const Dropout& dropout,
    const at::Tensor& grad_pre,
    const at::Tensor& grad_bias,
    const at::Tensor& act) {
  const int64_t n_rows = grad_out.size(0);
  const int64_t n_cols = grad_out.size(1);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad_out.scalar_type(), "linear_gelu_bwd_cpu", [&] {
    const scalar_t* grad_out_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* pre_ptr = pre.has_value() ? pre->const_data_ptr<scalar_t>() : nullptr;
    const int64_t pre_stride = pre.has_value() ? pre->stride(0) : 0;
    scalar_t* grad_pre_ptr = grad_pre.data_ptr<scalar_t>();
    scalar_t* act_ptr = act.defined() ? act.data_ptr<scalar_t>() : nullptr;
    column_sums_over_rows(n_rows, n_cols, 1, grad_bias.data_ptr<float>(), [&](int64_t begin, int64_t end, float* sums) {
      std::vector<float> buffers(2 * n_cols);
      float* grad = buffers.data();
      float* v = grad + n_cols;
      for (int64_t row = begin; row < end; ++row) {
        load_row(grad_out_ptr + row * grad_out.stride(0), n_cols, grad);
        if (dropout.p > 0.0f) {
          dropout_row(grad, n_cols, dropout, row * n_cols);
        }
        if (pre_ptr) {
          load_row(pre_ptr + row * pre_stride, n_cols, v);
          activation_backward(v, grad, n_cols, activation);
          if (act_ptr) {
            store_row(v, n_cols, act_ptr + row * n_cols);
          }
        }
        store_row(grad, n_cols, grad_pre_ptr + row * n_cols);
        add_to_sums(grad, n_cols, sums);
      }
    });
  });
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("linear_gelu_fwd", &linear_gelu_fwd<epilogue_fwd_cpu>);
  m.impl("linear_gelu_bwd", &linear_gelu_bwd<epilogue_bwd_cpu>);
  m.impl("linear_gelu_bwd_", &linear_gelu_bwd_<epilogue_bwd_cpu>);
}

}  // namespace lmkern
