// Fused softmax cross-entropy on CPU. Rows run in parallel (at::parallel_for): an online
// softmax over chunks of the row gives its log-sum-exp and loss, then a second sweep of
// the same row (now in cache) writes the gradient, and nothing but the per-row loss is
// kept. The inner loops are plain fp32 arithmetic that the compiler vectorises, exp
// included.
//
// For a row x with target t, smoothing e, class weights w (all 1 without weights),
// W = sum_c w_c, lse = logsumexp(x) and z-loss coefficient z:
//   loss     = (1 - e) w_t (lse - x_t) + e/V (W lse - sum_c w_c x_c) + z lse^2
//   dloss/dx_c = softmax(x)_c ((1 - e) w_t + e W/V + 2 z lse) - e/V w_c - [c == t] (1 - e) w_t
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <numeric>

#include "../cross_entropy.h"
#include "rows.h"
#include "vectorize.h"

namespace lmkern {
namespace {

// Elements per online-softmax step: a chunk is converted to fp32 into a buffer on the
// stack and stays in L1 while its max, its exponentials and its sums are taken. Each SIMD
// lane of a chunk's sum adds up at most kChunk / 4 terms; chunks add up in double.
constexpr int64_t kChunk = 512;

struct RowOptions {
  int64_t vocab;
  int64_t ignore_index;
  const float* weight;  // (V,) or nullptr
  float label_smoothing;
  float z_loss;
};

// Raises ValueError for a target outside [0, vocab) that is not ignore_index, before any
// gradient is written (the logits may be overwritten in place).
void check_targets(const int64_t* target, int64_t n_rows, int64_t vocab, int64_t ignore_index) {
  for (int64_t row = 0; row < n_rows; ++row) {
    const int64_t t = target[row];
    TORCH_CHECK_VALUE(
        t == ignore_index || (t >= 0 && t < vocab), "target[", row, "] = ", t, " is outside [0, ", vocab,
        ") and is not ignore_index (", ignore_index, ")");
  }
}

// `omp simd` lets the compiler split each reduction below into SIMD lanes.
LMKERN_CPU_CLONES float max_of(const float* v, int64_t n, float init) {
  float max = init;
#pragma omp simd reduction(max : max)
  for (int64_t i = 0; i < n; ++i) {
    max = v[i] > max ? v[i] : max;  // vectorises where std::max does not; NaN is skipped here and caught by exp
  }
  return max;
}

// sum_i exp(v_i - shift), for shift >= max(v).
LMKERN_CPU_CLONES float sum_exp_of(const float* v, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += exp_nonpositive(v[i] - shift);
  }
  return sum;
}

// sum_i w_i v_i, or sum_i v_i without weights.
LMKERN_CPU_CLONES float dot_of(const float* v, const float* weight, int64_t n) {
  float sum = 0.0f;
  if (weight) {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sum += weight[i] * v[i];
    }
  } else {
#pragma omp simd reduction(+ : sum)
    for (int64_t i = 0; i < n; ++i) {
      sum += v[i];
    }
  }
  return sum;
}

// v_i <- exp(v_i - max) * p_scale - smooth_per_weight * w_i (w_i = 1 without weights).
LMKERN_CPU_CLONES void softmax_grad_of(
    float* v, int64_t n, float max, float p_scale, float smooth_per_weight, const float* weight) {
  if (weight) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      v[i] = exp_nonpositive(v[i] - max) * p_scale - smooth_per_weight * weight[i];
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      v[i] = exp_nonpositive(v[i] - max) * p_scale - smooth_per_weight;
    }
  }
}

// Returns the row's loss and writes its gradient; grad may alias x. target is checked.
template <typename scalar_t>
float cross_entropy_row(const scalar_t* x, scalar_t* grad, int64_t target, const RowOptions& opt) {
  const int64_t vocab = opt.vocab;
  if (target == opt.ignore_index) {
    std::fill(grad, grad + vocab, scalar_t(0));
    return 0.0f;
  }
  const bool smoothing = opt.label_smoothing > 0.0f;
  float buf[kChunk];
  // -FLT_MAX, not -inf, so that a chunk of -inf logits rescales by exp(0) instead of NaN.
  float max = -FLT_MAX;
  // Across chunks the sums are kept in double, which costs nothing here.
  double sum_exp = 0.0;
  double sum_wx = 0.0;  // sum_c w_c x_c, for smoothing
  double sum_w = opt.weight ? 0.0 : static_cast<double>(vocab);
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t n = std::min(kChunk, vocab - begin);
    load_row(x + begin, n, buf);
    const float chunk_max = max_of(buf, n, max);
    sum_exp = sum_exp * exp_nonpositive(max - chunk_max) + sum_exp_of(buf, n, chunk_max);
    max = chunk_max;
    if (smoothing) {
      const float* w = opt.weight ? opt.weight + begin : nullptr;
      sum_wx += dot_of(buf, w, n);
      if (w) {
        sum_w += std::accumulate(w, w + n, 0.0);
      }
    }
  }
  // lse - x_t as (max - x_t) + log(sum_exp), and softmax as exp(x - max) / sum_exp: lse
  // itself is rounded at its own (possibly large) magnitude.
  const float x_target = static_cast<float>(x[target]);
  const float log_sum_exp = static_cast<float>(std::log(sum_exp));
  const float lse = max + log_sum_exp;
  const float e = opt.label_smoothing;
  const float w_t = opt.weight ? opt.weight[target] : 1.0f;
  float loss = (1.0f - e) * w_t * ((max - x_target) + log_sum_exp) + opt.z_loss * lse * lse;
  if (smoothing) {
    loss += static_cast<float>(e / vocab * (sum_w * lse - sum_wx));
  }

  const float p_scale =
      static_cast<float>(((1.0f - e) * w_t + e * sum_w / vocab + 2.0f * opt.z_loss * lse) / sum_exp);
  const float smooth_per_weight = e / vocab;
  for (int64_t begin = 0; begin < vocab; begin += kChunk) {
    const int64_t n = std::min(kChunk, vocab - begin);
    load_row(x + begin, n, buf);
    softmax_grad_of(buf, n, max, p_scale, smooth_per_weight, opt.weight ? opt.weight + begin : nullptr);
    store_row(buf, n, grad + begin);
  }
  const float g_target = exp_nonpositive(x_target - max) * p_scale - smooth_per_weight * w_t;
  grad[target] = static_cast<scalar_t>(g_target - (1.0f - e) * w_t);
  return loss;
}

at::Tensor cross_entropy_into_cpu(
    const at::Tensor& logits,
    const at::Tensor& target,
    const std::optional<at::Tensor>& weight,
    int64_t ignore_index,
    double label_smoothing,
    double z_loss,
    const at::Tensor& grad_logits) {
  const int64_t n_rows = logits.size(0);
  const int64_t vocab = logits.size(1);
  at::Tensor loss = at::empty({n_rows}, logits.options().dtype(at::kFloat));
  const RowOptions opt{
      vocab,
      ignore_index,
      weight.has_value() ? weight->data_ptr<float>() : nullptr,
      static_cast<float>(label_smoothing),
      static_cast<float>(z_loss)};
  const int64_t* target_ptr = target.const_data_ptr<int64_t>();
  check_targets(target_ptr, n_rows, vocab, ignore_index);
  float* loss_ptr = loss.data_ptr<float>();
  const int64_t logits_stride = logits.stride(0);
  const int64_t grad_stride = grad_logits.stride(0);
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / vocab);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, logits.scalar_type(), "cross_entropy_fwd_cpu", [&] {
    const scalar_t* x = logits.const_data_ptr<scalar_t>();
    scalar_t* grad = grad_logits.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      for (int64_t row = begin; row < end; ++row) {
        loss_ptr[row] = cross_entropy_row(x + row * logits_stride, grad + row * grad_stride, target_ptr[row], opt);
      }
    });
  });
  return loss;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("cross_entropy_fwd", &cross_entropy_fwd<cross_entropy_into_cpu>);
  m.impl("cross_entropy_fwd_", &cross_entropy_fwd_<cross_entropy_into_cpu>);
}

}  // namespace lmkern
