// Flash attention on CPU: the FlashAttention-2 algorithm with tiles sized for the caches.
//
// Forward: at::parallel_for over tiles of query rows (batch x key/value head x query
// heads x query block). A tile's rows are converted to fp32 once; for each block of keys,
// S = Q K^T is one small matmul, an online softmax per row (running max m, running sum l
// of exp(s - m), the output accumulator rescaled by exp(m_old - m_new)) turns S into P,
// and O += P V is another. Only out and lse = m + log l leave the tile. When Lq is short
// (decoding), the query heads that share a key/value head are packed as rows of one tile.
//
// Backward, with P = exp(s - lse) recomputed from the saved lse, Z the dropout factor and
// delta_i = sum_d dO_id O_id (a pre-pass):
//   dV = (P Z)^T dO,  dP = (dO V^T) Z,  dS = P (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
// at::parallel_for over (batch x key/value head x chunk of key blocks): each task owns its
// keys' dK and dV, loops over the query heads of its group and the query blocks that see
// its keys, and adds dS K into its chunk's own fp32 dQ buffer; the buffers are summed at
// the end (one chunk, and so no sum, unless there are fewer key/value heads than threads).
// Every value has one writer: no atomics, and for a given thread count the results are
// deterministic.
//
// Memory beyond inputs and outputs is O(L D): tiles, a thread's keys and values in fp32,
// and the fp32 dQ buffer(s). All arithmetic is fp32, in loops the compiler vectorises (see
// vectorize.h): the matmuls keep blocks of up to 6 x 32 outputs in registers across the
// reduction. Their sums are split (two interleaved chains, partial sums of 32 terms) so
// that the rounding error stays near that of torch's own fp32 attention.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <utility>
#include <vector>

#include "../attention.h"
#include "../philox.h"
#include "vectorize.h"

namespace lmkern {
namespace {

constexpr int64_t kBlockM = 64;  // query rows per tile
constexpr int64_t kBlockN = 64;  // keys per block
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Vectorised pieces on fp32 buffers. Helpers marked always_inline are compiled into each
// target clone of the LMKERN_CPU_CLONES functions that call them.

// C[r][x] += sum_k A(r, k) B[k][x] for a kRows x kCols block, in registers across k. The
// even and odd k go to two partial sums, added at the end: a sum of k terms then rounds
// like two of k / 2 (and the two chains of FMAs overlap).
template <int64_t kRows, int64_t kCols>
__attribute__((always_inline)) inline void matmul_block(
    const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t k) {
  float even[kRows][kCols];
  float odd[kRows][kCols];
  for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
    for (int64_t x = 0; x < kCols; ++x) {
      even[r][x] = c[r * ldc + x];
      odd[r][x] = 0.0f;
    }
  }
  int64_t kk = 0;
  for (; kk + 2 <= k; kk += 2) {
    const float* b_even = b + kk * ldb;
    const float* b_odd = b_even + ldb;
#pragma GCC unroll 8
    for (int64_t r = 0; r < kRows; ++r) {
      const float a_even = a[r * a_row + kk * a_col];
      const float a_odd = a[r * a_row + (kk + 1) * a_col];
#pragma omp simd
      for (int64_t x = 0; x < kCols; ++x) {
        even[r][x] += a_even * b_even[x];
        odd[r][x] += a_odd * b_odd[x];
      }
    }
  }
  if (kk < k) {
    for (int64_t r = 0; r < kRows; ++r) {
      const float a_last = a[r * a_row + kk * a_col];
#pragma omp simd
      for (int64_t x = 0; x < kCols; ++x) {
        even[r][x] += a_last * b[kk * ldb + x];
      }
    }
  }
  for (int64_t r = 0; r < kRows; ++r) {
#pragma omp simd
    for (int64_t x = 0; x < kCols; ++x) {
      c[r * ldc + x] = even[r][x] + odd[r][x];
    }
  }
}

// The same for fewer than 16 columns (the edges), with the even partial sums in memory.
__attribute__((always_inline)) inline void matmul_edge(
    const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
    int64_t n, int64_t k) {
  for (int64_t r = 0; r < m; ++r) {
    float odd[16] = {};
    for (int64_t kk = 0; kk < k; ++kk) {
      const float a_rk = a[r * a_row + kk * a_col];
      float* sum = kk % 2 == 0 ? c + r * ldc : odd;
#pragma omp simd
      for (int64_t x = 0; x < n; ++x) {
        sum[x] += a_rk * b[kk * ldb + x];
      }
    }
#pragma omp simd
    for (int64_t x = 0; x < n; ++x) {
      c[r * ldc + x] += odd[x];
    }
  }
}

// Runs the row block of kRows rows starting at a and c over all n columns.
template <int64_t kRows>
__attribute__((always_inline)) inline void matmul_rows(
    const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t n,
    int64_t k) {
  int64_t x = 0;
  for (; x + 32 <= n; x += 32) {
    matmul_block<kRows, 32>(a, a_row, a_col, b + x, ldb, c + x, ldc, k);
  }
  for (; x + 16 <= n; x += 16) {
    matmul_block<kRows, 16>(a, a_row, a_col, b + x, ldb, c + x, ldc, k);
  }
  if (x < n) {
    matmul_edge(a, a_row, a_col, b + x, ldb, c + x, ldc, kRows, n - x, k);
  }
}

// C (m x n, rows ldc apart) += A B, with A(r, k) = a[r * a_row + k * a_col] (so that A
// may be read transposed) and B (k x n) row-major with rows ldb apart.
LMKERN_CPU_CLONES void matmul_add(
    const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
    int64_t n, int64_t k) {
  int64_t r = 0;
  for (; r + 6 <= m; r += 6) {
    matmul_rows<6>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, n, k);
  }
  for (; r + 4 <= m; r += 4) {
    matmul_rows<4>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, n, k);
  }
  for (; r < m; ++r) {
    matmul_rows<1>(a + r * a_row, a_row, a_col, b, ldb, c + r * ldc, ldc, n, k);
  }
}

// s_j <- scale s_j for keys j < visible, -inf from there on.
LMKERN_CPU_CLONES void scale_and_limit(float* s, int64_t n, int64_t visible, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    s[j] = j < visible ? s[j] * scale : -kInf;
  }
}

// max(init, max_j s_j).
LMKERN_CPU_CLONES float row_max(const float* s, int64_t n, float init) {
  float max = init;
#pragma omp simd reduction(max : max)
  for (int64_t j = 0; j < n; ++j) {
    max = s[j] > max ? s[j] : max;  // vectorises where std::max does not
  }
  return max;
}

// s_j <- exp(s_j - shift) for shift >= max_j s_j (or for s_j - shift a little above 0 by
// rounding); returns sum_j of the new s_j.
LMKERN_CPU_CLONES float exp_in_place(float* s, int64_t n, float shift) {
  float sum = 0.0f;
#pragma omp simd reduction(+ : sum)
  for (int64_t j = 0; j < n; ++j) {
    s[j] = exp_nonpositive(s[j] - shift);
    sum += s[j];
  }
  return sum;
}

// y_j <- factor y_j + x_j.
LMKERN_CPU_CLONES void scale_add(float* y, const float* x, int64_t n, float factor) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    y[j] = factor * y[j] + x[j];
  }
}

// Terms a partial sum of matmul_accumulate adds up before it meets the running sum.
constexpr int64_t kPartialSum = 32;

// C <- diag(row_scale) C + A B (row_scale nullptr: 1), with A B summed in partial sums of
// kPartialSum terms along k (in `scratch`, m x n) before each meets C: a sum over many
// terms, or many calls, then rounds like a sum of short partial sums rather than one long
// chain (whose rounding a single large term would dominate).
void matmul_accumulate(
    const float* a, int64_t a_row, int64_t a_col, const float* b, int64_t ldb, float* c, int64_t ldc, int64_t m,
    int64_t n, int64_t k, const float* row_scale, float* scratch) {
  for (int64_t k0 = 0; k0 < std::max<int64_t>(k, 1); k0 += kPartialSum) {
    const int64_t terms = std::min(kPartialSum, k - k0);
    std::fill(scratch, scratch + m * n, 0.0f);
    matmul_add(a + k0 * a_col, a_row, a_col, b + k0 * ldb, ldb, scratch, n, m, n, terms);
    for (int64_t r = 0; r < m; ++r) {
      scale_add(c + r * ldc, scratch + r * n, n, row_scale != nullptr && k0 == 0 ? row_scale[r] : 1.0f);
    }
  }
}

// ds_j <- scale p_j (dp_j - delta), in place over dp.
LMKERN_CPU_CLONES void softmax_grad_row(const float* p, float* dp, int64_t n, float delta, float scale) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    dp[j] = scale * p[j] * (dp[j] - delta);
  }
}

// z_j = keep / (1 - p) for the elements at offsets offset + j (see lmkern/philox.py).
void dropout_factors(float* z, int64_t n, uint64_t seed, uint64_t offset, float dropout_p, float keep_scale) {
  for (int64_t j = 0; j < n; ++j) {
    z[j] = philox_uniform(seed, offset + j) >= dropout_p ? keep_scale : 0.0f;
  }
}

// y_j *= z_j.
LMKERN_CPU_CLONES void multiply_rows(float* y, const float* z, int64_t n) {
#pragma omp simd
  for (int64_t j = 0; j < n; ++j) {
    y[j] *= z[j];
  }
}

// ---------------------------------------------------------------------------------------
// Reading inputs into fp32 tiles and writing results back.

template <typename scalar_t>
void load_rows(const scalar_t* x, int64_t row_stride, int64_t rows, int64_t cols, float* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      out[r * ld + c] = static_cast<float>(x[r * row_stride + c]);
    }
  }
}

// out[c * ld + r] = x[r][c]: rows x cols read, transposed.
template <typename scalar_t>
void load_transposed(const scalar_t* x, int64_t row_stride, int64_t rows, int64_t cols, float* out, int64_t ld) {
  for (int64_t r = 0; r < rows; ++r) {
    for (int64_t c = 0; c < cols; ++c) {
      out[c * ld + r] = static_cast<float>(x[r * row_stride + c]);
    }
  }
}

template <typename scalar_t>
void store_row(const float* x, int64_t n, scalar_t* out) {
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<scalar_t>(x[j]);
  }
}

// out_j = x_j / divisor, rounded once (in double), or 0 for divisor 0.
template <typename scalar_t>
void store_row_divided(const float* x, int64_t n, float divisor, scalar_t* out) {
  const double inverse = divisor > 0 ? 1.0 / divisor : 0.0;
  for (int64_t j = 0; j < n; ++j) {
    out[j] = static_cast<scalar_t>(static_cast<float>(x[j] * inverse));
  }
}

// A mask row (b, h, i) of Lk elements, stride apart, applied to scores.
struct MaskRow {
  const void* data = nullptr;  // nullptr: no mask
  at::ScalarType dtype = at::kBool;
  int64_t stride = 0;

  // s_j: -inf where a boolean mask is false at key first + j; plus an additive mask's value.
  void apply(float* s, int64_t first, int64_t n) const {
    if (data == nullptr) {
      return;
    }
    AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, dtype, "attention_mask", [&] {
      const scalar_t* m = static_cast<const scalar_t*>(data) + first * stride;
      for (int64_t j = 0; j < n; ++j) {
        if constexpr (std::is_same_v<scalar_t, bool>) {
          s[j] = m[j * stride] ? s[j] : -kInf;
        } else {
          s[j] += static_cast<float>(m[j * stride]);
        }
      }
    });
  }
};

// ---------------------------------------------------------------------------------------
// What a call attends over, for the forward and the backward alike.

struct Problem {
  int64_t batch, heads, kv_heads, seqlen_q, seqlen_k, head_dim, head_dim_v;
  float scale;
  bool causal;
  // Per batch: the keys of the sequence, and the causal shift (query i sees keys j <= i + shift).
  std::vector<int64_t> kv_len, shift;
  const void* mask;  // (B, H, Lq, Lk) or nullptr
  at::ScalarType mask_dtype;
  int64_t mask_stride[4];
  float dropout_p, keep_scale;
  uint64_t seed;

  int64_t group() const {
    return heads / kv_heads;
  }
  // Keys [0, visible_keys(b, i)) are the ones query i of sequence b may see.
  int64_t visible_keys(int64_t b, int64_t i) const {
    return causal ? std::clamp<int64_t>(i + shift[b] + 1, 0, kv_len[b]) : kv_len[b];
  }
  MaskRow mask_row(int64_t b, int64_t h, int64_t i) const {
    if (mask == nullptr) {
      return {};
    }
    const int64_t offset = b * mask_stride[0] + h * mask_stride[1] + i * mask_stride[2];
    return {static_cast<const char*>(mask) + offset * c10::elementSize(mask_dtype), mask_dtype, mask_stride[3]};
  }
  // The dropout offset of element (b, h, i, 0).
  uint64_t dropout_offset(int64_t b, int64_t h, int64_t i) const {
    return static_cast<uint64_t>(((b * heads + h) * seqlen_q + i) * seqlen_k);
  }
};

Problem make_problem(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed) {
  Problem p{};
  p.batch = q.size(0);
  p.heads = q.size(1);
  p.kv_heads = k.size(1);
  p.seqlen_q = q.size(2);
  p.seqlen_k = k.size(2);
  p.head_dim = q.size(3);
  p.head_dim_v = v.size(3);
  p.scale = static_cast<float>(scale);
  p.causal = is_causal;
  p.kv_len.assign(p.batch, p.seqlen_k);
  p.shift.assign(p.batch, causal_shift);
  p.mask = nullptr;
  if (mask.has_value()) {
    p.mask = mask->const_data_ptr();
    p.mask_dtype = mask->scalar_type();
    for (int d = 0; d < 4; ++d) {
      p.mask_stride[d] = mask->stride(d);
    }
  }
  TORCH_CHECK(dropout_p >= 0.0 && dropout_p <= 1.0, "attention: dropout_p must be in [0, 1], got ", dropout_p);
  p.dropout_p = static_cast<float>(dropout_p);
  p.keep_scale = dropout_p >= 1.0 ? 0.0f : static_cast<float>(1.0 / (1.0 - dropout_p));
  p.seed = static_cast<uint64_t>(seed);
  return p;
}

// Strides of a 4-D tensor's first three dims (its last is contiguous).
struct Strides {
  int64_t b, h, row;
  explicit Strides(const at::Tensor& t) : b(t.stride(0)), h(t.stride(1)), row(t.stride(2)) {}
  int64_t at(int64_t batch, int64_t head, int64_t i) const {
    return batch * b + head * h + i * row;
  }
};

// ---------------------------------------------------------------------------------------
// Forward.

// Rows of a forward tile: query heads [head0, head0 + n_heads) of one key/value head
// times queries [query0, query0 + n_queries); row r is head head0 + r / n_queries, query
// query0 + r % n_queries.
struct Tile {
  int64_t b, kv_head, head0, n_heads, query0, n_queries;
  int64_t rows() const {
    return n_heads * n_queries;
  }
  int64_t head(int64_t r) const {
    return head0 + r / n_queries;
  }
  int64_t query(int64_t r) const {
    return query0 + r % n_queries;
  }
};

// One (batch, key/value head)'s keys and values as the forward's matmuls read them: keys
// transposed in blocks of kBlockN (block n0 / kBlockN is D x kBlockN at k_t + n0 D), values
// as fp32 rows (the tensor's own rows when it is fp32). Filled block by block as tiles
// need more keys, and reused by the tiles of the same head that a thread runs in a row.
template <typename scalar_t>
struct PackedKeys {
  int64_t b = -1, kv_head = -1, packed = 0;
  std::vector<float> k_t, v;

  // Makes keys [0, key_end) of (b, kv_head) available.
  void prepare(
      const Problem& p, int64_t batch, int64_t head, int64_t key_end, const scalar_t* k, Strides k_strides,
      const scalar_t* values, Strides v_strides) {
    if (batch != b || head != kv_head) {
      b = batch;
      kv_head = head;
      packed = 0;
      k_t.resize(round_up(p.seqlen_k) * p.head_dim);
      v.resize(std::is_same_v<scalar_t, float> ? 0 : p.seqlen_k * p.head_dim_v);  // fp32: read in place
    }
    const scalar_t* k_head = k + k_strides.at(b, kv_head, 0);
    const scalar_t* v_head = values + v_strides.at(b, kv_head, 0);
    for (; packed < key_end; packed += kBlockN) {
      const int64_t n = std::min(kBlockN, p.seqlen_k - packed);
      float* k_t_block = k_t.data() + packed * p.head_dim;
      load_transposed(k_head + packed * k_strides.row, k_strides.row, n, p.head_dim, k_t_block, kBlockN);
      if constexpr (!std::is_same_v<scalar_t, float>) {
        float* v_rows = v.data() + packed * p.head_dim_v;
        load_rows(v_head + packed * v_strides.row, v_strides.row, n, p.head_dim_v, v_rows, p.head_dim_v);
      }
    }
  }

  // The values as fp32 rows: (key 0's row, the distance between rows).
  std::pair<const float*, int64_t> value_rows(const Problem& p, const scalar_t* values, Strides v_strides) const {
    if constexpr (std::is_same_v<scalar_t, float>) {
      return {values + v_strides.at(b, kv_head, 0), v_strides.row};
    } else {
      return {v.data(), p.head_dim_v};
    }
  }

  static int64_t round_up(int64_t keys) {
    return (keys + kBlockN - 1) / kBlockN * kBlockN;
  }
};

template <typename scalar_t>
struct ForwardBuffers {
  std::vector<float> q, s, acc, acc_part, max, sum, alpha, dropout;
  PackedKeys<scalar_t> keys;
  explicit ForwardBuffers(const Problem& p)
      : q(kBlockM * p.head_dim),
        s(kBlockM * kBlockN),
        acc(kBlockM * p.head_dim_v),
        acc_part(kBlockM * p.head_dim_v),
        max(kBlockM),
        sum(kBlockM),
        alpha(kBlockM),
        dropout(p.dropout_p > 0 ? kBlockN : 0) {}
};

template <typename scalar_t>
void forward_tile(
    const Problem& p, const Tile& tile, const scalar_t* q, Strides q_strides, const scalar_t* k, Strides k_strides,
    const scalar_t* v, Strides v_strides, scalar_t* out, float* lse, ForwardBuffers<scalar_t>& buf) {
  const int64_t rows = tile.rows();
  const int64_t d = p.head_dim;
  const int64_t dv = p.head_dim_v;
  int64_t key_end = 0;  // no row sees keys at or past it
  for (int64_t r = 0; r < rows; ++r) {
    load_rows(q + q_strides.at(tile.b, tile.head(r), tile.query(r)), 0, 1, d, buf.q.data() + r * d, d);
    key_end = std::max(key_end, p.visible_keys(tile.b, tile.query(r)));
  }
  std::fill(buf.acc.begin(), buf.acc.begin() + rows * dv, 0.0f);
  std::fill(buf.max.begin(), buf.max.end(), -FLT_MAX);  // not -inf: a row of only -inf then rescales by exp(0)
  std::fill(buf.sum.begin(), buf.sum.end(), 0.0f);
  buf.keys.prepare(p, tile.b, tile.kv_head, key_end, k, k_strides, v, v_strides);
  const auto [values, values_ld] = buf.keys.value_rows(p, v, v_strides);

  for (int64_t n0 = 0; n0 < key_end; n0 += kBlockN) {
    const int64_t n = std::min(kBlockN, key_end - n0);
    std::fill(buf.s.begin(), buf.s.begin() + rows * kBlockN, 0.0f);
    matmul_add(buf.q.data(), d, 1, buf.keys.k_t.data() + n0 * d, kBlockN, buf.s.data(), kBlockN, rows, n, d);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = tile.head(r);
      const int64_t i = tile.query(r);
      float* s = buf.s.data() + r * kBlockN;
      scale_and_limit(s, n, p.visible_keys(tile.b, i) - n0, p.scale);
      p.mask_row(tile.b, h, i).apply(s, n0, n);
      const float new_max = row_max(s, n, buf.max[r]);
      buf.alpha[r] = exp_nonpositive(buf.max[r] - new_max);  // rescales what the row has so far
      buf.sum[r] = buf.sum[r] * buf.alpha[r] + exp_in_place(s, n, new_max);
      buf.max[r] = new_max;
      if (p.dropout_p > 0) {
        dropout_factors(buf.dropout.data(), n, p.seed, p.dropout_offset(tile.b, h, i) + n0, p.dropout_p, p.keep_scale);
        multiply_rows(s, buf.dropout.data(), n);
      }
    }
    matmul_accumulate(
        buf.s.data(), kBlockN, 1, values + n0 * values_ld, values_ld, buf.acc.data(), dv, rows, dv, n, buf.alpha.data(),
        buf.acc_part.data());
  }
  // Rows that saw no key (sum = 0) get out = 0 and lse = +inf.
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t h = tile.head(r);
    const int64_t i = tile.query(r);
    const float sum = buf.sum[r];
    const int64_t row = (tile.b * p.heads + h) * p.seqlen_q + i;  // in (B, H, Lq)
    store_row_divided(buf.acc.data() + r * dv, dv, sum, out + row * dv);
    lse[row] = sum > 0 ? buf.max[r] + std::log(sum) : kInf;
  }
}

// Writes out (B, H, Lq, Dv) and lse (B, H, Lq), both contiguous.
void attention_forward(
    const Problem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  // Short query lengths pack several query heads of a group into one tile.
  const int64_t n_queries = std::min(p.seqlen_q, kBlockM);
  const int64_t heads_per_tile = std::clamp<int64_t>(kBlockM / std::max<int64_t>(n_queries, 1), 1, p.group());
  const int64_t query_blocks = (p.seqlen_q + n_queries - 1) / std::max<int64_t>(n_queries, 1);
  const int64_t head_blocks = (p.group() + heads_per_tile - 1) / heads_per_tile;
  const int64_t tiles = p.batch * p.kv_heads * head_blocks * query_blocks;
  if (p.seqlen_q == 0) {
    return;
  }
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_fwd_cpu", [&] {
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    float* lse_ptr = lse.data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      ForwardBuffers<scalar_t> buf(p);
      for (int64_t t = begin; t < end; ++t) {
        const int64_t query_block = t % query_blocks;
        const int64_t head_block = t / query_blocks % head_blocks;
        const int64_t kv_head = t / (query_blocks * head_blocks) % p.kv_heads;
        const int64_t b = t / (query_blocks * head_blocks * p.kv_heads);
        const int64_t head0 = kv_head * p.group() + head_block * heads_per_tile;
        const int64_t query0 = query_block * n_queries;
        const Tile tile{
            b, kv_head, head0, std::min(heads_per_tile, (kv_head + 1) * p.group() - head0), query0,
            std::min(n_queries, p.seqlen_q - query0)};
        forward_tile(p, tile, q_ptr, Strides(q), k_ptr, Strides(k), v_ptr, Strides(v), out_ptr, lse_ptr, buf);
      }
    });
  });
}

std::tuple<at::Tensor, at::Tensor> attention_fwd_cpu(
    const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const std::optional<at::Tensor>& mask,
    bool is_causal, int64_t causal_shift, double scale, double dropout_p, int64_t seed) {
  check_attention_args("attention_fwd", q, k, v, mask);
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_forward(make_problem(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed), q, k, v, out, lse);
  return {out, lse};
}

// ---------------------------------------------------------------------------------------
// Backward.

struct BackwardBuffers {
  std::vector<float> k_t, k, v_t, dk, dv, q, grad_out, p, dp, dropout, scratch;
  explicit BackwardBuffers(const Problem& p)
      : k_t(p.head_dim * kBlockN),
        k(kBlockN * p.head_dim),
        v_t(p.head_dim_v * kBlockN),
        dk(kBlockN * p.head_dim),
        dv(kBlockN * p.head_dim_v),
        q(kBlockM * p.head_dim),
        grad_out(kBlockM * p.head_dim_v),
        p(kBlockM * kBlockN),
        dp(kBlockM * kBlockN),
        dropout(p.dropout_p > 0 ? kBlockM * kBlockN : 0),
        scratch(std::max(kBlockM, kBlockN) * std::max(p.head_dim, p.head_dim_v)) {}
};

// delta (B, H, Lq) = rowsum(grad_out * out), in fp32.
template <typename scalar_t>
void softmax_deltas(const Problem& p, const at::Tensor& grad_out, const at::Tensor& out, float* delta) {
  const scalar_t* g = grad_out.const_data_ptr<scalar_t>();
  const scalar_t* o = out.const_data_ptr<scalar_t>();
  const Strides gs(grad_out), os(out);
  const int64_t rows = p.batch * p.heads * p.seqlen_q;
  const int64_t grain = std::max<int64_t>(1, at::internal::GRAIN_SIZE / std::max<int64_t>(1, p.head_dim_v));
  at::parallel_for(0, rows, grain, [&](int64_t begin, int64_t end) {
    for (int64_t row = begin; row < end; ++row) {
      const int64_t i = row % p.seqlen_q;
      const int64_t h = row / p.seqlen_q % p.heads;
      const int64_t b = row / (p.seqlen_q * p.heads);
      const scalar_t* g_row = g + gs.at(b, h, i);
      const scalar_t* o_row = o + os.at(b, h, i);
      float sum = 0.0f;
      for (int64_t x = 0; x < p.head_dim_v; ++x) {
        sum += static_cast<float>(g_row[x]) * static_cast<float>(o_row[x]);
      }
      delta[row] = sum;
    }
  });
}

// dK, dV of key block [n0, n0 + n) of (b, kv_head), and its part of dQ added into dq_acc
// ((B, H, Lq, D) fp32).
template <typename scalar_t>
void backward_key_block(
    const Problem& p, int64_t b, int64_t kv_head, int64_t n0, int64_t n, const scalar_t* q, Strides q_strides,
    const scalar_t* k, Strides k_strides, const scalar_t* v, Strides v_strides, const scalar_t* grad_out,
    Strides g_strides, const float* lse, const float* delta, float* dq_acc, scalar_t* dk, scalar_t* dv,
    BackwardBuffers& buf) {
  const int64_t d = p.head_dim;
  const int64_t dv_dim = p.head_dim_v;
  const scalar_t* k_rows = k + k_strides.at(b, kv_head, n0);
  const scalar_t* v_rows = v + v_strides.at(b, kv_head, n0);
  load_transposed(k_rows, k_strides.row, n, d, buf.k_t.data(), kBlockN);
  load_rows(k_rows, k_strides.row, n, d, buf.k.data(), d);
  load_transposed(v_rows, v_strides.row, n, dv_dim, buf.v_t.data(), kBlockN);
  std::fill(buf.dk.begin(), buf.dk.end(), 0.0f);
  std::fill(buf.dv.begin(), buf.dv.end(), 0.0f);
  // Queries before first_query see none of these keys (causal): their blocks are skipped.
  const int64_t first_query = p.causal ? std::clamp<int64_t>(n0 - p.shift[b], 0, p.seqlen_q) : 0;
  for (int64_t h = kv_head * p.group(); h < (kv_head + 1) * p.group(); ++h) {
    for (int64_t i0 = first_query; i0 < p.seqlen_q; i0 += kBlockM) {
      const int64_t m = std::min(kBlockM, p.seqlen_q - i0);
      const int64_t row0 = (b * p.heads + h) * p.seqlen_q + i0;  // in (B, H, Lq)
      load_rows(q + q_strides.at(b, h, i0), q_strides.row, m, d, buf.q.data(), d);
      load_rows(grad_out + g_strides.at(b, h, i0), g_strides.row, m, dv_dim, buf.grad_out.data(), dv_dim);
      // P = exp(s - lse), dropped to Z P for dV; dP = (dO V^T) Z.
      std::fill(buf.p.begin(), buf.p.begin() + m * kBlockN, 0.0f);
      std::fill(buf.dp.begin(), buf.dp.begin() + m * kBlockN, 0.0f);
      matmul_add(buf.q.data(), d, 1, buf.k_t.data(), kBlockN, buf.p.data(), kBlockN, m, n, d);
      matmul_add(buf.grad_out.data(), dv_dim, 1, buf.v_t.data(), kBlockN, buf.dp.data(), kBlockN, m, n, dv_dim);
      for (int64_t r = 0; r < m; ++r) {
        float* s = buf.p.data() + r * kBlockN;
        scale_and_limit(s, n, p.visible_keys(b, i0 + r) - n0, p.scale);
        p.mask_row(b, h, i0 + r).apply(s, n0, n);
        exp_in_place(s, n, lse[row0 + r]);
        if (p.dropout_p > 0) {
          float* z = buf.dropout.data() + r * kBlockN;
          dropout_factors(z, n, p.seed, p.dropout_offset(b, h, i0 + r) + n0, p.dropout_p, p.keep_scale);
          multiply_rows(buf.dp.data() + r * kBlockN, z, n);
          multiply_rows(z, s, n);  // z <- Z P
        }
      }
      const float* dropped = p.dropout_p > 0 ? buf.dropout.data() : buf.p.data();
      matmul_accumulate(
          dropped, 1, kBlockN, buf.grad_out.data(), dv_dim, buf.dv.data(), dv_dim, n, dv_dim, m, nullptr,
          buf.scratch.data());
      for (int64_t r = 0; r < m; ++r) {
        softmax_grad_row(buf.p.data() + r * kBlockN, buf.dp.data() + r * kBlockN, n, delta[row0 + r], p.scale);
      }
      // dP now holds scale dS.
      matmul_accumulate(
          buf.dp.data(), 1, kBlockN, buf.q.data(), d, buf.dk.data(), d, n, d, m, nullptr, buf.scratch.data());
      matmul_accumulate(
          buf.dp.data(), kBlockN, 1, buf.k.data(), d, dq_acc + row0 * d, d, m, d, n, nullptr, buf.scratch.data());
    }
  }
  const int64_t kv_row0 = (b * p.kv_heads + kv_head) * p.seqlen_k + n0;  // in (B, H_kv, Lk)
  for (int64_t j = 0; j < n; ++j) {
    store_row(buf.dk.data() + j * d, d, dk + (kv_row0 + j) * d);
    store_row(buf.dv.data() + j * dv_dim, dv_dim, dv + (kv_row0 + j) * dv_dim);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> attention_bwd_cpu(
    const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse, const std::optional<at::Tensor>& mask, bool is_causal, int64_t causal_shift, double scale,
    double dropout_p, int64_t seed) {
  check_attention_args("attention_bwd", q, k, v, mask);
  check_attention_bwd_args(grad_out, q, v, out, lse);
  const Problem p = make_problem(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed);
  at::Tensor dk = at::empty(k.sizes(), k.options());
  at::Tensor dv = at::empty(v.sizes(), v.options());
  // Enough chunks of key blocks per key/value head for every thread to have work.
  const int64_t key_blocks = (p.seqlen_k + kBlockN - 1) / kBlockN;
  const int64_t kv_pairs = p.batch * p.kv_heads;
  const int64_t chunks = std::clamp<int64_t>(
      (at::get_num_threads() + kv_pairs - 1) / std::max<int64_t>(kv_pairs, 1), 1, std::max<int64_t>(key_blocks, 1));
  const int64_t blocks_per_chunk = (key_blocks + chunks - 1) / chunks;
  at::Tensor dq_acc = at::zeros({chunks, p.batch, p.heads, p.seqlen_q, p.head_dim}, q.options().dtype(at::kFloat));
  at::Tensor delta = at::empty({p.batch, p.heads, p.seqlen_q}, q.options().dtype(at::kFloat));
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "attention_bwd_cpu", [&] {
    softmax_deltas<scalar_t>(p, grad_out, out, delta.data_ptr<float>());
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
    scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
    scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
    float* dq_acc_ptr = dq_acc.data_ptr<float>();
    const float* lse_ptr = lse.const_data_ptr<float>();
    const float* delta_ptr = delta.const_data_ptr<float>();
    const int64_t dq_chunk_size = p.batch * p.heads * p.seqlen_q * p.head_dim;
    at::parallel_for(0, kv_pairs * chunks, 1, [&](int64_t begin, int64_t end) {
      BackwardBuffers buf(p);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task % chunks;
        const int64_t kv_head = task / chunks % p.kv_heads;
        const int64_t b = task / (chunks * p.kv_heads);
        const int64_t stop = std::min(key_blocks, (chunk + 1) * blocks_per_chunk);
        for (int64_t block = chunk * blocks_per_chunk; block < stop; ++block) {
          const int64_t n0 = block * kBlockN;
          backward_key_block(
              p, b, kv_head, n0, std::min(kBlockN, p.seqlen_k - n0), q_ptr, Strides(q), k_ptr, Strides(k), v_ptr,
              Strides(v), g_ptr, Strides(grad_out), lse_ptr, delta_ptr, dq_acc_ptr + chunk * dq_chunk_size, dk_ptr,
              dv_ptr, buf);
        }
      }
    });
  });
  at::Tensor dq = chunks == 1 ? dq_acc[0] : dq_acc.sum(0);
  return {dq.to(q.scalar_type()), dk, dv};
}

// ---------------------------------------------------------------------------------------
// Decoding over a KV cache.

at::Tensor attention_with_kv_cache_fwd_cpu(
    const at::Tensor& q, at::Tensor& k_cache, at::Tensor& v_cache, const at::Tensor& cache_seqlens,
    const std::optional<at::Tensor>& k_new, const std::optional<at::Tensor>& v_new, double scale) {
  check_kv_cache_args(q, k_cache, v_cache, cache_seqlens, k_new, v_new);
  const int64_t capacity = k_cache.size(2);
  const int64_t new_len = k_new.has_value() ? k_new->size(2) : 0;
  const at::Tensor lengths = cache_seqlens.to(at::kLong).contiguous();
  Problem p = make_problem(q, k_cache, v_cache, std::nullopt, /*is_causal=*/true, /*causal_shift=*/0, scale, 0.0, 0);
  for (int64_t b = 0; b < p.batch; ++b) {
    const int64_t length = lengths.const_data_ptr<int64_t>()[b];
    TORCH_CHECK_VALUE(
        length >= 0 && length + new_len <= capacity, "cache_seqlens[", b, "] = ", length, ": with ", new_len,
        " new keys the sequence must fit in the cache's ", capacity, " positions, and its length must be >= 0");
    p.kv_len[b] = length + new_len;
    p.shift[b] = p.kv_len[b] - p.seqlen_q;  // bottom-right alignment: the last query sees the last key
  }
  if (new_len > 0) {
    for (auto [cache, update] : {std::pair{k_cache, *k_new}, std::pair{v_cache, *v_new}}) {
      for (int64_t b = 0; b < p.batch; ++b) {
        const int64_t length = lengths.const_data_ptr<int64_t>()[b];
        cache[b].narrow(1, length, new_len).copy_(update[b]);
      }
    }
  }
  at::Tensor out = at::empty({q.size(0), q.size(1), q.size(2), v_cache.size(3)}, q.options());
  at::Tensor lse = at::empty({q.size(0), q.size(1), q.size(2)}, q.options().dtype(at::kFloat));
  attention_forward(p, q, k_cache, v_cache, out, lse);
  return out;
}

}  // namespace

TORCH_LIBRARY_IMPL(lmkern, CPU, m) {
  m.impl("attention_fwd", &attention_fwd_cpu);
  m.impl("attention_bwd", &attention_bwd_cpu);
  m.impl("attention_with_kv_cache_fwd", &attention_with_kv_cache_fwd_cpu);
}

}  // namespace lmkern
