// Moving a row's elements kN at a time (Pack<T>::kN, 16 bytes) between memory and fp32
// registers, with an element-by-element fallback for rows that are not 16-byte aligned or
// whose length is not a multiple of kN.
#pragma once

#include <algorithm>
#include <cstdint>

#include "common.cuh"

namespace lmkern::cuda {

// Columns [first, first + kN) of a row as fp32; columns >= n_cols read as 0. vectorized:
// every row's start is 16-byte aligned and n_cols % kN == 0 (the host checks).
template <typename T>
__device__ __forceinline__ void load_pack(
    const T* row, int64_t first, int64_t n_cols, bool vectorized, float (&out)[Pack<T>::kN]) {
  constexpr int kN = Pack<T>::kN;
  if (vectorized) {
    const Pack<T> pack = *reinterpret_cast<const Pack<T>*>(row + first);
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      out[k] = to_float(pack.v[k]);
    }
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      out[k] = first + k < n_cols ? to_float(row[first + k]) : 0.0f;
    }
  }
}

// Stores columns [first, first + kN) of a row, those < n_cols, rounded to T.
template <typename T>
__device__ __forceinline__ void store_pack(
    T* row, int64_t first, int64_t n_cols, bool vectorized, const float (&values)[Pack<T>::kN]) {
  constexpr int kN = Pack<T>::kN;
  if (vectorized) {
    Pack<T> pack;
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      pack.v[k] = from_float<T>(values[k]);
    }
    *reinterpret_cast<Pack<T>*>(row + first) = pack;
  } else {
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      if (first + k < n_cols) {
        row[first + k] = from_float<T>(values[k]);
      }
    }
  }
}

// Calls f(row, first) for each pack of columns [first, first + kN) of an (n_rows, n_cols)
// array: one pack per thread of kThreads-thread blocks, grid-stride.
template <int kThreads, int kN, typename F>
__device__ __forceinline__ void for_each_pack(int64_t n_rows, int64_t n_cols, const F& f) {
  const int64_t packs_per_row = (n_cols + kN - 1) / kN;
  const int64_t n_packs = n_rows * packs_per_row;
  for (int64_t i = blockIdx.x * static_cast<int64_t>(kThreads) + threadIdx.x; i < n_packs;
       i += static_cast<int64_t>(gridDim.x) * kThreads) {
    f(i / packs_per_row, i % packs_per_row * kN);
  }
}

// The grid of for_each_pack's kernels: enough blocks to fill any current GPU several
// times over; the rest loop.
template <int kThreads, int kN>
inline unsigned pack_grid(int64_t n_rows, int64_t n_cols) {
  const int64_t packs = n_rows * ((n_cols + kN - 1) / kN);
  return static_cast<unsigned>(std::min<int64_t>((packs + kThreads - 1) / kThreads, 65536));
}

}  // namespace lmkern::cuda
