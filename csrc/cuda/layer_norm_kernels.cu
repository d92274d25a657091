// LayerNorm with an optional residual add and dropout on CUDA: one thread block per row
// (blocks loop over rows), the row held in registers, kPacks 16-byte packs per thread.
//
// Forward, for s = residual + dropout(x) (stored, when kept, and normalised as rounded):
//   mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps),  out = (s - mean) rstd w + b
// both sums taken over the registers (two passes, no cancellation) and reduced across the
// block by warp shuffles and shared memory.
// Backward, for xhat = (s - mean) rstd and g = dy w:
//   ds = rstd (g - mean(g) - xhat mean(g xhat)) [+ grad_sum],  dx = dropout(ds)
// Rows of up to kMaxFusedWidth (8192) elements: each thread keeps xhat and g for its columns
// between the two passes, and dy xhat and dy summed over the rows of its block; each block
// writes those sums as one row of partial sums. Wider rows would not fit: at 1024 threads
// a thread has 64 registers, and the row with the two sums beside it takes 4 per element
// (64 already at 16 elements a thread, 16K of fp16). There the backward runs as two
// kernels: the row kernel keeps one pack at a time and reads the row again (from cache)
// for its second pass, and a column-tiled kernel sums dy xhat and dy over groups of rows
// (s and dy read twice, and no spills). Either way the binding adds up the rows of partial
// sums: the weight and bias gradients are deterministic, without atomics.
// RMSNorm (kRms, for lmkern.rms_norm and add_rms_norm) runs the same kernels with mean = 0
// and no bias: the first block sum of forward and the mean(g) term of backward drop out.
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

// For the kN columns of a row from `first`: xhat, dy and g = dy w.
template <typename T>
__device__ __forceinline__ void row_terms(
    const LayerNormBwdParams& p, const T* summed, const T* grad_out, int64_t first, float mean, float rstd,
    float (&xhat)[Pack<T>::kN], float (&dy)[Pack<T>::kN], float (&g)[Pack<T>::kN]) {
  load_pack(summed, first, p.width, p.vectorized, xhat);
  load_pack(grad_out, first, p.width, p.vectorized, dy);
#pragma unroll
  for (int k = 0; k < Pack<T>::kN; ++k) {
    const int64_t col = first + k;
    xhat[k] = col < p.width ? (xhat[k] - mean) * rstd : 0.0f;
    // Not contracted into an FMA later: a constant row (xhat = 0, e.g. of width 1) must get
    // exactly g - mean(g) = 0.
    g[k] = __fmul_rn(dy[k], param(p.weight, col, p.width, 1.0f));
  }
}

template <typename T, int kThreads, int kPacks, bool kRms>
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
    if constexpr (!kRms) {
      block_sum<kThreads>(sum, shared);
    }
    const float mean = kRms ? 0.0f : sum[0] / width;
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
      if constexpr (!kRms) {
        p.mean[row] = mean;
      }
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

// The widest row the fused backward takes, in elements (see the top of this file).
constexpr int64_t kMaxFusedWidth = 8192;
template <typename T, int kThreads, int kPacks>
constexpr bool kFusedBackward = static_cast<int64_t>(kThreads) * kPacks * Pack<T>::kN <= kMaxFusedWidth;

template <typename T, int kThreads, int kPacks, bool kRms>
__global__ void __launch_bounds__(kThreads) layer_norm_bwd_kernel(const LayerNormBwdParams p) {
  constexpr int kN = Pack<T>::kN;
  constexpr bool kFused = kFusedBackward<T, kThreads, kPacks>;
  constexpr int kHeld = kFused ? kPacks : 1;  // packs of xhat and g held between the passes
  __shared__ float shared[2][kThreads / 32];
  const int64_t width = p.width;
  float sum_dy_xhat[kHeld][kN] = {};  // fused only
  float sum_dy[kHeld][kN] = {};
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* summed = static_cast<const T*>(p.summed) + row * p.summed_row_stride;
    const T* grad_out = static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride;
    const float mean = kRms ? 0.0f : p.mean[row];
    const float rstd = p.rstd[row];
    float xhat[kHeld][kN];
    float g[kHeld][kN];
    float sums[2] = {0.0f, 0.0f};  // sum(g), sum(g xhat)
#pragma unroll
    for (int i = 0; i < kPacks; ++i) {
      const int64_t first = pack_column<T, kThreads>(i);
      if (first >= width) {
        continue;
      }
      const int held = kFused ? i : 0;
      float dy[kN];
      row_terms(p, summed, grad_out, first, mean, rstd, xhat[held], dy, g[held]);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        sums[0] += g[held][k];
        sums[1] += g[held][k] * xhat[held][k];
        if constexpr (kFused) {
          sum_dy_xhat[held][k] += dy[k] * xhat[held][k];
          sum_dy[held][k] += dy[k];
        }
      }
    }
    block_sum<kThreads>(sums, shared);
    const float mean_g = kRms ? 0.0f : sums[0] / width;
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
      const int held = kFused ? i : 0;
      if constexpr (!kFused) {
        float dy[kN];
        row_terms(p, summed, grad_out, first, mean, rstd, xhat[0], dy, g[0]);
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
        ds[k] += (g[held][k] - mean_g - xhat[held][k] * mean_gx) * rstd;
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
  if constexpr (kFused) {
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
}

// The column sums of the two-kernel backward: block (c, r) sums dy xhat and dy for one
// pack of columns per thread, kWeightGradThreads packs from column tile c, over the rows
// r, r + R, ... (R = gridDim.y row groups), and writes them as row r of the partial sums.
constexpr int kWeightGradThreads = 256;

template <typename T, bool kRms>
__global__ void __launch_bounds__(kWeightGradThreads) layer_norm_weight_grad_kernel(const LayerNormBwdParams p) {
  constexpr int kN = Pack<T>::kN;
  const int64_t width = p.width;
  const int64_t first = (static_cast<int64_t>(blockIdx.x) * kWeightGradThreads + threadIdx.x) * kN;
  if (first >= width) {
    return;
  }
  float sum_dy_xhat[kN] = {};
  float sum_dy[kN] = {};
  for (int64_t row = blockIdx.y; row < p.n_rows; row += gridDim.y) {
    float xhat[kN];
    float dy[kN];
    load_pack(static_cast<const T*>(p.summed) + row * p.summed_row_stride, first, width, p.vectorized, xhat);
    load_pack(static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride, first, width, p.vectorized, dy);
    const float mean = kRms ? 0.0f : p.mean[row];
    const float rstd = p.rstd[row];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      sum_dy_xhat[k] += dy[k] * ((xhat[k] - mean) * rstd);
      sum_dy[k] += dy[k];
    }
  }
  float* partial = p.partial + static_cast<int64_t>(blockIdx.y) * 2 * width;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    if (first + k < width) {
      partial[first + k] = sum_dy_xhat[k];
      partial[width + first + k] = sum_dy[k];
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

// launch(std::bool_constant<rms>{}): one instantiation of the kernels per norm.
template <typename Launch>
cudaError_t with_rms(bool rms, Launch&& launch) {
  return rms ? launch(std::true_type{}) : launch(std::false_type{});
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

cudaError_t layer_norm_fwd(const LayerNormFwdParams& params, bool rms, cudaStream_t stream) {
  if (params.n_rows == 0) {
    return cudaSuccess;
  }
  return with_kernel_shape(params.dtype, params.width, [&](auto type, auto threads, auto packs) {
    return with_rms(rms, [&](auto norm) {
      constexpr int kThreads = decltype(threads)::value;
      const auto grid = static_cast<unsigned>(std::min<int64_t>(params.n_rows, INT32_MAX));
      layer_norm_fwd_kernel<decltype(type), kThreads, decltype(packs)::value, decltype(norm)::value>
          <<<grid, kThreads, 0, stream>>>(params);
      return cudaGetLastError();
    });
  });
}

// The column tiles of layer_norm_weight_grad_kernel for rows of `width` elements of T.
template <typename T>
int64_t weight_grad_column_tiles(int64_t width) {
  const int64_t columns = static_cast<int64_t>(kWeightGradThreads) * Pack<T>::kN;
  return (width + columns - 1) / columns;
}

cudaError_t layer_norm_bwd_blocks(int64_t n_rows, int64_t width, FloatType dtype, int64_t* blocks) {
  int device = 0;
  int sm_count = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&sm_count, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) {
    return error;
  }
  return with_kernel_shape(dtype, width, [&](auto type, auto threads, auto packs) {
    using T = decltype(type);
    constexpr int kThreads = decltype(threads)::value;
    if constexpr (kFusedBackward<T, kThreads, decltype(packs)::value>) {
      // One wave of blocks at 2048 resident threads per SM.
      *blocks = std::min<int64_t>(n_rows, static_cast<int64_t>(sm_count) * std::max(1, 2048 / kThreads));
    } else {
      // Row groups of the column-tiled kernel: with its column tiles, 8 blocks per SM.
      const int64_t tiles = weight_grad_column_tiles<T>(width);
      *blocks = std::min<int64_t>(n_rows, std::max<int64_t>(1, (sm_count * 8 + tiles - 1) / tiles));
    }
    return cudaSuccess;
  });
}

cudaError_t layer_norm_bwd(const LayerNormBwdParams& params, bool rms, cudaStream_t stream) {
  if (params.blocks == 0) {
    return cudaSuccess;
  }
  return with_kernel_shape(params.dtype, params.width, [&](auto type, auto threads, auto packs) {
    return with_rms(rms, [&](auto norm) {
      using T = decltype(type);
      constexpr int kThreads = decltype(threads)::value;
      constexpr int kPacks = decltype(packs)::value;
      constexpr bool kRms = decltype(norm)::value;
      if constexpr (kFusedBackward<T, kThreads, kPacks>) {
        layer_norm_bwd_kernel<T, kThreads, kPacks, kRms>
            <<<static_cast<unsigned>(params.blocks), kThreads, 0, stream>>>(params);
        return cudaGetLastError();
      } else {
        const auto rows = static_cast<unsigned>(std::min<int64_t>(params.n_rows, INT32_MAX));
        layer_norm_bwd_kernel<T, kThreads, kPacks, kRms><<<rows, kThreads, 0, stream>>>(params);
        const cudaError_t error = cudaGetLastError();
        if (error != cudaSuccess) {
          return error;
        }
        const dim3 grid(static_cast<unsigned>(weight_grad_column_tiles<T>(params.width)),
                        static_cast<unsigned>(params.blocks));
        layer_norm_weight_grad_kernel<T, kRms><<<grid, kWeightGradThreads, 0, stream>>>(params);
        return cudaGetLastError();
      }
    });
  });
}

}  // namespace lmkern::cuda
