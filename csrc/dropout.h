// Dropout as every lmkern backend draws it (lmkern/ops/dropout.py): the element numbered
// `index` (row * D + col of a row-major (N, D) tensor) is kept when
// philox_uniform(seed, index) >= p, and then scaled by 1 / (1 - p). Usable from C++ and
// CUDA code.
#pragma once

#include <cstdint>

#include "philox.h"

namespace lmkern {

struct Dropout {
  uint64_t seed = 0;
  float p = 0.0f;
  float scale = 1.0f;  // 1 / (1 - p); unused when p is 0 or 1

  LMKERN_HOST_DEVICE float apply(float value, uint64_t index) const {
    return p > 0.0f && philox_uniform(seed, index) < p ? 0.0f : value * scale;
  }
};

inline Dropout make_dropout(double p, int64_t seed) {
  return {static_cast<uint64_t>(seed), static_cast<float>(p), p < 1.0 ? static_cast<float>(1.0 / (1.0 - p)) : 0.0f};
}

}  // namespace lmkern
