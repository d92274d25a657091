// Rotary position embeddings on CPU: tokens (rows of D elements, any strides) run in
// parallel (at::parallel_for), each pair turned in fp32:
//   out_1 = x_1 cos - x_2 sin,  out_2 = x_2 cos + x_1 sin
// for the pairs (x_i, x_{i + R/2}) (half-split) or (x_{2i}, x_{2i+1}) (interleaved), with
// cos and sin read at the token's position (and -sin when conjugate: backward). Every
// position is checked before anything is written, so a bad one leaves x intact in place.
// Rows with a contiguous last dimension run a loop the compiler vectorises.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>

#include "../apply_rotary.h"
#include "vectorize.h"

namespace lmkern {
namespace {

void check_positions(const at::Tensor& positions, int64_t max_positions) {
  const int64_t* p = positions.const_data_ptr<int64_t>();
  for (int64_t b = 0; b < positions.size(0); ++b) {
    for (int64_t l = 0; l < positions.size(1); ++l) {
      const int64_t position = p[b * positions.stride(0) + l * positions.stride(1)];
      TORCH_CHECK_VALUE(
          position >= 0 && position < max_positions, "apply_rotary: positions must lie in [0, ", max_positions,
          ") (the rows of cos and sin), got ", position, " for sequence ", b, ", token ", l);
    }
  }
}

// Turns the pairs of one token's row: x and out elements x_step and out_step apart (both 1,
// known at compile time, where kUnit: the loop then vectorises). out may be x: each
// iteration reads its pair before writing it, and no two iterations share an element.
template <bool kUnit, typename scalar_t, typename cache_t>
LMKERN_CPU_CLONES void rotate_row(
    const scalar_t* x, int64_t x_step, scalar_t* out, int64_t out_step, const cache_t* c, const cache_t* s,
    int64_t half, bool interleaved, float sign) {
  if constexpr (kUnit) {
    x_step = out_step = 1;
  }
  const int64_t step = interleaved ? 2 : 1;        // from one pair's first element to the next's
  const int64_t partner = interleaved ? 1 : half;  // from a pair's first element to its second
#pragma omp simd
  for (int64_t i = 0; i < half; ++i) {
    const int64_t first = i * step, second = first + partner;
    const float x1 = static_cast<float>(x[first * x_step]);
    const float x2 = static_cast<float>(x[second * x_step]);
    const float cos_i = static_cast<float>(c[i]);
    const float sin_i = sign * static_cast<float>(s[i]);
    out[first * out_step] = static_cast<scalar_t>(x1 * cos_i - x2 * sin_i);
    out[second * out_step] = static_cast<scalar_t>(x2 * cos_i + x1 * sin_i);
  }
}

template <typename scalar_t, typename cache_t>
void rotate_rows(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate, const at::Tensor& out) {
  const int64_t heads = x.size(1), seqlen = x.size(2), head_dim = x.size(3);
  const int64_t half = cos.size(1);
  const int64_t n_rows = x.size(0) * heads * seqlen;
  const float sign = conjugate ? -1.0f : 1.0f;
  const bool copy_rest = !out.is_same(x);
  const scalar_t* x_ptr = x.const_data_ptr<scalar_t>();
  scalar_t* out_ptr = out.data_ptr<scalar_t>();
  const cache_t* cos_ptr = cos.const_data_ptr<cache_t>();
  const cache_t* sin_ptr = sin.const_data_ptr<cache_t>();
  const int64_t* positions_ptr = positions.const_data_ptr<int64_t>();
  const int64_t xs3 = x.stride(3), os3 = out.stride(3);
  const bool unit = xs3 == 1 && os3 == 1;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / head_dim);
  at::parallel_for(0, n_rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t l = row % seqlen;
      const int64_t h = (row / seqlen) % heads;
      const int64_t b = row / (seqlen * heads);
      const int64_t position = positions_ptr[b * positions.stride(0) + l * positions.stride(1)];
      const cache_t* c = cos_ptr + position * half;
      const cache_t* s = sin_ptr + position * half;
      const scalar_t* x_row = x_ptr + b * x.stride(0) + h * x.stride(1) + l * x.stride(2);
      scalar_t* out_row = out_ptr + b * out.stride(0) + h * out.stride(1) + l * out.stride(2);
      if (unit) {
        rotate_row<true>(x_row, 1, out_row, 1, c, s, half, interleaved, sign);
      } else {
        rotate_row<false>(x_row, xs3, out_row, os3, c, s, half, interleaved, sign);
      }
      if (copy_rest) {
        for (int64_t j = 2 * half; j < head_dim; ++j) {
          out_row[j * os3] = x_row[j * xs3];
        }
      }
    }
  });
}

}  // namespace

void apply_rotary_cpu(
    const at::Tensor& x, const at::Tensor& cos, const at::Tensor& sin, const at::Tensor& positions, bool interleaved,
    bool conjugate, const at::Tensor& out) {
  check_positions(positions, cos.size(0));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "apply_rotary_cpu", [&] {
    using x_t = scalar_t;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, cos.scalar_type(), "apply_rotary_cpu_cache", [&] {
      rotate_rows<x_t, scalar_t>(x, cos, sin, positions, interleaved, conjugate, out);
    });
  });
}

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("apply_rotary", &apply_rotary<apply_rotary_cpu>);
  m.impl("apply_rotary_", &apply_rotary_<apply_rotary_cpu>);
}

}  // namespace lmkern
