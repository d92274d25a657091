// LayerNorm with an optional residual add and dropout on CUDA: one thread block per row
// (blocks loop over rows), the row held in registers, kPacks 16-byte packs per thread.
//
// Forward, for s = residual + dropout(x) (stored, when kept, and normalised as rounded):
//   mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps),  out = (s - mean) rstd w + b
// both sums taken over the registers (two passes, no cancellation) and reduced across the
// block by warp shuffles and shared memory.
// Backward, for xhat = (s - mean) rstd and g = dy w:
//   ds = rstd (g - mean(g) - xhat mean(g xhat)) [+ grad_sum],  dx = dropout(ds)
// Each thread keeps dy xhat and dy for its columns over the rows of its block; each block
// writes them as one row of partial sums, and the binding adds those up: the weight and
// bias gradients are deterministic, without atomics.
#include <algorithm>
#include <cstdint>
#include <type_traits>

#include "common.cuh"
#include "layer_norm_kernels.h"
#include "vector_io.cuh"

namespace lmkern::cuda {
namespace {

// Sums each of kValues values over the block; every thread gets the totals.
template <int kThreads, int kValues>
__device__ void block_sum(float (&values)[kValues], float (*shared)[kThreads / 32]) {
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
#pragma unroll
    for (int offset = 16; offset > 0; offset /= 2) {
      values[i] += __shfl_xor_sync(0xffffffffu, values[i], offset);
    }
    if (lane == 0) {
      shared[i][warp] = values[i];
    }
  }
  __syncthreads();
#pragma unroll
  for (int i = 0; i < kValues; ++i) {
    float total = 0.0f;
#pragma unroll
    for (int w = 0; w < kWarps; ++w) {  // the same order in every thread
      total += shared[i][w];
    }
    values[i] = total;
  }
  __syncthreads();  // shared is reused by the next call
}

// The first column of pack i of this thread.
template <typename T, int kThreads>
__device__ __forceinline__ int64_t pack_column(int i) {
  return (static_cast<int64_t>(i) * kThreads + threadIdx.x) * Pack<T>::kN;
}

__device__ __forceinline__ float param(const float* values, int64_t col, int64_t width, float absent) {
  return values == nullptr ? absent : (col < width ? values[col] : 0.0f);
}

template <typename T, int kThreads, int kPacks>
__global__ void __launch_bounds__(kThreads) layer_norm_fwd_kernel(const LayerNormFwdParams p) {
  constexpr int kN = Pack<T>::kN;
  __shared__ float shared[1][kThreads / 32];
  const int64_t width = p.width;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.x) + row * p.x_row_stride;
    const T* residual = p.residual ? static_cast<const T*>(p.residual) + row * p.residual_row_stride : nullptr;
    T* summed = p.summed ? static_cast<T*>(p.summed) + row * width : nullptr;
    float s[kPacks][kN] = {};
    float sum[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
      if (first >= width) {
        continue;
      }
      load_pack(x, first, width, p.vectorized, s[i]);
      if (p.dropout.p > 0.0f) {
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          s[i][k] = p.dropout.apply(s[i][k], static_cast<uint64_t>(row * width + first + k));
        }
      }
      if (residual) {
        float r[kN];
        load_pack(residual, first, width, p.vectorized, r);
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          s[i][k] += r[k];
        }
      }
      if (summed) {  // normalise s as stored, so that backward sees the same rows
        store_pack(summed, first, width, p.vectorized, s[i]);
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          s[i][k] = to_float(from_float<T>(s[i][k]));
        }
      }
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        sum[0] += first + k < width ? s[i][k] : 0.0f;
      }
    }
    block_sum<kThreads>(sum, shared);
    const float mean = sum[0] / width;
    float squares[1] = {0.0f};
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const float d = s[i][k] - mean;
        squares[0] += first + k < width ? d * d : 0.0f;
      }
    }
    block_sum<kThreads>(squares, shared);
    const float rstd = 1.0f / sqrtf(squares[0] / width + p.eps);
    if (threadIdx.x == 0) {
      p.mean[row] = mean;
      p.rstd[row] = rstd;
    }
    T* out = static_cast<T*>(p.out) + row * width;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
      if (first >= width) {
        continue;
      }
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const int64_t col = first + k;
        s[i][k] = (s[i][k] - mean) * rstd * param(p.weight, col, width, 1.0f) + param(p.bias, col, width, 0.0f);
      }
      store_pack(out, first, width, p.vectorized, s[i]);
    }
  }
}

template <typename T, int kThreads, int kPacks>
__global__ void __launch_bounds__(kThreads) layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  constexpr int kN = Pack<T>::kN;
  __shared__ float shared[2][kThreads / 32];
  const int64_t width = p.width;
  float sum_dy_xhat[kPacks][kN] = {};
  float sum_dy[kPacks][kN] = {};
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* summed = static_cast<const T*>(p.summed) + row * p.summed_row_stride;
    const T* grad_out = static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride;
    const float mean = p.mean[row];
    const float rstd = p.rstd[row];
    float xhat[kPacks][kN];
    float g[kPacks][kN];
    float sums[2] = {0.0f, 0.0f};  // sum(g), sum(g xhat)
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
      if (first >= width) {
        continue;
      }
      float dy[kN];
      load_pack(summed, first, width, p.vectorized, xhat[i]);
      load_pack(grad_out, first, width, p.vectorized, dy);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        const int64_t col = first + k;
        xhat[i][k] = col < width ? (xhat[i][k] - mean) * rstd : 0.0f;
        // Not contracted into an FMA below: a constant row (xhat = 0, e.g. of width 1) must get
        // exactly g - mean(g) = 0.
        g[i][k] = __fmul_rn(dy[k], param(p.weight, col, width, 1.0f));
        sums[0] += g[i][k];
        sums[1] += g[i][k] * xhat[i][k];
        sum_dy_xhat[i][k] += dy[k] * xhat[i][k];
        sum_dy[i][k] += dy[k];
      }
    }
    block_sum<kThreads>(sums, shared);
    const float mean_g = sums[0] / width;
    const float mean_gx = sums[1] / width;
    const T* grad_sum = p.grad_sum ? static_cast<const T*>(p.grad_sum) + row * p.grad_sum_row_stride : nullptr;
    T* grad_summed = static_cast<T*>(p.grad_summed) + row * width;
    T* grad_x = p.grad_x ? static_cast<T*>(p.grad_x) + row * width : nullptr;
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
      if (first >= width) {
        continue;
      }
      float ds[kN];
      if (grad_sum) {
        load_pack(grad_sum, first, width, p.vectorized, ds);
      } else {
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          ds[k] = 0.0f;
        }
      }
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        ds[k] += (g[i][k] - mean_g - xhat[i][k] * mean_gx) * rstd;
      }
      store_pack(grad_summed, first, width, p.vectorized, ds);
      if (grad_x) {
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          ds[k] = p.dropout.apply(ds[k], static_cast<uint64_t>(row * width + first + k));
        }
        store_pack(grad_x, first, width, p.vectorized, ds);
      }
    }
  }
  float* partial = p.partial + static_cast<int64_t>(blockIdx.x) * 2 * width;
#pragma unroll
  for (int i = 0; i < kPacks; ++i) {
    const int64_t first = pack_column<T, kThreads>(i);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (first + k < width) {
        partial[first + k] = sum_dy_xhat[i][k];
        partial[width + first + k] = sum_dy[i][k];
      }
    }
  }
}

// Calls launch(threads, packs) (std::integral_constant values) with the block shape for
// rows of `width` elements of T: up to 1024 threads of one 16-byte pack each, then 2 or 4
// packs per thread, up to kMaxLayerNormRowBytes.
template <typename T, typename Launch>
cudaError_t with_block_shape(int64_t width, Launch&& launch) {
  const int64_t packs = (width + Pack<T>::kN - 1) / Pack<T>::kN;
  using std::integral_constant;
  if (packs <= 128) return launch(integral_constant<int, 128>{}, integral_constant<int, 1>{});
  if (packs <= 256) return launch(integral_constant<int, 256>{}, integral_constant<int, 1>{});
  if (packs <= 512) return launch(integral_constant<int, 512>{}, integral_constant<int, 1>{});
  if (packs <= 1024) return launch(integral_constant<int, 1024>{}, integral_constant<int, 1>{});
  if (packs <= 2048) return launch(integral_constant<int, 1024>{}, integral_constant<int, 2>{});
  if (packs <= 4096) return launch(integral_constant<int, 1024>{}, integral_constant<int, 4>{});
  return cudaErrorInvalidValue;  // wider than kMaxLayerNormRowBytes: refused by the binding
}

// launch(T{}, threads, packs) for this dtype and row width.
template <typename Launch>
cudaError_t with_kernel_shape(FloatType dtype, int64_t width, Launch&& launch) {
  return with_float_type(dtype, [&](auto type) {
    return with_block_shape<decltype(type)>(
        width, [&](auto threads, auto packs) { return launch(type, threads, packs); });
  });
}

}  // namespace

cudaError_t layer_norm_fwd(const LayerNormFwdParams& params, cudaStream_t stream) {
  if (params.n_rows == 0) {
    return cudaSuccess;
  }
  return with_kernel_shape(params.dtype, params.width, [&](auto type, auto threads, auto packs) {
    constexpr int kThreads = decltype(threads)::value;
    const auto grid = static_cast<unsigned>(std::min<int64_t>(params.n_rows, INT32_MAX));
    layer_norm_fwd_kernel<decltype(type), kThreads, decltype(packs)::value><<<grid, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

cudaError_t layer_norm_bwd_blocks(int64_t n_rows, int64_t width, FloatType dtype, int64_t* blocks) {
  int threads = 0;
  cudaError_t error = with_kernel_shape(dtype, width, [&](auto, auto block_threads, auto) {
    threads = decltype(block_threads)::value;
    return cudaSuccess;
  });
  int device = 0;
  int sm_count = 0;
  if (error == cudaSuccess) error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) {
    return error;
  }
  // One wave of blocks at 2048 resident threads per SM.
  *blocks = std::min<int64_t>(n_rows, static_cast<int64_t>(sm_count) * std::max(1, 2048 / threads));
  return cudaSuccess;
}

cudaError_t layer_norm_bwd(const LayerNormBwdParams& params, cudaStream_t stream) {
  if (params.blocks == 0) {
    return cudaSuccess;
  }
  return with_kernel_shape(params.dtype, params.width, [&](auto type, auto threads, auto packs) {
    constexpr int kThreads = decltype(threads)::value;
    const auto grid = static_cast<unsigned>(params.blocks);
    layer_norm_bwd_kernel<decltype(type), kThreads, decltype(packs)::value><<<grid, kThreads, 0, stream>>>(params);
    return cudaGetLastError();
  });
}

}  // namespace lmkern::cuda
