// Row helpers for the CPU kernels that work a row at a time in fp32 (LayerNorm, the
// linear-layer epilogue): conversions in and out of fp32 buffers, residual add and
// dropout, and column sums over rows that are deterministic whatever the number of threads.
#pragma once

#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <type_traits>
#include <vector>

#include "../dropout.h"
#include "vectorize.h"

namespace lmkern {

template <typename scalar_t>
LMKERN_CPU_CLONES void load_row(const scalar_t* row, int64_t n, float* out) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    out[i] = static_cast<float>(row[i]);
  }
}

// The bits of x as bfloat16, rounded to nearest even as c10::BFloat16's conversion does
// (NaN gives its quiet NaN 0x7FC0), in integer arithmetic: the loops that store bf16 rows
// vectorise with it, where c10's conversion keeps them scalar.
[[gnu::always_inline]] inline uint16_t bfloat16_bits(float x) {
  uint32_t bits;
  std::memcpy(&bits, &x, sizeof(bits));
  const uint32_t rounded = (bits + 0x7FFFu + ((bits >> 16) & 1u)) >> 16;
  return x != x ? uint16_t{0x7FC0} : static_cast<uint16_t>(rounded);
}

template <typename scalar_t>
LMKERN_CPU_CLONES void store_row(const float* values, int64_t n, scalar_t* row) {
  if constexpr (std::is_same_v<scalar_t, c10::BFloat16>) {
    uint16_t* bits = reinterpret_cast<uint16_t*>(row);
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      bits[i] = bfloat16_bits(values[i]);
    }
  } else {
#pragma omp simd
    for (int64_t i = 0; i < n; ++i) {
      row[i] = static_cast<scalar_t>(values[i]);
    }
  }
}

// values[i] += row[i].
template <typename scalar_t>
LMKERN_CPU_CLONES void add_row(const scalar_t* row, int64_t n, float* values) {
#pragma omp simd
  for (int64_t i = 0; i < n; ++i) {
    values[i] += static_cast<float>(row[i]);
  }
}

// Dropout of a row whose first element is numbered first_index (see csrc/dropout.h), for
// dropout.p > 0. Defined in rows.cpp.
void dropout_row(float* values, int64_t n, const Dropout& dropout, uint64_t first_index);

// sums[j] += values[j]. Defined in rows.cpp.
void add_to_sums(const float* values, int64_t n, float* sums);

// A row as fp32: the tensor's own memory when it is fp32 already, else converted into
// `buffer` (n floats).
template <typename scalar_t>
const float* row_as_float(const scalar_t* row, int64_t n, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    load_row(row, n, buffer);
    return buffer;
  }
}

// Where to write a row computed in fp32: the tensor's own memory when it is fp32, else
// `buffer` (then stored with store_row).
template <typename scalar_t>
float* float_row_or(scalar_t* row, float* buffer) {
  if constexpr (std::is_same_v<scalar_t, float>) {
    return row;
  } else {
    return buffer;
  }
}

// Rows are split into this many chunks (fewer for fewer rows), each summed by one thread
// in a fixed order, whatever the number of threads.
constexpr int64_t kColumnSumChunks = 32;

// Runs chunk(begin, end, sums) over consecutive chunks of rows [0, n_rows) in parallel;
// each chunk adds its rows' terms into its own zeroed fp32 sums (n_sums * n_cols), as
// torch's own CPU kernels do. Then totals[k * n_cols + j] = the sum over chunks, added in
// double in chunk order. Deterministic.
template <typename Chunk>
void column_sums_over_rows(int64_t n_rows, int64_t n_cols, int64_t n_sums, float* totals, const Chunk& chunk) {
  const int64_t n_chunks = std::min(n_rows, kColumnSumChunks);
  const int64_t size = n_sums * n_cols;
  std::vector<float> partial(static_cast<size_t>(n_chunks * size), 0.0f);
  at::parallel_for(0, n_chunks, 1, [&](int64_t first, int64_t last) {
    for (int64_t c = first; c < last; ++c) {
      chunk(c * n_rows / n_chunks, (c + 1) * n_rows / n_chunks, partial.data() + c * size);
    }
  });
  std::vector<double> total(static_cast<size_t>(size), 0.0);
  for (int64_t c = 0; c < n_chunks; ++c) {
    const float* sums = partial.data() + c * size;
#pragma omp simd
    for (int64_t j = 0; j < size; ++j) {
      total[j] += sums[j];
    }
  }
  std::copy(total.begin(), total.end(), totals);
}

}  // namespace lmkern
