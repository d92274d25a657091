// The epilogue of lmkern's linear layer on CPU, after ATen's matmul acc = x @ weight.T:
//   pre = acc + bias,  out = residual + dropout(act(pre))
// and its backward: d(pre) = act'(pre) dropout(d(out)), d(bias) = sum_rows d(pre). Rows run
// in parallel through an fp32 buffer; GELU is written in branch-free arithmetic (no libm
// call per element) so that its loops vectorise:
//   exact: gelu(x) = x Phi(x), gelu'(x) = Phi(x) + x phi(x), with Phi(x) = erfc(-x / sqrt 2) / 2
//   tanh:  gelu(x) = x (1 + t) / 2, t = tanh(u), u = sqrt(2/pi) (x + 0.044715 x^3),
//          gelu'(x) = (1 + t) / 2 + x (1 - t^2) sqrt(2/pi) (1 + 3 * 0.044715 x^2) / 2
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../linear_gelu.h"
#include "rows.h"
#include "vectorize.h"

namespace lmkern {
namespace {

// Phi(x), the standard normal CDF, as erfc(z) / 2 for z = -x / sqrt 2, with erfc from
// Numerical Recipes' erfcc (fractional error below 1.2e-7 everywhere, so that the tail
// x << 0 keeps its relative accuracy): erfc(a) = t exp(-a^2 + P(t)), t = 1 / (1 + a / 2)
// for a = |z|, and erfc(z) = 2 - erfc(-z) for z < 0.
// Always inlined: a call in a loop would keep the loop from vectorising.
[[gnu::always_inline]] inline float normal_cdf(float x) {
  const float z = -x * kSqrtHalf;
  const float a = std::fabs(z);
  const float t = 1.0f / (1.0f + 0.5f * a);
  float p = 0.17087277f;  // P(t) by Horner's rule
  p = p * t - 0.82215223f;
  p = p * t + 1.48851587f;
  p = p * t - 1.13520398f;
  p = p * t + 0.27886807f;
  p = p * t - 0.18628806f;
  p = p * t + 0.09678418f;
  p = p * t + 0.37409196f;
  p = p * t + 1.00002368f;
  p = p * t - 1.26551223f;
  // The exponent is <= 0 up to rounding (0 at a = 0); exp_nonpositive is exact there too.
  const float erfc_a = t * exp_nonpositive(p - a * a);
  return 0.5f * (z >= 0.0f ? erfc_a : 2.0f - erfc_a);
}

// tanh(u) for the tanh form as (1 + t) and (1 - t^2), each computed without cancellation
// from e = exp(-2|u|): 1 + t = 2 / (1 + e) for u >= 0 (2e / (1 + e) below), 1 - t^2 = 4e / (1 + e)^2.
[[gnu::always_inline]] inline void tanh_terms(float u, float* one_plus_t, float* one_minus_t_sq) {
  const float e = exp_nonpositive(-2.0f * std::fabs(u));
  const float inv = 1.0f / (1.0f + e);
  *one_plus_t = (u >= 0.0f ? 2.0f : 2.0f * e) * inv;
  *one_minus_t_sq = 4.0f * e * inv * inv;
}

// v <- act(v).
LMKERN_CPU_CLONES void activate(float* v, int64_t n, Activation activation) {
  if (activation == Activation::kGelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      v[i] *= normal_cdf(v[i]);
    }
  } else if (activation == Activation::kGeluTanh) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = v[i];
      float one_plus_t, one_minus_t_sq;
      tanh_terms(kSqrt2OverPi * (x + kTanhCubic * x * x * x), &one_plus_t, &one_minus_t_sq);
      v[i] = 0.5f * x * one_plus_t;
    }
  }
}

// grad <- act'(v) grad and v <- act(v), for activation GELU (exact or tanh).
LMKERN_CPU_CLONES void activation_backward(float* v, float* grad, int64_t n, Activation activation) {
  if (activation == Activation::kGelu) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = v[i];
      const float cdf = normal_cdf(x);
      const float pdf = exp_nonpositive(-0.5f * x * x) * kInvSqrt2Pi;
      grad[i] *= cdf + x * pdf;
      v[i] = x * cdf;
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      const float x = v[i];
      const float x_sq = x * x;
      float one_plus_t, one_minus_t_sq;
      tanh_terms(kSqrt2OverPi * (x + kTanhCubic * x_sq * x), &one_plus_t, &one_minus_t_sq);
      grad[i] *= 0.5f * one_plus_t + 0.5f * x * one_minus_t_sq * kSqrt2OverPi * (1.0f + 3.0f * kTanhCubic * x_sq);
      v[i] = 0.5f * x * one_plus_t;
    }
  }
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
