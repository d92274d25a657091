// Launcher of the rotary-embedding CUDA kernel: raw pointers and a stream, no torch
// headers. The math is written at the top of apply_rotary_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace lmkern::cuda {

struct ApplyRotaryParams {
  const void* x;               // (batch, heads, seqlen, head_dim), strides x_stride
  int64_t x_stride[4];
  void* out;                   // (batch, heads, seqlen, head_dim), strides out_stride (x's, in place)
  int64_t out_stride[4];
  const void* cos;             // (max_positions, half) contiguous
  const void* sin;             // (max_positions, half) contiguous
  const int64_t* positions;    // (batch, seqlen), strides positions_stride
  int64_t positions_stride[2];
  int64_t batch;
  int64_t heads;
  int64_t seqlen;
  int64_t head_dim;
  int64_t half;                // rotary_dim / 2, >= 1, 2 half <= head_dim
  int64_t max_positions;
  bool interleaved;            // pairs (2i, 2i + 1), else (i, i + half)
  bool conjugate;              // rotate by minus the angles (backward)
  bool copy_rest;              // copy the head_dim - 2 half elements that pass through
  FloatType dtype;             // of x and out
  FloatType cache_dtype;       // of cos and sin
};

// Called with at least one element.
cudaError_t apply_rotary(const ApplyRotaryParams& params, cudaStream_t stream);

}  // namespace lmkern::cuda
