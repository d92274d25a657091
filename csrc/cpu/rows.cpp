// The row helpers of rows.h that are not templates, compiled once per CPU target.
#include "rows.h"

namespace lmkern {

// Branch-free, so that the Philox rounds run in SIMD lanes.
LMKERN_CPU_CLONES void dropout_row(float* values, int64_t n, const Dropout& dropout, uint64_t first_index) {
  const uint64_t seed = dropout.seed;
  const float p = dropout.p;
  const float scale = dropout.scale;
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    values[i] = philox_uniform(seed, first_index + i) >= p ? values[i] * scale : 0.0f;
  }
}

LMKERN_CPU_CLONES void add_to_sums(const float* values, int64_t n, float* sums) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    sums[j] += values[j];
  }
}

}  // namespace lmkern
