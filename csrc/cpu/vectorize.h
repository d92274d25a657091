// Helpers for CPU kernels whose inner loops the compiler vectorises: a branch-free exp,
// and function multi-versioning so that one build runs AVX-512 or AVX2 code where the
// CPU has it. Loops to vectorise are `omp simd` (built with -fopenmp-simd: no runtime).
#pragma once

#include <cstdint>
#include <cstring>

#if defined(__x86_64__) && defined(__GNUC__) && defined(__linux__)
// The function is compiled once per target; the loader picks the best the CPU supports.
#define LMKERN_CPU_CLONES __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define LMKERN_CPU_CLONES
#endif

namespace lmkern {

// exp(x) for x <= 0 (and NaN), in branch-free arithmetic, where std::exp is a library
// call per element. Cephes' method: x = n ln2 + r with |r| <= ln2 / 2 (ln2 split in two
// parts for exactness), exp(r) by a degree-6 polynomial, 2^n built in the exponent bits.
// Relative error about 1e-7; exactly 0 below -87.3 (where 2^n would be subnormal) and
// for -inf. Always inlined: where the inliner declines, the call keeps its loop scalar.
[[gnu::always_inline]] inline float exp_nonpositive(float x) {
  constexpr float kMinArg = -87.33654f;
  const float clamped = x < kMinArg ? kMinArg : x;  // NaN compares false and stays NaN
  // Round to nearest by adding and removing 1.5 * 2^23.
  const float n = (clamped * 1.44269504088896341f + 12582912.0f) - 12582912.0f;
  const float r = clamped - n * 0.693359375f + n * 2.12194440e-4f;
  float p = 1.9875691500e-4f;
  p = p * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  const float exp_r = p * r * r + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;
  float two_to_n;
  std::memcpy(&two_to_n, &bits, sizeof(two_to_n));
  return x < kMinArg ? 0.0f : exp_r * two_to_n;
}

}  // namespace lmkern
