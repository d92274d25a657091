// The rotary-embedding math of lmkern's CUDA kernels (apply_rotary_kernels.cu, and the
// KV-cache decoding in attention_kernels.cu), device code only:
//   out_1 = x_1 cos - x_2 sin,  out_2 = x_2 cos + x_1 sin
// for pair i, (x_i, x_{i + R/2}) half-split or (x_{2i}, x_{2i+1}) interleaved, turned by the
// angle p theta_i read from (P, R / 2) cos and sin caches at the token's position p.
#pragma once

#include <cstdint>

#include "common.cuh"

namespace lmkern::cuda {

// (cos, sin) of pair i at position p, in fp32; (NaN, NaN) for p outside [0, max_positions),
// whose cache row is never read.
template <typename C>
__device__ __forceinline__ float2 rotary_angle(
    const C* cos, const C* sin, int64_t half, int64_t max_positions, int64_t position, int64_t i) {
  if (position < 0 || position >= max_positions) {
    const float nan = __int_as_float(0x7fc00000);
    return make_float2(nan, nan);
  }
  return make_float2(to_float(cos[position * half + i]), to_float(sin[position * half + i]));
}

// The columns of pair i in a row.
struct PairColumns {
  int64_t first;
  int64_t second;
};

__device__ __forceinline__ PairColumns rotary_pair_columns(int64_t i, int64_t half, bool interleaved) {
  return interleaved ? PairColumns{2 * i, 2 * i + 1} : PairColumns{i, i + half};
}

// The pair (x1, x2) turned by angle (cos, sin).
__device__ __forceinline__ float2 rotate_pair(float x1, float x2, float2 angle) {
  return make_float2(x1 * angle.x - x2 * angle.y, x2 * angle.x + x1 * angle.y);
}

// Column d < R of a row (any element type, unit stride) after the rotation, its pair's other
// element read from the same row: for kernels that write columns rather than pairs.
template <typename T, typename C>
__device__ __forceinline__ float rotated_column(
    const T* row, int64_t d, int64_t half, bool interleaved, const C* cos, const C* sin, int64_t max_positions,
    int64_t position) {
  const bool first = interleaved ? d % 2 == 0 : d < half;
  const int64_t i = interleaved ? d / 2 : (first ? d : d - half);
  const PairColumns columns = rotary_pair_columns(i, half, interleaved);
  const float2 angle = rotary_angle(cos, sin, half, max_positions, position, i);
  const float2 turned = rotate_pair(to_float(row[columns.first]), to_float(row[columns.second]), angle);
  return first ? turned.x : turned.y;
}

}  // namespace lmkern::cuda
