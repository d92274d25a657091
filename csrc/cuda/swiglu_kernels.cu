// The gated feed-forward's epilogue on CUDA, after cuBLAS's gate = x @ w_gate.T and
// up = x @ w_up.T:
//   h = act(gate) * up
// and its backward, in place over d(h):
//   d(gate) = d(h) up act'(gate),  d(up) = d(h) act(gate),  h recomputed for d(w_down)
// one thread per 16-byte pack of a row, grid-stride, in fp32. The activations' math:
// activations.cuh.
#include <cstdint>

#include "activations.cuh"
#include "common.cuh"
#include "swiglu_kernels.h"
#include "vector_io.cuh"

namespace lmkern::cuda {
namespace {

constexpr int kThreads = 256;

template <typename T, bool kBackward>
__global__ void __launch_bounds__(kThreads) gated_kernel(const GatedParams p) {
  constexpr int kN = Pack<T>::kN;
  for_each_pack<kThreads, kN>(p.n_rows, p.n_cols, [&](int64_t row, int64_t first) {
    float gate[kN], up[kN];
    load_pack(static_cast<const T*>(p.gate) + row * p.gate_row_stride, first, p.n_cols, p.vectorized, gate);
    load_pack(static_cast<const T*>(p.up) + row * p.up_row_stride, first, p.n_cols, p.vectorized, up);
    if constexpr (kBackward) {
      T* grad_gate_row = static_cast<T*>(p.grad_gate) + row * p.grad_gate_row_stride;
      float grad[kN];
      load_pack(grad_gate_row, first, p.n_cols, p.vectorized, grad);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        float slope;
        const float act = activate(gate[k], p.activation, &slope);
        gate[k] = grad[k] * up[k] * slope;  // d(gate)
        up[k] *= act;                       // h
        grad[k] *= act;                     // d(up)
      }
      store_pack(grad_gate_row, first, p.n_cols, p.vectorized, gate);
      store_pack(static_cast<T*>(p.grad_up) + row * p.grad_up_row_stride, first, p.n_cols, p.vectorized, grad);
    } else {
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        up[k] *= activate(gate[k], p.activation, nullptr);
      }
    }
    if (p.h) {
      store_pack(static_cast<T*>(p.h) + row * p.n_cols, first, p.n_cols, p.vectorized, up);
    }
  });
}

template <bool kBackward>
cudaError_t launch(const GatedParams& p, cudaStream_t stream) {
  if (p.n_rows == 0 || p.n_cols == 0) {
    return cudaSuccess;
  }
  return with_float_type(p.dtype, [&](auto type) {
    using T = decltype(type);
    gated_kernel<T, kBackward><<<pack_grid<kThreads, Pack<T>::kN>(p.n_rows, p.n_cols), kThreads, 0, stream>>>(p);
    return cudaGetLastError();
  });
}

}  // namespace

cudaError_t gated_fwd(const GatedParams& params, cudaStream_t stream) { return launch<false>(params, stream); }

cudaError_t gated_bwd(const GatedParams& params, cudaStream_t stream) { return launch<true>(params, stream); }

}  // namespace lmkern::cuda
