// Helpers for the thin torch bindings of the CUDA launchers (csrc/cuda/<op>.cpp).
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <initializer_list>

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

// Whether the rows of these (N, D) tensors can all move in 16-byte packs: each data
// pointer 16-byte aligned, D and each row stride multiples of the pack. Undefined tensors
// (absent arguments) are skipped.
inline bool rows_vectorizable(std::initializer_list<at::Tensor> rows) {
  for (const at::Tensor& t : rows) {
    if (!t.defined()) {
      continue;
    }
    const int64_t pack = 16 / static_cast<int64_t>(t.element_size());
    if (reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 != 0 || t.size(1) % pack != 0 ||
        (t.size(0) > 1 && t.stride(0) % pack != 0)) {
      return false;
    }
  }
  return true;
}

}  // namespace lmkern::cuda
