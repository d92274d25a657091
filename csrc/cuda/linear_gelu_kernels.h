// Launchers of the CUDA kernels of lmkern's linear-layer epilogue (after cuBLAS's matmul,
// called by the binding) and its backward: raw pointers and a stream, no torch headers.
// The math is written at the top of linear_gelu_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../activation.h"
#include "../dropout.h"
#include "float_type.h"

namespace lmkern::cuda {

struct EpilogueFwdParams {
  const void* acc;            // (n_rows, n_cols) contiguous: x @ weight.T; may be pre or out itself
  const float* bias;          // (n_cols,), or nullptr
  const void* residual;       // (n_rows, n_cols), rows residual_row_stride apart, or nullptr
  int64_t residual_row_stride;
  void* pre;                  // (n_rows, n_cols) contiguous, out: acc + bias, or nullptr
  void* out;                  // (n_rows, n_cols) contiguous, out: residual + dropout(act(pre))
  int64_t n_rows;
  int64_t n_cols;
  Activation activation;
  Dropout dropout;
  bool vectorized;            // every row 16-byte aligned and n_cols a multiple of 16 bytes
  FloatType dtype;
};

struct EpilogueBwdParams {
  const void* grad_out;       // (n_rows, n_cols), rows grad_out_row_stride apart
  int64_t grad_out_row_stride;
  const void* pre;            // (n_rows, n_cols), rows pre_row_stride apart; nullptr for kNone
  int64_t pre_row_stride;
  void* grad_pre;             // (n_rows, n_cols) contiguous, out
  void* act;                  // (n_rows, n_cols) contiguous, out: act(pre), or nullptr
  float* partial;             // (epilogue_bwd_row_blocks(n_rows), n_cols) out: column sums of grad_pre
  int64_t n_rows;
  int64_t n_cols;
  Activation activation;
  Dropout dropout;
  bool vectorized;
  FloatType dtype;
};

// Rows per block of the backward, and so the rows of its partial column sums: at least
// 128, more when needed to keep the grid's second dimension within 65535.
inline int64_t epilogue_bwd_rows_per_block(int64_t n_rows) {
  const int64_t spread = (n_rows + 65534) / 65535;
  return spread > 128 ? spread : 128;
}

inline int64_t epilogue_bwd_row_blocks(int64_t n_rows) {
  const int64_t rows = epilogue_bwd_rows_per_block(n_rows);
  return (n_rows + rows - 1) / rows;
}

cudaError_t epilogue_fwd(const EpilogueFwdParams& params, cudaStream_t stream);

// Writes grad_pre (and act), and per block of rows the column sums of grad_pre; the bias
// gradient is their sum over blocks.
cudaError_t epilogue_bwd(const EpilogueBwdParams& params, cudaStream_t stream);

}  // namespace lmkern::cuda
