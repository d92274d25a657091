// LayerNorm with an optional residual add and dropout on CPU. Rows run in parallel
// (at::parallel_for), read as fp32 (in place for fp32 tensors, else converted once into a
// buffer that stays in cache) and swept three times: sum, squared deviations, normalise
// and write. The inner loops are plain fp32 arithmetic that the compiler vectorises.
//
// Forward, for s = residual + dropout(x) (stored, when kept, and normalised as rounded):
//   mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps),  out = (s - mean) rstd w + b
// Backward, for xhat = (s - mean) rstd and g = dy w:
//   ds = rstd (g - mean(g) - xhat mean(g xhat)) [+ grad_sum],  dx = dropout(ds)
//   dw = sum_rows(dy xhat),  db = sum_rows(dy), over fixed chunks of rows in double
// (deterministic whatever the number of threads).
// RMSNorm (kRms, for lmkern.rms_norm and add_rms_norm) is the same skeleton with mean = 0
// and no bias: rstd = 1 / sqrt(sum(s^2) / D + eps), and backward drops the mean(g) term.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "../layer_norm.h"
#include "rows.h"
#include "vectorize.h"

namespace lmkern {
namespace {

// Row sums run as float SIMD lanes over chunks of this many elements (each lane adds up at
// most kChunk / 4 terms), and the chunks add up in double: accurate for any row length.
constexpr int64_t kChunk = 256;

// The mean and rstd of a row: its sum, then the squared deviations from the mean (for
// kRms, the mean is 0 and the first sweep is skipped).
template <bool kRms>
LMKERN_CPU_CLONES void row_moments(const float* s, int64_t n, float eps, float* mean_out, float* rstd_out) {
  double total = 0.0;
  for (int64_t begin = 0; begin < n && !kRms; begin += kChunk) {
    const int64_t end = std::min(begin + kChunk, n);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = begin; i < end; ++i) {
      sum += s[i];
    }
    total += sum;
  }
  const float mean = static_cast<float>(total / n);
  double squares = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t end = std::min(begin + kChunk, n);
    float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
    for (int64_t i = begin; i < end; ++i) {
      const float d = s[i] - mean;
      sum += d * d;
    }
    squares += sum;
  }
  *mean_out = mean;
  *rstd_out = static_cast<float>(1.0 / std::sqrt(squares / n + eps));
}

// out = (s - mean) rstd w + b, w and b each possibly absent. out may be s.
LMKERN_CPU_CLONES void normalize_row(
    const float* s, int64_t n, float mean, float rstd, const float* w, const float* b, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = (s[i] - mean) * rstd * (w ? w[i] : 1.0f) + (b ? b[i] : 0.0f);
  }
}

// For xhat = (s - mean) rstd and g = dy w: ds = rstd (g - mean(g) - xhat mean(g xhat)), and
// sum_dy_xhat += dy xhat (when given), sum_dy += dy. g goes through memory (into ds, then
// overwritten) so that g - mean(g) sees g rounded as in its mean: a constant row (xhat = 0,
// e.g. of width 1) must get exactly mean(g) - mean(g) = 0, whatever FMA contraction does.
// For kRms (mean 0): ds = rstd (g - xhat mean(g xhat)).
template <bool kRms>
LMKERN_CPU_CLONES void backward_row(
    const float* s,
    const float* dy,
    int64_t n,
    float mean,
    float rstd,
    const float* w,
    float* ds,
    float* sum_dy_xhat,
    float* sum_dy) {
  double total_g = 0.0;
  double total_gx = 0.0;
  for (int64_t begin = 0; begin < n; begin += kChunk) {
    const int64_t end = std::min(begin + kChunk, n);
    float sum_g = 0.0f;
    float sum_gx = 0.0f;
#pragma omp simd
    for (int64_t i = begin; i < end; ++i) {
      ds[i] = dy[i] * (w ? w[i] : 1.0f);
    }
#pragma omp simd reduction(+ : sum_g, sum_gx)
    for (int64_t i = begin; i < end; ++i) {
      sum_g += ds[i];
      sum_gx += ds[i] * ((s[i] - mean) * rstd);
    }
    total_g += sum_g;
    total_gx += sum_gx;
  }
  const float mean_g = kRms ? 0.0f : static_cast<float>(total_g / n);
  const float mean_gx = static_cast<float>(total_gx / n);
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    const float xhat = (s[i] - mean) * rstd;
    ds[i] = (ds[i] - mean_g - xhat * mean_gx) * rstd;
    if (sum_dy_xhat) {
      sum_dy_xhat[i] += dy[i] * xhat;
    }
    sum_dy[i] += dy[i];
  }
}

// Calls body(std::bool_constant<rms>{}): one instantiation of the kernels per norm.
template <typename Body>
void with_rms(bool rms, Body&& body) {
  if (rms) {
    body(std::true_type{});
  } else {
    body(std::false_type{});
  }
}

void layer_norm_fwd_cpu(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    float eps,
    const Dropout& dropout,
    const at::Tensor& out,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const at::Tensor& summed,
    bool rms) {
  const int64_t n_rows = x.size(0);
  const int64_t width = x.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* mean_ptr = rms ? nullptr : mean.data_ptr<float>();
  float* rstd_ptr = rstd.data_ptr<float>();
  const bool adds = residual.has_value() || dropout.p > 0.0f || summed.defined();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    with_rms(rms, [&](auto rms_flag) {
      constexpr bool kRms = decltype(rms_flag)::value;
      constexpr bool is_float = std::is_same_v<scalar_t, float>;
      const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
      const scalar_t* residual_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
      const int64_t residual_stride = residual.has_value() ? residual->stride(0) : 0;
      scalar_t* summed_ptr = summed.defined() ? summed.data_ptr<scalar_t>() : nullptr;
      scalar_t* out_ptr = out.data_ptr<scalar_t>();
      at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
        std::vector<float> buffer(width);
        for (int64_t row = begin; row < end; ++row) {
          const scalar_t* x_row = x_ptr + row * x.stride(0);
          const float* s = buffer.data();
          if (adds) {  // s = residual + dropout(x), in the buffer (and in summed)
            load_row(x_row, width, buffer.data());
            if (dropout.p > 0.0f) {
              dropout_row(buffer.data(), width, dropout, row * width);
            }
            if (residual_ptr) {
              add_row(residual_ptr + row * residual_stride, width, buffer.data());
            }
            if (summed_ptr) {  // normalise s as stored, so that backward sees the same rows
              store_row(buffer.data(), width, summed_ptr + row * width);
              if (!is_float) {
                load_row(summed_ptr + row * width, width, buffer.data());
              }
            }
          } else {
            s = row_as_float(x_row, width, buffer.data());
          }
          float row_mean = 0.0f;
          row_moments<kRms>(s, width, eps, &row_mean, rstd_ptr + row);
          if (!kRms) {
            mean_ptr[row] = row_mean;
          }
          scalar_t* out_row = out_ptr + row * width;
          float* normalized = float_row_or(out_row, buffer.data());
          normalize_row(s, width, row_mean, rstd_ptr[row], w, b, normalized);
          if (!is_float) {
            store_row(normalized, width, out_row);
          }
        }
      });
    });
  });
}

void layer_norm_bwd_cpu(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_sum,
    const at::Tensor& summed,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    const Dropout& dropout,
    const at::Tensor& grad_summed,
    const at::Tensor& grad_x,
    const at::Tensor& grad_weight,
    const at::Tensor& grad_bias,
    bool rms) {
  const int64_t n_rows = summed.size(0);
  const int64_t width = summed.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* mean_ptr = rms ? nullptr : mean.const_data_ptr<float>();
  const float* rstd_ptr = rstd.const_data_ptr<float>();
  std::vector<float> totals(2 * width);  // sum_rows(dy xhat), then sum_rows(dy)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, summed.scalar_type(), "layer_norm_bwd_cpu", [&] {
    with_rms(rms, [&](auto rms_flag) {
      constexpr bool kRms = decltype(rms_flag)::value;
      constexpr bool is_float = std::is_same_v<scalar_t, float>;
      const scalar_t* s_ptr = summed.const_data_ptr<scalar_t>();
      const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
      const scalar_t* grad_sum_ptr = grad_sum.has_value() ? grad_sum->const_data_ptr<scalar_t>() : nullptr;
      const int64_t grad_sum_stride = grad_sum.has_value() ? grad_sum->stride(0) : 0;
      scalar_t* ds_ptr = grad_summed.data_ptr<scalar_t>();
      scalar_t* dx_ptr = grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr;
      column_sums_over_rows(n_rows, width, 2, totals.data(), [&](int64_t begin, int64_t end, float* sums) {
        std::vector<float> buffers(3 * width);
        float* s_buffer = buffers.data();
        float* dy_buffer = s_buffer + width;
        float* ds_buffer = dy_buffer + width;
        for (int64_t row = begin; row < end; ++row) {
          const float* s = row_as_float(s_ptr + row * summed.stride(0), width, s_buffer);
          const float* dy = row_as_float(dy_ptr + row * grad_out.stride(0), width, dy_buffer);
          scalar_t* ds_row = ds_ptr + row * width;
          float* ds = float_row_or(ds_row, ds_buffer);
          backward_row<kRms>(
              s, dy, width, kRms ? 0.0f : mean_ptr[row], rstd_ptr[row], w, ds, w ? sums : nullptr, sums + width);
          if (grad_sum_ptr) {
            add_row(grad_sum_ptr + row * grad_sum_stride, width, ds);
          }
          if (!is_float) {
            store_row(ds, width, ds_row);
          }
          if (dx_ptr) {
            std::copy(ds, ds + width, ds_buffer);
            dropout_row(ds_buffer, width, dropout, row * width);
            store_row(ds_buffer, width, dx_ptr + row * width);
          }
        }
      });
    });
  });
  if (grad_weight.defined()) {
    std::copy(totals.begin(), totals.begin() + width, grad_weight.data_ptr<float>());
  }
  if (grad_bias.defined()) {
    std::copy(totals.begin() + width, totals.end(), grad_bias.data_ptr<float>());
  }
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("layer_norm_fwd", &layer_norm_fwd<layer_norm_fwd_cpu>);
  m.impl("layer_norm_bwd", &layer_norm_bwd<layer_norm_bwd_cpu>);
}

}  // namespace lmkern
