// Helpers shared by lmkern's CUDA kernels: conversions to and from fp32, 16-byte packs
// for vectorised loads and stores, and the element type of a FloatType for launchers.
#pragma once

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "float_type.h"

namespace lmkern::cuda {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T>
__device__ __forceinline__ T from_float(float v);
template <>
__device__ __forceinline__ float from_float<float>(float v) { return v; }
template <>
__device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <>
__device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) { return __float2bfloat16_rn(v); }

// kN elements moved by one 16-byte memory instruction.
template <typename T>
struct alignas(16) Pack {
  static constexpr int kN = 16 / sizeof(T);
  T v[kN];
};

// Host side: launch(T{}) with T the element type that dtype names.
template <typename Launch>
cudaError_t with_float_type(FloatType dtype, Launch&& launch) {
  switch (dtype) {
    case FloatType::kFloat32:
      return launch(float{});
    case FloatType::kFloat16:
      return launch(__half{});
    case FloatType::kBFloat16:
      return launch(__nv_bfloat16{});
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmkern::cuda
