// Launchers of the CUDA kernels of the gated feed-forward's epilogue (after cuBLAS's gate
// and up matmuls, called by the binding) and its backward: raw pointers and a stream, no
// torch headers. The math is written at the top of swiglu_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../activation.h"
#include "float_type.h"

namespace lmkern::cuda {

struct GatedParams {
  const void* gate;           // (n_rows, n_cols), rows gate_row_stride apart
  int64_t gate_row_stride;
  const void* up;             // (n_rows, n_cols), rows up_row_stride apart
  int64_t up_row_stride;
  void* h;                    // (n_rows, n_cols) contiguous, out: act(gate) * up; nullptr in
                              // a backward that does not want it
  // Backward only: grad_gate holds d(h) and receives d(gate); grad_up receives d(up).
  void* grad_gate;            // (n_rows, n_cols), rows grad_gate_row_stride apart
  int64_t grad_gate_row_stride;
  void* grad_up;              // (n_rows, n_cols), rows grad_up_row_stride apart
  int64_t grad_up_row_stride;
  int64_t n_rows;
  int64_t n_cols;
  Activation activation;      // kSilu, kGelu or kGeluTanh
  bool vectorized;            // every row 16-byte aligned and n_cols a multiple of 16 bytes
  FloatType dtype;
};

// h = act(gate) * up.
cudaError_t gated_fwd(const GatedParams& params, cudaStream_t stream);

// d(gate) = d(h) up act'(gate) over grad_gate, d(up) = d(h) act(gate), and h if wanted.
cudaError_t gated_bwd(const GatedParams& params, cudaStream_t stream);

}  // namespace lmkern::cuda
