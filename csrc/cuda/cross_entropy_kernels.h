// Launcher of the fused softmax cross-entropy CUDA kernel: raw pointers and a stream, no
// torch headers. The math is written at the top of cross_entropy_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace lmkern::cuda {

struct CrossEntropyParams {
  const void* logits;         // (n_rows, vocab), rows logits_row_stride elements apart, last dim contiguous
  int64_t logits_row_stride;
  void* grad_logits;          // (n_rows, vocab) out, rows grad_row_stride apart; may alias logits
  int64_t grad_row_stride;
  const int64_t* target;      // (n_rows,)
  const float* weight;        // (vocab,) class weights, or nullptr
  float* loss;                // (n_rows,) out: each row's loss
  int64_t n_rows;
  int64_t vocab;              // >= 1
  int64_t ignore_index;
  float label_smoothing;
  float z_loss;
  FloatType dtype;            // of logits and grad_logits
};

// Writes each row's loss and the gradient of that loss with respect to the row's logits.
cudaError_t cross_entropy_fwd(const CrossEntropyParams& params, cudaStream_t stream);

}  // namespace lmkern::cuda
