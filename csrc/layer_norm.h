// Argument checks and the op forms of lmkern::layer_norm_fwd / layer_norm_bwd, shared by
// the CPU and CUDA registrations: each device only fills the tensors allocated here.
#pragma once

#include <ATen/ATen.h>

#include <optional>
#include <tuple>

#include "dropout.h"

namespace lmkern {

// Everything a kernel relies on for memory safety; the Python layer has already given
// friendlier errors for the public API, these guard direct torch.ops calls.
inline void check_rows(const at::Tensor& rows, const at::Tensor& like, const char* op, const char* name) {
  TORCH_CHECK(
      rows.dim() == 2 && rows.sizes() == like.sizes(), op, ": ", name, " must have shape ", like.sizes(), ", got ",
      rows.sizes());
  TORCH_CHECK(
      rows.scalar_type() == like.scalar_type() && rows.device() == like.device(), op, ": ", name, " must be ",
      like.scalar_type(), " on ", like.device(), ", got ", rows.scalar_type(), " on ", rows.device());
  TORCH_CHECK(
      rows.stride(1) == 1 || rows.size(1) <= 1 || rows.numel() == 0, op, ": ", name,
      " must be contiguous in its last dimension, got strides ", rows.strides());
}

inline void check_column_params(
    const std::optional<at::Tensor>& param, const at::Tensor& like, int64_t width, const char* op, const char* name) {
  if (!param.has_value()) {
    return;
  }
  TORCH_CHECK(
      param->dim() == 1 && param->size(0) == width && param->scalar_type() == at::kFloat && param->is_contiguous() &&
          param->device() == like.device(),
      op, ": ", name, " must be a contiguous float32 tensor of shape (", width, ",) on ", like.device(), ", got ",
      param->scalar_type(), " ", param->sizes(), " on ", param->device());
}

inline void check_float_rows(const at::Tensor& rows, const char* op, const char* name) {
  TORCH_CHECK(rows.dim() == 2, op, ": ", name, " must be 2-D (N, D), got ", rows.sizes());
  TORCH_CHECK(
      rows.scalar_type() == at::kFloat || rows.scalar_type() == at::kHalf || rows.scalar_type() == at::kBFloat16, op,
      ": ", name, " must be float32, float16 or bfloat16, got ", rows.scalar_type());
  check_rows(rows, rows, op, name);
}

inline void check_dropout(double dropout_p, const char* op) {
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, op, ": dropout_p must be in [0, 1], got ", dropout_p);
}

// A device's forward: s = residual + dropout(x) (stored into `summed` when it is defined,
// and normalised as rounded there), then out, mean and rstd. With rms, RMSNorm: the row is
// not centred (mean 0) and `mean` is undefined. Called with n_rows >= 1.
using LayerNormFwdInto = void (*)(
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
    bool rms);

// Returns (out, mean, rstd, summed); summed has no elements unless keep_sum.
template <LayerNormFwdInto into>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(
    const at::Tensor& x,
    const std::optional<at::Tensor>& residual,
    const std::optional<at::Tensor>& weight,
    const std::optional<at::Tensor>& bias,
    double eps,
    double dropout_p,
    int64_t seed,
    bool keep_sum,
    bool rms) {
  constexpr const char* op = "layer_norm_fwd";
  TORCH_CHECK(!(rms && bias.has_value()), op, ": rms takes no bias, got one");
  check_float_rows(x, op, "x");
  TORCH_CHECK(x.size(1) > 0, op, ": rows must have at least one element, got ", x.sizes());
  if (residual.has_value()) {
    check_rows(*residual, x, op, "residual");
  }
  check_column_params(weight, x, x.size(1), op, "weight");
  check_column_params(bias, x, x.size(1), op, "bias");
  check_dropout(dropout_p, op);
  TORCH_CHECK(eps >= 0.0, op, ": eps must be >= 0, got ", eps);
  at::Tensor out = at::empty(x.sizes(), x.options());
  at::Tensor mean = at::empty({rms ? 0 : x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor rstd = at::empty({x.size(0)}, x.options().dtype(at::kFloat));
  at::Tensor summed = keep_sum ? at::empty(x.sizes(), x.options()) : at::empty({0}, x.options());
  if (x.size(0) > 0) {
    into(x, residual, weight, bias, static_cast<float>(eps), make_dropout(dropout_p, seed), out,
         rms ? at::Tensor() : mean, rstd, keep_sum ? summed : at::Tensor(), rms);
  }
  return {out, mean, rstd, summed};
}

// A device's backward: writes ds into grad_summed, dropout(ds) into grad_x when it is
// defined, and the column sums of dy xhat and dy into grad_weight and grad_bias when they
// are defined. With rms, RMSNorm's backward (mean is undefined). May be called with zero rows.
using LayerNormBwdInto = void (*)(
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
    bool rms);

// Returns (grad_summed, grad_x, grad_weight, grad_bias); grad_x has no elements when
// dropout_p is 0 (it is grad_summed then), grad_weight none without weight, grad_bias
// none unless has_bias.
template <LayerNormBwdInto into>
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> layer_norm_bwd(
    const at::Tensor& grad_out,
    const std::optional<at::Tensor>& grad_sum,
    const at::Tensor& summed,
    const std::optional<at::Tensor>& weight,
    const at::Tensor& mean,
    const at::Tensor& rstd,
    double dropout_p,
    int64_t seed,
    bool has_bias,
    bool rms) {
  constexpr const char* op = "layer_norm_bwd";
  TORCH_CHECK(!(rms && has_bias), op, ": rms takes no bias, got has_bias");
  check_float_rows(summed, op, "summed");
  check_rows(grad_out, summed, op, "grad_out");
  if (grad_sum.has_value()) {
    check_rows(*grad_sum, summed, op, "grad_sum");
  }
  check_column_params(weight, summed, summed.size(1), op, "weight");
  for (const at::Tensor* stats : {&mean, &rstd}) {
    if (rms && stats == &mean) {
      continue;  // not read
    }
    TORCH_CHECK(
        stats->dim() == 1 && stats->size(0) == summed.size(0) && stats->scalar_type() == at::kFloat &&
            stats->is_contiguous() && stats->device() == summed.device(),
        op, ": mean and rstd must be contiguous float32 tensors of shape (", summed.size(0), ",) on ",
        summed.device(), " (mean is not read with rms)");
  }
  check_dropout(dropout_p, op);
  const auto stats_options = summed.options().dtype(at::kFloat);
  at::Tensor grad_summed = at::empty(summed.sizes(), summed.options());
  at::Tensor grad_x = dropout_p > 0.0 ? at::empty(summed.sizes(), summed.options()) : at::empty({0}, summed.options());
  at::Tensor grad_weight = at::empty({weight.has_value() ? summed.size(1) : 0}, stats_options);
  at::Tensor grad_bias = at::empty({has_bias ? summed.size(1) : 0}, stats_options);
  into(grad_out, grad_sum, summed, weight, rms ? at::Tensor() : mean, rstd, make_dropout(dropout_p, seed),
       grad_summed, dropout_p > 0.0 ? grad_x : at::Tensor(), weight.has_value() ? grad_weight : at::Tensor(),
       has_bias ? grad_bias : at::Tensor(), rms);
  return {grad_summed, grad_x, grad_weight, grad_bias};
}

}  // namespace lmkern
