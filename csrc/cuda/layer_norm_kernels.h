// Launchers of the LayerNorm CUDA kernels: raw pointers and a stream, no torch headers.
// The math is written at the top of layer_norm_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "../dropout.h"
#include "float_type.h"

namespace lmkern::cuda {

// The widest row the kernels hold in registers, in bytes (lmkern.ops.layer_norm.MAX_GPU_ROW_BYTES).
constexpr int64_t kMaxLayerNormRowBytes = 65536;

struct LayerNormFwdParams {
  const void* x;              // (n_rows, width), rows x_row_stride elements apart
  int64_t x_row_stride;
  const void* residual;       // (n_rows, width), rows residual_row_stride apart, or nullptr
  int64_t residual_row_stride;
  const float* weight;        // (width,), or nullptr
  const float* bias;          // (width,), or nullptr
  void* out;                  // (n_rows, width) contiguous, out
  void* summed;               // (n_rows, width) contiguous, out: s = residual + dropout(x), or nullptr
  float* mean;                // (n_rows,) out; not written if rms
  float* rstd;                // (n_rows,) out
  int64_t n_rows;
  int64_t width;              // >= 1, at most kMaxLayerNormRowBytes of dtype
  float eps;
  Dropout dropout;
  bool vectorized;            // every row 16-byte aligned and width a multiple of 16 bytes
  FloatType dtype;            // of x, residual, out and summed
};

struct LayerNormBwdParams {
  const void* grad_out;       // (n_rows, width), rows grad_out_row_stride apart
  int64_t grad_out_row_stride;
  const void* grad_sum;       // (n_rows, width), rows grad_sum_row_stride apart, or nullptr
  int64_t grad_sum_row_stride;
  const void* summed;         // (n_rows, width) s, rows summed_row_stride apart
  int64_t summed_row_stride;
  const float* weight;        // (width,), or nullptr
  const float* mean;          // (n_rows,); not read if rms
  const float* rstd;          // (n_rows,)
  void* grad_summed;          // (n_rows, width) contiguous, out: ds
  void* grad_x;               // (n_rows, width) contiguous, out: dropout(ds), or nullptr
  float* partial;             // (blocks, 2, width) out: per block (row group), sum of dy xhat and of dy
  int64_t blocks;             // rows of partial sums, from layer_norm_bwd_blocks
  int64_t n_rows;
  int64_t width;
  Dropout dropout;
  bool vectorized;
  FloatType dtype;
};

// rms: RMSNorm (the row is not centred: mean 0, no bias). It is an argument rather than a
// field of the params: the larger params struct made ptxas spill up to 304 bytes in the
// widest LayerNorm forward (sm_90; make cuda-check).
cudaError_t layer_norm_fwd(const LayerNormFwdParams& params, bool rms, cudaStream_t stream);

// How many rows of partial sums layer_norm_bwd writes on the current device, at most
// n_rows: one per thread block of the fused backward (enough to fill the GPU once), or
// one per row group of the two-kernel backward of rows wider than 8192 elements.
cudaError_t layer_norm_bwd_blocks(int64_t n_rows, int64_t width, FloatType dtype, int64_t* blocks);

// Writes ds (and dx), and the partial sums; the weight and bias gradients are the sums of
// partial over its rows.
cudaError_t layer_norm_bwd(const LayerNormBwdParams& params, bool rms, cudaStream_t stream);  // rms: as in forward

}  // namespace lmkern::cuda
