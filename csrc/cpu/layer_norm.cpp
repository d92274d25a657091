// LayerNorm with an optional residual add and dropout on CPU. Rows run in parallel
// (at::parallel_for), each converted once into an fp32 buffer that stays in cache while
// it is summed, normalised and written out; the inner loops are plain fp32 arithmetic
// that the compiler vectorises.
//
// Forward, for s = residual + dropout(x) (stored, when kept, and normalised as rounded):
//   mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps),  out = (s - mean) rstd w + b
// Backward, for xhat = (s - mean) rstd and g = dy w:
//   ds = rstd (g - mean(g) - xhat mean(g xhat)) [+ grad_sum],  dx = dropout(ds)
//   dw = sum_rows(dy xhat),  db = sum_rows(dy), over fixed chunks of rows in double
// (deterministic whatever the number of threads).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "../layer_norm.h"
#include "rows.h"
#include "vectorize.h"

namespace lmkern {
namespace {

// Row sums run as float SIMD lanes over chunks of this many elements (each lane adds up at
// most kChunk / 4 terms), and the chunks add up in double: accurate for any row length.
constexpr int64_t kChunk = 256;

LMKERN_CPU_CLONES float chunk_sum(const float* v, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += v[i];
  }
  return sum;
}

LMKERN_CPU_CLONES float chunk_dot(const float* a, const float* b, int64_t n) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    sum += a[i] * b[i];
  }
  return sum;
}

LMKERN_CPU_CLONES float chunk_squared_deviation(const float* v, int64_t n, float mean) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t i = 0; i < n; ++i) {
    const float d = v[i] - mean;
    sum += d * d;
  }
  return sum;
}

// The mean of chunk_fn(begin, n) over a row of `width` elements, chunk by chunk.
template <typename ChunkFn>
float row_mean(int64_t width, const ChunkFn& chunk_fn) {
  double total = 0.0;
  for (int64_t begin = 0; begin < width; begin += kChunk) {
    total += chunk_fn(begin, std::min(kChunk, width - begin));
  }
  return static_cast<float>(total / width);
}

// v <- (v - mean) rstd.
LMKERN_CPU_CLONES void standardize(float* v, int64_t n, float mean, float rstd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    v[i] = (v[i] - mean) * rstd;
  }
}

// v <- v w + b, either of w and b possibly absent.
LMKERN_CPU_CLONES void affine(float* v, int64_t n, const float* w, const float* b) {
  if (w) {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      v[i] *= w[i];
    }
  }
  if (b) {
    add_row(b, n, v);
  }
}

// Normalises the row v in place; returns its mean and rstd.
void normalize(float* v, int64_t width, float eps, const float* w, const float* b, float* mean, float* rstd) {
  *mean = row_mean(width, [&](int64_t begin, int64_t n) { return chunk_sum(v + begin, n); });
  const float var =
      row_mean(width, [&](int64_t begin, int64_t n) { return chunk_squared_deviation(v + begin, n, *mean); });
  *rstd = static_cast<float>(1.0 / std::sqrt(static_cast<double>(var) + eps));
  standardize(v, width, *mean, *rstd);
  affine(v, width, w, b);
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
    const at::Tensor& summed) {
  const int64_t n_rows = x.size(0);
  const int64_t width = x.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* b = bias.has_value() ? bias->const_data_ptr<float>() : nullptr;
  float* mean_ptr = mean.data_ptr<float>();
  float* rstd_ptr = rstd.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / width);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "layer_norm_fwd_cpu", [&] {
    const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
    const scalar_t* residual_ptr = residual.has_value() ? residual->const_data_ptr<scalar_t>() : nullptr;
    const int64_t residual_stride = residual.has_value() ? residual->stride(0) : 0;
    scalar_t* summed_ptr = summed.defined() ? summed.data_ptr<scalar_t>() : nullptr;
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
      std::vector<float> buffer(width);
      float* s = buffer.data();
      for (int64_t row = begin; row < end; ++row) {
        load_row(x_ptr + row * x.stride(0), width, s);
        if (dropout.p > 0.0f) {
          dropout_row(s, width, dropout, row * width);
        }
        if (residual_ptr) {
          add_row(residual_ptr + row * residual_stride, width, s);
        }
        if (summed_ptr) {  // normalise s as stored, so that backward sees the same rows
          store_row(s, width, summed_ptr + row * width);
          load_row(summed_ptr + row * width, width, s);
        }
        normalize(s, width, eps, w, b, mean_ptr + row, rstd_ptr + row);
        store_row(s, width, out_ptr + row * width);
      }
    });
  });
}

// g <- rstd (g - mean(g) - xhat mean(g xhat)).
LMKERN_CPU_CLONES void input_grad(float* g, const float* xhat, int64_t n, float mean_g, float mean_gx, float rstd) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    g[i] = (g[i] - mean_g - xhat[i] * mean_gx) * rstd;
  }
}

// sums[i] += a[i] b[i] in double.
LMKERN_CPU_CLONES void add_products_to_sums(const float* a, const float* b, int64_t n, double* sums) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    sums[i] += a[i] * b[i];
  }
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
    const at::Tensor& grad_bias) {
  const int64_t n_rows = summed.size(0);
  const int64_t width = summed.size(1);
  const float* w = weight.has_value() ? weight->const_data_ptr<float>() : nullptr;
  const float* mean_ptr = mean.const_data_ptr<float>();
  const float* rstd_ptr = rstd.const_data_ptr<float>();
  std::vector<float> totals(2 * width);  // sum_rows(dy xhat), then sum_rows(dy)
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, summed.scalar_type(), "layer_norm_bwd_cpu", [&] {
    const scalar_t* s_ptr = summed.const_data_ptr<scalar_t>();
    const scalar_t* dy_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* grad_sum_ptr = grad_sum.has_value() ? grad_sum->const_data_ptr<scalar_t>() : nullptr;
    const int64_t grad_sum_stride = grad_sum.has_value() ? grad_sum->stride(0) : 0;
    scalar_t* ds_ptr = grad_summed.data_ptr<scalar_t>();
    scalar_t* dx_ptr = grad_x.defined() ? grad_x.data_ptr<scalar_t>() : nullptr;
    column_sums_over_rows(n_rows, width, 2, totals.data(), [&](int64_t begin, int64_t end, double* sums) {
      std::vector<float> buffers(3 * width);
      float* xhat = buffers.data();
      float* dy = xhat + width;
      float* g = dy + width;
      for (int64_t row = begin; row < end; ++row) {
        load_row(s_ptr + row * summed.stride(0), width, xhat);
        standardize(xhat, width, mean_ptr[row], rstd_ptr[row]);
        load_row(dy_ptr + row * grad_out.stride(0), width, dy);
        std::copy(dy, dy + width, g);
        affine(g, width, w, nullptr);
        const float mean_g = row_mean(width, [&](int64_t b, int64_t n) { return chunk_sum(g + b, n); });
        const float mean_gx = row_mean(width, [&](int64_t b, int64_t n) { return chunk_dot(g + b, xhat + b, n); });
        input_grad(g, xhat, width, mean_g, mean_gx, rstd_ptr[row]);
        if (grad_sum_ptr) {
          add_row(grad_sum_ptr + row * grad_sum_stride, width, g);
        }
        store_row(g, width, ds_ptr + row * width);
        if (dx_ptr) {
          dropout_row(g, width, dropout, row * width);
          store_row(g, width, dx_ptr + row * width);
        }
        if (w) {
          add_products_to_sums(dy, xhat, width, sums);
        }
        add_to_sums(dy, width, sums + width);
      }
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
