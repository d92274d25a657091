// Rotary position embeddings on CUDA: one thread per (token, pair) turns the pair in fp32,
//   out_1 = x_1 cos - x_2 sin,  out_2 = x_2 cos + x_1 sin
// for the pairs (x_i, x_{i + R/2}) (half-split) or (x_{2i}, x_{2i+1}) (interleaved), with
// cos and sin read at the token's position (-sin when conjugate: backward); one thread per
// (token, element) of the D - R that pass through copies it when not in place. A thread
// owns both elements of its pair, so in place no thread reads what another writes. A
// position outside [0, P) reads no cache row: its pair is NaN.
#include <algorithm>
#include <cmath>
#include <cstdint>

#include "apply_rotary_kernels.h"
#include "common.cuh"
#include "rotary.cuh"

namespace lmkern::cuda {
namespace {

constexpr int kThreads = 256;

// Threads (threadIdx.x) stride over the work items of a token's row (its pairs, then the
// elements passed through); the block's blockDim.y rows of threads take one token each,
// so a token's (b, h, l) and position are worked out once per row of threads.
template <typename T, typename C>
__global__ void __launch_bounds__(kThreads) apply_rotary_kernel(const ApplyRotaryParams p) {
  const T* x = static_cast<const T*>(p.x);
  T* out = static_cast<T*>(p.out);
  const C* cos = static_cast<const C*>(p.cos);
  const C* sin = static_cast<const C*>(p.sin);
  const int64_t rest = p.copy_rest ? p.head_dim - 2 * p.half : 0;
  const int64_t per_token = p.half + rest;
  const int64_t n_rows = p.batch * p.heads * p.seqlen;
  const float sign = p.conjugate ? -1.0f : 1.0f;
  for (int64_t row = static_cast<int64_t>(blockIdx.x) * blockDim.y + threadIdx.y; row < n_rows;
       row += static_cast<int64_t>(gridDim.x) * blockDim.y) {
    const int64_t l = row % p.seqlen;
    const int64_t h = (row / p.seqlen) % p.heads;
    const int64_t b = row / (p.seqlen * p.heads);
    const T* x_row = x + b * p.x_stride[0] + h * p.x_stride[1] + l * p.x_stride[2];
    T* out_row = out + b * p.out_stride[0] + h * p.out_stride[1] + l * p.out_stride[2];
    const int64_t position = p.positions[b * p.positions_stride[0] + l * p.positions_stride[1]];
    for (int64_t item = threadIdx.x; item < per_token; item += blockDim.x) {
      if (item >= p.half) {  // an element that passes through
        const int64_t j = 2 * p.half + (item - p.half);
        out_row[j * p.out_stride[3]] = x_row[j * p.x_stride[3]];
        continue;
      }
      float2 angle = rotary_angle(cos, sin, p.half, p.max_positions, position, item);
      angle.y *= sign;
      const PairColumns pair = rotary_pair_columns(item, p.half, p.interleaved);
      const float2 turned =
          rotate_pair(to_float(x_row[pair.first * p.x_stride[3]]), to_float(x_row[pair.second * p.x_stride[3]]), angle);
      out_row[pair.first * p.out_stride[3]] = from_float<T>(turned.x);
      out_row[pair.second * p.out_stride[3]] = from_float<T>(turned.y);
    }
  }
}

}  // namespace

cudaError_t apply_rotary(const ApplyRotaryParams& params, cudaStream_t stream) {
  const int64_t rest = params.copy_rest ? params.head_dim - 2 * params.half : 0;
  const int64_t per_token = params.half + rest;
  const int64_t n_rows = params.batch * params.heads * params.seqlen;
  // A warp or more per token (up to the whole block), the rest of the block on more tokens.
  int threads_x = 32;
  while (threads_x < kThreads && threads_x < per_token) {
    threads_x *= 2;
  }
  const dim3 block(threads_x, kThreads / threads_x);
  // Enough blocks to fill any GPU many times over; the loop covers the rest.
  const int64_t blocks = std::min<int64_t>((n_rows + block.y - 1) / block.y, int64_t{1} << 20);
  return with_float_type(params.dtype, [&](auto x_type) {
    return with_float_type(params.cache_dtype, [&](auto cache_type) {
      apply_rotary_kernel<decltype(x_type), decltype(cache_type)>
          <<<static_cast<unsigned>(blocks), block, 0, stream>>>(params);
      return cudaGetLastError();
    });
  });
}

}  // namespace lmkern::cuda
