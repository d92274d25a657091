// The epilogue of lmkern's linear layer on CUDA, after cuBLAS's acc = x @ weight.T:
//   pre = acc + bias,  out = residual + dropout(act(pre))
// one thread per 16-byte pack, grid-stride; and its backward
//   d(pre) = act'(pre) dropout(d(out)),  d(bias) = sum_rows d(pre)
// where a thread owns one pack of columns over a block of rows, adds up its d(pre) in
// registers and writes that block's column sums as one row of partial sums (the binding
// adds the rows: deterministic, no atomics). GELU's math: activations.cuh.
#include <algorithm>
#include <cstdint>

#include "activations.cuh"
#include "common.cuh"
#include "linear_gelu_kernels.h"
#include "vector_io.cuh"

namespace lmkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_fwd_kernel(const EpilogueFwdParams p) {
  constexpr int kN = Pack<T>::kN;
  for_each_pack<kThreads, kN>(p.n_rows, p.n_cols, [&](int64_t row, int64_t first) {
    float v[kN];
    load_pack(static_cast<const T*>(p.acc) + row * p.n_cols, first, p.n_cols, p.vectorized, v);
    if (p.bias) {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        v[k] += first + k < p.n_cols ? p.bias[first + k] : 0.0f;
      }
    }
    if (p.pre) {
      store_pack(static_cast<T*>(p.pre) + row * p.n_cols, first, p.n_cols, p.vectorized, v);
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      v[k] = p.dropout.apply(activate(v[k], p.activation, nullptr), static_cast<uint64_t>(row * p.n_cols + first + k));
    }
    if (p.residual) {
      float r[kN];
      load_pack(static_cast<const T*>(p.residual) + row * p.residual_row_stride, first, p.n_cols, p.vectorized, r);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        v[k] += r[k];
      }
    }
    store_pack(static_cast<T*>(p.out) + row * p.n_cols, first, p.n_cols, p.vectorized, v);
  });
}

template <typename T>
__global__ void __launch_bounds__(kThreads) epilogue_bwd_kernel(const EpilogueBwdParams p, int64_t rows_per_block) {
  constexpr int kN = Pack<T>::kN;
  const int64_t first = (blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x) * kN;
  if (first >= p.n_cols) {
    return;
  }
  const int64_t row_begin = blockIdx.y * rows_per_block;
  const int64_t row_end = std::min(row_begin + rows_per_block, p.n_rows);
  float sums[kN] = {};
  for (int64_t row = row_begin; row < row_end; ++row) {
    float grad[kN];
    float pre[kN] = {};
    load_pack(static_cast<const T*>(p.grad_out) + row * p.grad_out_row_stride, first, p.n_cols, p.vectorized, grad);
    if (p.pre) {
      load_pack(static_cast<const T*>(p.pre) + row * p.pre_row_stride, first, p.n_cols, p.vectorized, pre);
    }
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      float slope;
      pre[k] = activate(pre[k], p.activation, &slope);
      grad[k] = p.dropout.apply(grad[k], static_cast<uint64_t>(row * p.n_cols + first + k)) * slope;
      sums[k] += grad[k];
    }
    store_pack(static_cast<T*>(p.grad_pre) + row * p.n_cols, first, p.n_cols, p.vectorized, grad);
    if (p.act) {
      store_pack(static_cast<T*>(p.act) + row * p.n_cols, first, p.n_cols, p.vectorized, pre);
    }
  }
  float* partial = p.partial + blockIdx.y * p.n_cols;
#pragma unroll
  for (int k = 0; k < kN; ++k) {
    if (first + k < p.n_cols) {
      partial[first + k] = sums[k];
    }
  }
}

template <typename T>
cudaError_t launch_fwd(const EpilogueFwdParams& p, cudaStream_t stream) {
  epilogue_fwd_kernel<T><<<pack_grid<kThreads, Pack<T>::kN>(p.n_rows, p.n_cols), kThreads, 0, stream>>>(p);
  return cudaGetLastError();
}

template <typename T>
cudaError_t launch_bwd(const EpilogueBwdParams& p, cudaStream_t stream) {
  const int64_t packs_per_row = (p.n_cols + Pack<T>::kN - 1) / Pack<T>::kN;
  const dim3 grid(
      static_cast<unsigned>((packs_per_row + kThreads - 1) / kThreads),
      static_cast<unsigned>(epilogue_bwd_row_blocks(p.n_rows)));
  epilogue_bwd_kernel<T><<<grid, kThreads, 0, stream>>>(p, epilogue_bwd_rows_per_block(p.n_rows));
  return cudaGetLastError();
}

}  // namespace

cudaError_t epilogue_fwd(const EpilogueFwdParams& params, cudaStream_t stream) {
  if (params.n_rows == 0 || params.n_cols == 0) {
    return cudaSuccess;
  }
  return with_float_type(params.dtype, [&](auto type) { return launch_fwd<decltype(type)>(params, stream); });
}

cudaError_t epilogue_bwd(const EpilogueBwdParams& params, cudaStream_t stream) {
  if (params.n_rows == 0 || params.n_cols == 0) {
    return cudaSuccess;
  }
  return with_float_type(params.dtype, [&](auto type) { return launch_bwd<decltype(type)>(params, stream); });
}

}  // namespace lmkern::cuda
