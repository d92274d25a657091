// Helpers for the thin torch bindings of the CUDA launchers (csrc/cuda/<op>.cpp).
#pragma once

#include <ATen/ATen.h>

#include "float_type.h"

namespace lmkern::cuda {

inline FloatType to_float_type(at::ScalarType type) {
  switch (type) {
    case at::kFloat:
      return FloatType::kFloat32;
    case at::kHalf:
      return FloatType::kFloat16;
    case at::kBFloat16:
      return FloatType::kBFloat16;
    default:
      TORCH_CHECK(false, "lmkern CUDA kernels take float32, float16 or bfloat16, got ", type);
  }
}

}  // namespace lmkern::cuda
