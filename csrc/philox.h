// Counter-based random numbers for dropout, the same stream on every backend: Triton's
// tl.rand(seed, offset), i.e. Philox4x32 with 10 rounds on counter (offset mod 2^32,
// offset >> 32, 0, 0) and key (seed mod 2^32, seed >> 32); the first output word x
// becomes (x if x >= 0 else ~x) * 4.6566127342e-10 with x read as int32. lmkern/philox.py
// has the same in torch. Usable from C++ and CUDA code.
#pragma once

#include <cstdint>

#if defined(__CUDACC__)
#define LMKERN_HOST_DEVICE __host__ __device__ __forceinline__
#else
#define LMKERN_HOST_DEVICE inline
#endif

namespace lmkern {

LMKERN_HOST_DEVICE uint32_t mul_hi_u32(uint32_t a, uint32_t b) {
#if defined(__CUDA_ARCH__)
  return __umulhi(a, b);
#else
  return static_cast<uint32_t>((static_cast<uint64_t>(a) * b) >> 32);
#endif
}

// A float in [0, 1) for (seed, offset).
LMKERN_HOST_DEVICE float philox_uniform(uint64_t seed, uint64_t offset) {
  uint32_t c0 = static_cast<uint32_t>(offset);
  uint32_t c1 = static_cast<uint32_t>(offset >> 32);
  uint32_t c2 = 0;
  uint32_t c3 = 0;
  uint32_t k0 = static_cast<uint32_t>(seed);
  uint32_t k1 = static_cast<uint32_t>(seed >> 32);
  for (int round = 0; round < 10; ++round) {
    const uint32_t next_c0 = mul_hi_u32(0xCD9E8D57u, c2) ^ c1 ^ k0;
    const uint32_t next_c2 = mul_hi_u32(0xD2511F53u, c0) ^ c3 ^ k1;
    c1 = 0xCD9E8D57u * c2;
    c3 = 0xD2511F53u * c0;
    c0 = next_c0;
    c2 = next_c2;
    k0 += 0x9E3779B9u;
    k1 += 0xBB67AE85u;
  }
  const int32_t x = static_cast<int32_t>(c0);
  return static_cast<float>(x < 0 ? ~x : x) * 4.6566127342e-10f;
}

}  // namespace lmkern
