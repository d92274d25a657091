// Flash attention on CPU: the FlashAttention-2 algorithm on the platform's primitives, CPU
// BLAS for the matmuls and ATen's vectorised math (at::vec) for the softmax.
//
// Included once by each attention_kernel_<isa>.cpp, which names the instruction set
// (LMKERN_ATTENTION_AVX512, LMKERN_ATTENTION_AVX2, or neither for any CPU): at::vec is a
// header library whose vector width is chosen when it is compiled, so the kernels are
// compiled once per instruction set, as torch compiles its own CPU kernels, and
// attention_kernels() picks the one torch uses. Everything this file compiles for an
// instruction set has internal linkage or lives in at::vec's namespace for it
// (CPU_CAPABILITY): no function another translation unit might share is compiled with
// instructions the CPU may lack.
//
// The matmuls are at::native::cpublas::brgemm, the micro-kernel torch's CPU flash
// attention uses (oneDNN's, generated for the CPU; torch's BLAS gemm where oneDNN is
// absent): C (+)= A B on row-major fp32 blocks. Its kernels are generated per shape and
// cached per thread, so every block a call multiplies has one shape: blocks are padded
// with zeros to the call's block sizes, which depend on the sequence lengths and head dims
// only. Inputs are converted to fp32 once as they are packed; all arithmetic is fp32.
//
// Forward: at::parallel_for over tiles of query rows (batch x key/value head x query
// heads x query block). For each block of keys, S = Q K^T is one matmul (the keys packed
// transposed, once per key/value head and thread), an online softmax per row turns S into
// P (running max m, running sum l of exp(s - m), the output accumulator rescaled by
// exp(m_old - m_new)), and O += P V is another. Only out and lse = m + log l leave the
// tile. When Lq is short (decoding), the query heads that share a key/value head are
// packed as rows of one tile. Causal tiles skip the key blocks no row sees, and are
// ordered so that each thread's share of them costs the same; key blocks a key-padding
// mask hides entirely are skipped.
//
// Backward, with P = exp(s - lse) recomputed from the saved lse, Z the dropout factor and
// delta_i = sum_d dO_id O_id:
//   dV = (P Z)^T dO,  dP = (dO V^T) Z,  dS = P (dP - delta),  dQ = scale dS K,  dK = scale dS^T Q.
// at::parallel_for over (batch x key/value head x chunk of key blocks): each task owns its
// keys' dK and dV, loops over the query heads of its group and the query blocks that see
// its keys, and adds dS K into its chunk's own fp32 dQ buffer; the buffers are summed at
// the end (one chunk, and so no sum, unless there are fewer key/value heads than threads).
// It works on transposed blocks, keys as rows: S^T = K Q^T and dP^T = V dO^T, then dV +=
// (P Z)^T dO, dK += dS^T Q and dQ^T += K^T dS^T, so that every operand is a row-major
// block packed once per task (the query side, transposed too, once per task and head).
// Every value has one writer: no atomics, and for a given thread count the results are
// deterministic.
//
// Block sizes (forward_blocks, backward_blocks) are tuning constants, not limits: other
// sizes change the results only by rounding. Memory beyond inputs and outputs is O(L D):
// tiles, a thread's keys and values in fp32, the query side of a head, and the fp32 dQ
// buffer(s).
#include <ATen/ATen.h>
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <ATen/native/CPUBlas.h>

#include <algorithm>
#include <cfloat>
#include <cmath>
#include <limits>
#include <tuple>
#include <utility>
#include <vector>

#include "../philox.h"
#include "attention_kernel.h"

// What at::vec includes besides itself, included first so that it is compiled for any CPU.
#if defined(__x86_64__)
#include <immintrin.h>
#endif
#include <ATen/NumericUtils.h>
#include <ATen/native/Math.h>
#include <ATen/native/cpu/zmath.h>
#include <ATen/native/quantized/AffineQuantizerBase.h>
#include <c10/util/BFloat16-math.h>
#include <c10/util/copysign.h>
#include <c10/util/qint32.h>
#include <c10/util/qint8.h>
#include <c10/util/quint8.h>

// The instruction sets are those torch's CPU capabilities of the same names compile for.
// In C++ the target pragma leaves the compiler's macros for the instruction set unset
// (files are read before pragmas take effect), so they are set here as the matching
// -m flags would: sleef.h, which at::vec calls for exp, declares its vector functions
// only where they say the instructions exist.
#if defined(LMKERN_ATTENTION_AVX512)
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX__ 1
#define __AVX2__ 1
#define __AVX512F__ 1
#define CPU_CAPABILITY_AVX512
#define CPU_CAPABILITY lmkern_avx512
#elif defined(LMKERN_ATTENTION_AVX2)
#pragma GCC push_options
#pragma GCC target("avx2,fma,f16c,bmi,bmi2,lzcnt,popcnt")
#define __AVX__ 1
#define __AVX2__ 1
#define CPU_CAPABILITY_AVX2
#define CPU_CAPABILITY lmkern_avx2
#else
#define CPU_CAPABILITY lmkern_default
#endif
#include <ATen/cpu/vec/functional.h>
#include <ATen/cpu/vec/vec.h>

// float, float16 and bfloat16 inputs.
#define LMKERN_DISPATCH_ATTENTION_TYPES(TYPE, NAME, ...) \
  AT_DISPATCH_SWITCH(                                    \
      TYPE, NAME, AT_DISPATCH_CASE(at::kFloat, __VA_ARGS__) AT_DISPATCH_CASE_REDUCED_FLOATING_TYPES(__VA_ARGS__))

namespace lmkern {
namespace {

using Vec = at::vec::Vectorized<float>;
constexpr int64_t kLanes = Vec::size();
constexpr float kInf = std::numeric_limits<float>::infinity();

// ---------------------------------------------------------------------------------------
// Block sizes.

// n split into blocks of at most `most`, as even as multiples of `multiple` allow:
// (block, blocks).
std::pair<int64_t, int64_t> split(int64_t n, int64_t most, int64_t multiple) {
  const int64_t blocks = std::max<int64_t>(1, (n + most - 1) / most);
  const int64_t block = ((std::max<int64_t>(n, 1) + blocks - 1) / blocks + multiple - 1) / multiple * multiple;
  return {block, (n + block - 1) / block};
}

// The forward's most query rows per tile and keys per block, for a head dim.
struct ForwardBlocks {
  int64_t queries, keys;
};
ForwardBlocks forward_blocks(int64_t head_dim) {
  return head_dim <= 64 ? ForwardBlocks{64, 256} : ForwardBlocks{64, 128};
}

// The backward's most keys and queries per block, for a head dim.
struct BackwardBlocks {
  int64_t keys, queries;
};
BackwardBlocks backward_blocks(int64_t head_dim) {
  return head_dim <= 64 ? BackwardBlocks{64, 128} : BackwardBlocks{64, 64};
}

// ---------------------------------------------------------------------------------------
// The primitives: matmul (CPU BLAS), conversions and vectorised row operations (at::vec).

// C (m x n, rows ldc apart) = A B, or += A B when `accumulate`; A (m x k) and B (k x n)
// row-major, rows lda and ldb apart.
void matmul(
    int64_t m, int64_t n, int64_t k, const float* a, int64_t lda, const float* b, int64_t ldb, float* c,
    int64_t ldc, bool accumulate) {
  at::native::cpublas::brgemm(m, n, k, lda, ldb, ldc, accumulate, a, b, c, /*is_vnni=*/false);
}

// rows x cols of x (rows row_stride apart) into out as fp32 (rows ld apart); rows up to
// `padded` are zero.
template <typename scalar_t>
void load_rows(
    const scalar_t* x, int64_t row_stride, int64_t rows, int64_t cols, float* out, int64_t ld, int64_t padded) {
  for (int64_t r = 0; r < rows; ++r) {
    at::vec::convert(x + r * row_stride, out + r * ld, cols);
  }
  std::fill(out + rows * ld, out + padded * ld, 0.0f);
}

template <typename scalar_t>
void store_row(const float* x, int64_t n, scalar_t* out) {
  at::vec::convert(x, out, n);
}

// out (cols x rows, rows ld apart) = the transpose of x (rows x cols, rows cols apart).
void transpose(const float* x, int64_t rows, int64_t cols, float* out, int64_t ld) {
  at::vec::transpose_mxn<float>(x, cols, out, ld, static_cast<int>(rows), static_cast<int>(cols));
}

// s_j <- scale s_j + bias_j (bias nullptr: 0) for j < n; returns max(init, max_j s_j).
float scale_and_max(float* s, const float* bias, int64_t n, float scale, float init) {
  const Vec vscale(scale);
  Vec vmax(init);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t lanes = std::min(kLanes, n - j);
    Vec x = Vec::loadu(s + j, lanes) * vscale;
    if (bias != nullptr) {
      x = x + Vec::loadu(bias + j, lanes);
    }
    x.store(s + j, lanes);
    vmax = at::vec::maximum(vmax, Vec::set(vmax, x, lanes));
  }
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return at::vec::maximum(a, b); }, vmax);
}

// s_j <- exp(s_j - shift) for j < n and 0 for n <= j < end; returns the sum over j < n.
float exp_and_sum(float* s, int64_t n, int64_t end, float shift) {
  const Vec vshift(shift);
  Vec sum(0.0f);
  for (int64_t j = 0; j < n; j += kLanes) {
    const int64_t lanes = std::min(kLanes, n - j);
    const Vec p = (Vec::loadu(s + j, lanes) - vshift).exp();
    p.store(s + j, lanes);
    sum = sum + Vec::set(Vec(0.0f), p, lanes);
  }
  std::fill(s + n, s + end, 0.0f);
  return at::vec::vec_reduce_all<float>([](Vec& a, Vec& b) { return a + b; }, sum);
}

// x_j <- factor x_j.
void scale_row(float* x, int64_t n, float factor) {
  at::vec::map([factor](Vec v) { return v * Vec(factor); }, x, x, n);
}

// sum_j x_j y_j.
float dot(const float* x, const float* y, int64_t n) {
  return at::vec::map2_reduce_all<float>(
      [](Vec a, Vec b) { return a * b; }, [](Vec a, Vec b) { return a + b; }, x, y, n);
}

// Backward, for a key row of the transposed blocks over queries c in [first, last):
// p_c = exp(scale s_c + offset + bias_c - lse_c) (bias nullptr: 0), 0 for the other c < m.
void probabilities_row(
    float* s, const float* bias, const float* lse, int64_t first, int64_t last, int64_t m, float scale,
    float offset) {
  const Vec vscale(scale), voffset(offset);
  std::fill(s, s + first, 0.0f);
  std::fill(s + last, s + m, 0.0f);
  for (int64_t c = first; c < last; c += kLanes) {
    const int64_t lanes = std::min(kLanes, last - c);
    Vec x = Vec::loadu(s + c, lanes) * vscale + voffset;
    if (bias != nullptr) {
      x = x + Vec::loadu(bias + c, lanes);
    }
    (x - Vec::loadu(lse + c, lanes)).exp().store(s + c, lanes);
  }
}

// dp_c <- scale p_c (dp_c - delta_c): the scores' gradient, times scale.
void softmax_grad_row(const float* p, float* dp, const float* delta, int64_t m, float scale) {
  at::vec::map3<float>(
      [scale](Vec pv, Vec dpv, Vec deltav) { return Vec(scale) * pv * (dpv - deltav); }, dp, p, dp, delta, m);
}

// y_c <- y_c z_c.
void multiply_row(float* y, const float* z, int64_t n) {
  at::vec::map2([](Vec a, Vec b) { return a * b; }, y, y, z, n);
}

// The dropout factors keep / (1 - p) or 0 of the elements at dropout offsets
// first + c stride for c < n (see ../philox.h).
void dropout_factors(const AttentionProblem& p, float* z, int64_t n, uint64_t first, uint64_t stride) {
#pragma omp simd
  for (int64_t c = 0; c < n; ++c) {
    z[c] = philox_uniform(p.seed, first + c * stride) >= p.dropout_p ? p.keep_scale : 0.0f;
  }
}

// The bias an element-wise mask adds at (b, h, i + c * di, j + c * dj), c < n: -inf or 0
// for a boolean mask, the value for an additive one.
void element_mask_bias(
    const AttentionProblem& p, int64_t b, int64_t h, int64_t i, int64_t j, int64_t di, int64_t dj, int64_t n,
    float* bias) {
  AT_DISPATCH_FLOATING_TYPES_AND3(at::kBool, at::kHalf, at::kBFloat16, p.mask_dtype, "attention_mask", [&] {
    const scalar_t* m = reinterpret_cast<const scalar_t*>(p.mask_element(b, h, i, j));
    const int64_t stride = di * p.mask_stride[2] + dj * p.mask_stride[3];
    for (int64_t c = 0; c < n; ++c) {
      if constexpr (std::is_same_v<scalar_t, bool>) {
        bias[c] = m[c * stride] ? 0.0f : -kInf;
      } else {
        bias[c] = static_cast<float>(m[c * stride]);
      }
    }
  });
}

// Whether a key-padding mask hides every key of [n0, n0 + n) from sequence b.
bool keys_hidden(const AttentionProblem& p, int64_t b, int64_t n0, int64_t n) {
  const float* bias = p.key_bias_row(b);
  return bias != nullptr && std::all_of(bias + n0, bias + n0 + n, [](float x) { return x == -kInf; });
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

// How a call's forward is cut: rows per tile (padded), keys per block.
struct ForwardShape {
  int64_t n_queries, query_blocks, heads_per_tile, head_blocks, tile_rows, block_keys, key_blocks;

  explicit ForwardShape(const AttentionProblem& p) {
    const ForwardBlocks most = forward_blocks(p.head_dim);
    std::tie(n_queries, query_blocks) = split(p.seqlen_q, most.queries, 1);
    // Short query lengths pack several query heads of a group into one tile.
    heads_per_tile = std::clamp<int64_t>(most.queries / n_queries, 1, p.group());
    head_blocks = (p.group() + heads_per_tile - 1) / heads_per_tile;
    tile_rows = heads_per_tile * n_queries;
    // Key blocks are cut for the longest sequence (the cache's filled part when decoding).
    const int64_t longest = *std::max_element(p.kv_len.begin(), p.kv_len.end());
    std::tie(block_keys, key_blocks) = split(longest, most.keys, 16);
  }
};

// One (batch, key/value head)'s keys and values as the forward's matmuls read them, fp32
// and zero past the sequence, block by block: keys transposed (D x N), values as rows.
// Where a head has several tiles (longer queries, or more query heads than a tile holds),
// the blocks are kept for the tiles of the same head that a thread runs in a row; where it
// has one (decoding), one block's room is reused, so that the call allocates no O(L D)
// buffers, whose pages it would fault in anew at every decoding step.
template <typename scalar_t>
struct PackedKeys {
  bool keep;
  int64_t b = -1, kv_head = -1, packed = 0;  // kept: the blocks of keys [0, packed) are packed
  std::vector<float> k_t, v, rows;

  PackedKeys(const AttentionProblem& p, const ForwardShape& shape)
      : keep(shape.query_blocks * shape.head_blocks > 1),
        k_t((keep ? shape.key_blocks : 1) * shape.block_keys * p.head_dim),
        v((keep ? shape.key_blocks : 1) * shape.block_keys * p.head_dim_v),
        rows(shape.block_keys * p.head_dim) {}

  // The block of keys [n0, n0 + N) of (batch, head): (K^T, D x N; V, N x Dv).
  std::pair<const float*, const float*> block(
      const AttentionProblem& p, const ForwardShape& shape, int64_t batch, int64_t head, int64_t n0,
      const scalar_t* k, Strides k_strides, const scalar_t* values, Strides v_strides) {
    if (!keep) {
      pack(p, shape, batch, head, n0, 0, k, k_strides, values, v_strides);
      return {k_t.data(), v.data()};
    }
    if (batch != b || head != kv_head) {
      b = batch;
      kv_head = head;
      packed = 0;
    }
    for (; packed <= n0; packed += shape.block_keys) {
      pack(p, shape, batch, head, packed, packed, k, k_strides, values, v_strides);
    }
    return {k_t.data() + n0 * p.head_dim, v.data() + n0 * p.head_dim_v};
  }

 private:
  // Packs the block of keys [n0, n0 + N) at key offset `slot` of the buffers.
  void pack(
      const AttentionProblem& p, const ForwardShape& shape, int64_t batch, int64_t head, int64_t n0, int64_t slot,
      const scalar_t* k, Strides k_strides, const scalar_t* values, Strides v_strides) {
    const int64_t block = shape.block_keys;
    const int64_t n = std::clamp<int64_t>(p.seen_keys(batch) - n0, 0, block);
    load_rows(k + k_strides.at(batch, head, n0), k_strides.row, n, p.head_dim, rows.data(), p.head_dim, block);
    transpose(rows.data(), block, p.head_dim, k_t.data() + slot * p.head_dim, block);
    const scalar_t* v_rows = values + v_strides.at(batch, head, n0);
    load_rows(v_rows, v_strides.row, n, p.head_dim_v, v.data() + slot * p.head_dim_v, p.head_dim_v, block);
  }
};

struct ForwardBuffers {
  std::vector<float> q, s, acc, max, sum, bias, dropout;
  ForwardBuffers(const AttentionProblem& p, const ForwardShape& shape)
      : q(shape.tile_rows * p.head_dim),
        s(shape.tile_rows * shape.block_keys),
        acc(shape.tile_rows * p.head_dim_v),
        max(shape.tile_rows),
        sum(shape.tile_rows),
        bias(p.mask != nullptr ? shape.block_keys : 0),
        dropout(p.dropout_p > 0 ? shape.block_keys : 0) {}
};

template <typename scalar_t>
void forward_tile(
    const AttentionProblem& p, const ForwardShape& shape, const Tile& tile, const scalar_t* q, Strides q_strides,
    const scalar_t* k, Strides k_strides, const scalar_t* v, Strides v_strides, scalar_t* out, float* lse,
    ForwardBuffers& buf, PackedKeys<scalar_t>& keys) {
  const int64_t rows = tile.rows();
  const int64_t d = p.head_dim;
  const int64_t dv = p.head_dim_v;
  const int64_t block = shape.block_keys;
  int64_t key_begin = p.kv_len[tile.b];  // no row sees keys before it (a sliding window's)
  int64_t key_end = 0;  // no row sees keys at or past it
  for (int64_t r = 0; r < rows; ++r) {
    const scalar_t* q_row = q + q_strides.at(tile.b, tile.head(r), tile.query(r));
    load_rows(q_row, 0, 1, d, buf.q.data() + r * d, d, 1);
    key_begin = std::min(key_begin, p.first_visible_key(tile.b, tile.query(r)));
    key_end = std::max(key_end, p.visible_keys(tile.b, tile.query(r)));
  }
  std::fill(buf.q.begin() + rows * d, buf.q.end(), 0.0f);  // padding rows, whose results are unused
  std::fill(buf.acc.begin(), buf.acc.end(), 0.0f);
  std::fill(buf.max.begin(), buf.max.end(), -FLT_MAX);  // not -inf: a row of only -inf then rescales by exp(0)
  std::fill(buf.sum.begin(), buf.sum.end(), 0.0f);
  const float* key_bias = p.key_bias_row(tile.b);

  for (int64_t n0 = key_begin / block * block; n0 < key_end; n0 += block) {
    const int64_t n = std::min(block, key_end - n0);
    if (keys_hidden(p, tile.b, n0, n)) {
      continue;
    }
    const auto [k_t, values] = keys.block(p, shape, tile.b, tile.kv_head, n0, k, k_strides, v, v_strides);
    matmul(shape.tile_rows, block, d, buf.q.data(), d, k_t, block, buf.s.data(), block, false);
    for (int64_t r = 0; r < rows; ++r) {
      const int64_t h = tile.head(r);
      const int64_t i = tile.query(r);
      // The row sees keys n0 + [first, visible) of the block; its other probabilities are 0.
      const int64_t first = std::clamp<int64_t>(p.first_visible_key(tile.b, i) - n0, 0, n);
      const int64_t visible = std::clamp<int64_t>(p.visible_keys(tile.b, i) - n0, 0, n);
      float* row = buf.s.data() + r * block;
      if (visible <= first) {
        std::fill(row, row + block, 0.0f);
        continue;
      }
      std::fill(row, row + first, 0.0f);
      float* s = row + first;
      const int64_t seen = visible - first;
      const float* bias = key_bias != nullptr ? key_bias + n0 + first : nullptr;
      if (p.mask != nullptr) {
        element_mask_bias(p, tile.b, h, i, n0 + first, 0, 1, seen, buf.bias.data());
        if (bias != nullptr) {  // a relative bias beside a key-padding mask: both add
          at::vec::map2([](Vec x, Vec y) { return x + y; }, buf.bias.data(), buf.bias.data(), bias, seen);
        }
        bias = buf.bias.data();
      }
      const float new_max = scale_and_max(s, bias, seen, p.scale, buf.max[r]);
      const float alpha = std::exp(buf.max[r] - new_max);  // rescales what the row has so far
      buf.sum[r] = buf.sum[r] * alpha + exp_and_sum(s, seen, block - first, new_max);
      buf.max[r] = new_max;
      if (alpha != 1.0f) {
        scale_row(buf.acc.data() + r * dv, dv, alpha);
      }
      if (p.dropout_p > 0) {
        dropout_factors(p, buf.dropout.data(), seen, p.dropout_offset(tile.b, h, i, n0 + first), 1);
        multiply_row(s, buf.dropout.data(), seen);
      }
    }
    matmul(shape.tile_rows, dv, block, buf.s.data(), block, values, dv, buf.acc.data(), dv, true);
  }
  // Rows that saw no key (sum = 0) get out = 0 and lse = +inf.
  for (int64_t r = 0; r < rows; ++r) {
    const float sum = buf.sum[r];
    float* acc = buf.acc.data() + r * dv;
    scale_row(acc, dv, sum > 0 ? 1.0f / sum : 0.0f);
    const int64_t row = (tile.b * p.heads + tile.head(r)) * p.seqlen_q + tile.query(r);  // in (B, H, Lq)
    store_row(acc, dv, out + row * dv);
    lse[row] = sum > 0 ? buf.max[r] + std::log(sum) : kInf;
  }
}

void attention_forward(
    const AttentionProblem& p, const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& out,
    const at::Tensor& lse) {
  if (p.seqlen_q == 0) {
    return;
  }
  const ForwardShape shape(p);
  const int64_t tiles = p.batch * p.kv_heads * shape.head_blocks * shape.query_blocks;
  LMKERN_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "attention_fwd_cpu", [&] {
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    scalar_t* out_ptr = out.data_ptr<scalar_t>();
    float* lse_ptr = lse.data_ptr<float>();
    at::parallel_for(0, tiles, 1, [&](int64_t begin, int64_t end) {
      ForwardBuffers buf(p, shape);
      PackedKeys<scalar_t> keys(p, shape);
      for (int64_t t = begin; t < end; ++t) {
        // Query blocks in the order first, last, second, second to last...: under a causal
        // mask, where later blocks see more keys, any run of them then costs about the same.
        const int64_t nth = t % shape.query_blocks;
        const int64_t query_block = nth % 2 == 0 ? nth / 2 : shape.query_blocks - 1 - nth / 2;
        const int64_t head_block = t / shape.query_blocks % shape.head_blocks;
        const int64_t kv_head = t / (shape.query_blocks * shape.head_blocks) % p.kv_heads;
        const int64_t b = t / (shape.query_blocks * shape.head_blocks * p.kv_heads);
        const int64_t head0 = kv_head * p.group() + head_block * shape.heads_per_tile;
        const int64_t query0 = query_block * shape.n_queries;
        const Tile tile{
            b, kv_head, head0, std::min(shape.heads_per_tile, (kv_head + 1) * p.group() - head0), query0,
            std::min(shape.n_queries, p.seqlen_q - query0)};
        forward_tile(
            p, shape, tile, q_ptr, Strides(q), k_ptr, Strides(k), v_ptr, Strides(v), out_ptr, lse_ptr, buf, keys);
      }
    });
  });
}

// ---------------------------------------------------------------------------------------
// Backward.

// How a call's backward is cut: keys per block, queries per block, chunks of key blocks.
struct BackwardShape {
  int64_t block_keys, key_blocks, block_queries, query_blocks, padded_queries, chunks;

  explicit BackwardShape(const AttentionProblem& p) {
    const BackwardBlocks most = backward_blocks(p.head_dim);
    std::tie(block_keys, key_blocks) = split(p.seqlen_k, most.keys, 16);
    std::tie(block_queries, query_blocks) = split(p.seqlen_q, most.queries, 1);
    padded_queries = block_queries * query_blocks;
    // Enough chunks of key blocks per key/value head for every thread to have work.
    const int64_t kv_pairs = p.batch * p.kv_heads;
    chunks = std::clamp<int64_t>(
        (at::get_num_threads() + kv_pairs - 1) / std::max<int64_t>(kv_pairs, 1), 1, std::max<int64_t>(key_blocks, 1));
  }
};

// The query side of one (batch, head), fp32 and zero past Lq (padded_queries rows): q and
// grad_out as rows and transposed, lse (+inf past Lq, so that p = 0 there) and delta.
struct QuerySide {
  std::vector<float> q, q_t, g, g_t, o, lse, delta;
  QuerySide(const AttentionProblem& p, const BackwardShape& shape)
      : q(shape.padded_queries * p.head_dim),
        q_t(q.size()),
        g(shape.padded_queries * p.head_dim_v),
        g_t(g.size()),
        o(p.head_dim_v),
        lse(shape.padded_queries),
        delta(shape.padded_queries) {}

  template <typename scalar_t>
  void pack(
      const AttentionProblem& p, const BackwardShape& shape, int64_t b, int64_t h, const scalar_t* q_in,
      Strides q_strides, const scalar_t* g_in, Strides g_strides, const scalar_t* out, Strides o_strides,
      const float* lse_in) {
    const int64_t lq = p.seqlen_q, d = p.head_dim, dv = p.head_dim_v, padded = shape.padded_queries;
    load_rows(q_in + q_strides.at(b, h, 0), q_strides.row, lq, d, q.data(), d, padded);
    transpose(q.data(), padded, d, q_t.data(), padded);
    load_rows(g_in + g_strides.at(b, h, 0), g_strides.row, lq, dv, g.data(), dv, padded);
    transpose(g.data(), padded, dv, g_t.data(), padded);
    const int64_t row0 = (b * p.heads + h) * lq;  // in (B, H, Lq)
    for (int64_t i = 0; i < lq; ++i) {
      load_rows(out + o_strides.at(b, h, i), 0, 1, dv, o.data(), dv, 1);
      delta[i] = dot(g.data() + i * dv, o.data(), dv);
      lse[i] = lse_in[row0 + i];
    }
    std::fill(lse.begin() + lq, lse.end(), kInf);
    std::fill(delta.begin() + lq, delta.end(), 0.0f);
  }
};

// A task's keys and values, fp32 and zero past Lk: rows, and keys transposed per block
// (D x N); and the fp32 accumulators of their gradients.
struct KeySide {
  std::vector<float> k, k_t, v, dk, dv;
  KeySide(const AttentionProblem& p, int64_t keys)
      : k(keys * p.head_dim), k_t(k.size()), v(keys * p.head_dim_v), dk(k.size()), dv(v.size()) {}
};

struct PairBuffers {
  std::vector<float> s, dp, pz, bias, dropout;
  PairBuffers(const AttentionProblem& p, const BackwardShape& shape)
      : s(shape.block_keys * shape.block_queries),
        dp(s.size()),
        pz(p.dropout_p > 0 ? s.size() : 0),
        bias(p.mask != nullptr ? shape.block_queries : 0),
        dropout(p.dropout_p > 0 ? shape.block_queries : 0) {}
};

// One (key block, query block) pair of head h, keys as rows: P^T into buf.s ((P Z)^T into
// buf.pz with dropout) and ds_scale dS^T into buf.dp, zero for keys the block's queries do
// not see and for padding. k (N x D) and v (N x Dv) are the key block's rows.
void pair_score_grads(
    const AttentionProblem& p, const BackwardShape& shape, int64_t b, int64_t h, int64_t n0, int64_t i0,
    const QuerySide& qs, const float* k, const float* v, float ds_scale, PairBuffers& buf) {
  const int64_t d = p.head_dim, d_v = p.head_dim_v;
  const int64_t n = shape.block_keys, m = shape.block_queries, ld = shape.padded_queries;
  // S^T = K Q^T and dP^T = V dO^T, keys as rows.
  matmul(n, m, d, k, d, qs.q_t.data() + i0, ld, buf.s.data(), m, false);
  matmul(n, m, d_v, v, d_v, qs.g_t.data() + i0, ld, buf.dp.data(), m, false);
  const float* key_bias = p.key_bias_row(b);
  const float* lse = qs.lse.data() + i0;
  const float* delta = qs.delta.data() + i0;
  for (int64_t r = 0; r < n; ++r) {
    const int64_t j = n0 + r;
    float* s = buf.s.data() + r * m;
    float* dp = buf.dp.data() + r * m;
    float* pz = p.dropout_p > 0 ? buf.pz.data() + r * m : s;
    // Queries [first, last) of the block see key j: all, or from j - shift on when causal,
    // and up to a sliding window's bound.
    const int64_t first = p.causal ? std::clamp<int64_t>(j - p.shift[b] - i0, 0, m) : 0;
    const int64_t last = std::clamp<int64_t>(p.seeing_queries(b, j) - i0, first, m);
    const float offset = key_bias != nullptr && j < p.seqlen_k ? key_bias[j] : 0.0f;
    if (j >= p.seqlen_k || first == last || offset == -kInf) {  // padding, or a key no query of the block sees
      std::fill(s, s + m, 0.0f);
      std::fill(pz, pz + m, 0.0f);
      std::fill(dp, dp + m, 0.0f);
      continue;
    }
    const float* bias = nullptr;
    if (p.mask != nullptr) {
      const int64_t queries = std::clamp<int64_t>(p.seqlen_q - i0 - first, 0, last - first);
      std::fill(buf.bias.begin(), buf.bias.end(), 0.0f);
      element_mask_bias(p, b, h, i0 + first, j, 1, 0, queries, buf.bias.data() + first);
      bias = buf.bias.data();
    }
    probabilities_row(s, bias, lse, first, last, m, p.scale, offset);
    if (p.dropout_p > 0) {
      float* z = buf.dropout.data();
      dropout_factors(p, z, m, p.dropout_offset(b, h, i0, j), static_cast<uint64_t>(p.seqlen_k));
      multiply_row(dp, z, m);
      at::vec::map2([](Vec a, Vec b) { return a * b; }, pz, s, z, m);
    }
    softmax_grad_row(s, dp, delta, m, ds_scale);
  }
}

// One (key block, query block) pair of head h: adds to the key block's dK and dV (at
// dk, dv) and to the query block's dQ^T (dq_t, rows padded_queries apart).
void backward_pair(
    const AttentionProblem& p, const BackwardShape& shape, int64_t b, int64_t h, int64_t n0, int64_t i0,
    const QuerySide& qs, const float* k, const float* k_t, const float* v, float* dk, float* dv, float* dq_t,
    PairBuffers& buf) {
  const int64_t d = p.head_dim, d_v = p.head_dim_v;
  const int64_t n = shape.block_keys, m = shape.block_queries, ld = shape.padded_queries;
  pair_score_grads(p, shape, b, h, n0, i0, qs, k, v, p.scale, buf);  // buf.dp: scale dS^T
  matmul(n, d_v, m, p.dropout_p > 0 ? buf.pz.data() : buf.s.data(), m, qs.g.data() + i0 * d_v, d_v, dv, d_v, true);
  matmul(n, d, m, buf.dp.data(), m, qs.q.data() + i0 * d, d, dk, d, true);
  matmul(d, m, n, k_t, n, buf.dp.data(), m, dq_t + i0, ld, true);
}

// The rows of keys and values [n0, n0 + N) of (b, kv_head) into k (N x D) and v (N x Dv),
// fp32 and zero past the keys sequence b's queries may see.
template <typename scalar_t>
void load_key_block(
    const AttentionProblem& p, const BackwardShape& shape, int64_t b, int64_t kv_head, int64_t n0,
    const scalar_t* k_in, Strides k_strides, const scalar_t* v_in, Strides v_strides, float* k, float* v) {
  const int64_t n = shape.block_keys;
  const int64_t keys = std::clamp<int64_t>(p.seen_keys(b) - n0, 0, n);
  load_rows(k_in + k_strides.at(b, kv_head, n0), k_strides.row, keys, p.head_dim, k, p.head_dim, n);
  load_rows(v_in + v_strides.at(b, kv_head, n0), v_strides.row, keys, p.head_dim_v, v, p.head_dim_v, n);
}

// [begin, end): the query blocks of sequence b (begin a multiple of block_queries) that
// may see keys [n0, n0 + N); empty where a key-padding mask hides them all. Queries before
// begin (causal) or from end on (a sliding window) see none of them.
std::pair<int64_t, int64_t> queries_seeing(const AttentionProblem& p, const BackwardShape& shape, int64_t b, int64_t n0) {
  const int64_t keys = std::min(shape.block_keys, p.seqlen_k - n0);
  if (keys_hidden(p, b, n0, keys)) {
    return {0, 0};
  }
  const int64_t first_query = p.causal ? std::clamp<int64_t>(n0 - p.shift[b], 0, p.seqlen_q) : 0;
  return {first_query / shape.block_queries * shape.block_queries, p.seeing_queries(b, n0 + keys - 1)};
}

void attention_backward(
    const AttentionProblem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dq, const at::Tensor& dk,
    const at::Tensor& dv) {
  const BackwardShape shape(p);
  const int64_t n = shape.block_keys;
  const int64_t d = p.head_dim, d_v = p.head_dim_v;
  // dQ^T per chunk, (chunks, B, H, D, padded_queries): the transposed blocks' dQ.
  at::Tensor dq_t = at::zeros({shape.chunks, p.batch, p.heads, d, shape.padded_queries}, q.options().dtype(at::kFloat));
  LMKERN_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "attention_bwd_cpu", [&] {
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    const float* lse_ptr = lse.const_data_ptr<float>();
    scalar_t* dk_ptr = dk.data_ptr<scalar_t>();
    scalar_t* dv_ptr = dv.data_ptr<scalar_t>();
    float* dq_t_ptr = dq_t.data_ptr<float>();
    const Strides k_strides(k), v_strides(v);
    at::parallel_for(0, p.batch * p.kv_heads * shape.chunks, 1, [&](int64_t begin, int64_t end) {
      QuerySide qs(p, shape);
      PairBuffers buf(p, shape);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t chunk = task % shape.chunks;
        const int64_t kv_head = task / shape.chunks % p.kv_heads;
        const int64_t b = task / (shape.chunks * p.kv_heads);
        // The chunk's key blocks: every chunks-th, so that under a causal mask the chunks
        // (whose blocks see fewer queries the later they are) cost about the same.
        std::vector<int64_t> blocks;
        for (int64_t block = chunk; block < shape.key_blocks; block += shape.chunks) {
          blocks.push_back(block);
        }
        KeySide ks(p, blocks.size() * n);
        for (size_t x = 0; x < blocks.size(); ++x) {
          load_key_block(
              p, shape, b, kv_head, blocks[x] * n, k_ptr, k_strides, v_ptr, v_strides, ks.k.data() + x * n * d,
              ks.v.data() + x * n * d_v);
          transpose(ks.k.data() + x * n * d, n, d, ks.k_t.data() + x * n * d, n);
        }
        for (int64_t h = kv_head * p.group(); h < (kv_head + 1) * p.group(); ++h) {
          qs.pack(p, shape, b, h, q_ptr, Strides(q), g_ptr, Strides(grad_out), out_ptr, Strides(out), lse_ptr);
          float* dq_head = dq_t_ptr + ((chunk * p.batch + b) * p.heads + h) * d * shape.padded_queries;
          for (size_t x = 0; x < blocks.size(); ++x) {
            const int64_t n0 = blocks[x] * n;
            const auto [query_begin, query_end] = queries_seeing(p, shape, b, n0);  // the others' blocks are skipped
            for (int64_t i0 = query_begin; i0 < query_end; i0 += shape.block_queries) {
              backward_pair(
                  p, shape, b, h, n0, i0, qs, ks.k.data() + x * n * d, ks.k_t.data() + x * n * d,
                  ks.v.data() + x * n * d_v, ks.dk.data() + x * n * d, ks.dv.data() + x * n * d_v, dq_head, buf);
            }
          }
        }
        for (size_t x = 0; x < blocks.size(); ++x) {
          const int64_t n0 = blocks[x] * n;
          const int64_t kv_row0 = (b * p.kv_heads + kv_head) * p.seqlen_k + n0;  // in (B, H_kv, Lk)
          for (int64_t j = 0; j < std::min(n, p.seqlen_k - n0); ++j) {
            store_row(ks.dk.data() + (x * n + j) * d, d, dk_ptr + (kv_row0 + j) * d);
            store_row(ks.dv.data() + (x * n + j) * d_v, d_v, dv_ptr + (kv_row0 + j) * d_v);
          }
        }
      }
    });
  });
  const at::Tensor total = shape.chunks == 1 ? dq_t[0] : dq_t.sum(0);
  dq.copy_(total.narrow(3, 0, p.seqlen_q).transpose(2, 3));
}

// The gradient of an additive mask, dmask = dS = P (dP - delta), summed over the
// dimensions of (B, H, Lq, Lk) where dmask (fp32, contiguous) has size 1: the mask's own
// shape, e.g. T5's relative position bias (1, H, Lq, Lk), shared by the batch.
//
// A pass of its own, after the backward, so that the sum needs no (B, H, Lq, Lk) buffer
// and no two threads add into one element: at::parallel_for over the tiles of dmask, one
// per (batch, head) of dmask and, where it spans the keys, per key block. A task recomputes
// P^T and dS^T (pair_score_grads, keys as rows) for every (batch, head, query block) its
// tile gathers, in a fixed order, into its own fp32 accumulator: the tile's keys x Lq, or
// one row or column of sums where dmask spans one key or one query. Each element so has
// one writer and one order of additions, whatever the thread count. The price is the two
// matmuls of S^T and dP^T again per pair of blocks; memory beyond dmask is O(L D) per thread.
//
// A relative bias's gradient (dmask 2-D, (H | 1, Lq + Lk - 1)) is the tile of a (1, H | 1,
// Lq, Lk) mask, summed along its diagonals: a task writes its key block's Lq + N - 1
// diagonal sums to a buffer of its own, and these are added into dmask after the tasks,
// in a fixed order.
void attention_mask_backward(
    const AttentionProblem& p, const at::Tensor& grad_out, const at::Tensor& q, const at::Tensor& k,
    const at::Tensor& v, const at::Tensor& out, const at::Tensor& lse, const at::Tensor& dmask) {
  const BackwardShape shape(p);
  const int64_t n = shape.block_keys, m = shape.block_queries;
  const bool relative = dmask.dim() == 2;
  const int64_t mask_batch = relative ? 1 : dmask.size(0), mask_heads = dmask.size(relative ? 0 : 1);
  const int64_t mask_queries = relative ? p.seqlen_q : dmask.size(2);
  const int64_t mask_keys = relative ? p.seqlen_k : dmask.size(3);
  const int64_t key_tiles = mask_keys > 1 ? shape.key_blocks : 1;
  // A relative bias's diagonal sums, per task: key key0 + r and query i lie on diagonal r - i + Lq - 1.
  const int64_t diagonals = n + p.seqlen_q - 1;
  std::vector<float> diagonal_sums(relative ? mask_heads * key_tiles * diagonals : 0);
  // The accumulator, keys as rows (n, or 1 summing them) and queries as columns (padded_queries, or 1).
  const int64_t acc_rows = mask_keys > 1 ? n : 1;
  const int64_t acc_cols = mask_queries > 1 ? shape.padded_queries : 1;
  LMKERN_DISPATCH_ATTENTION_TYPES(q.scalar_type(), "attention_mask_bwd_cpu", [&] {
    const scalar_t* q_ptr = q.const_data_ptr<scalar_t>();
    const scalar_t* k_ptr = k.const_data_ptr<scalar_t>();
    const scalar_t* v_ptr = v.const_data_ptr<scalar_t>();
    const scalar_t* g_ptr = grad_out.const_data_ptr<scalar_t>();
    const scalar_t* out_ptr = out.const_data_ptr<scalar_t>();
    const float* lse_ptr = lse.const_data_ptr<float>();
    float* dmask_ptr = dmask.data_ptr<float>();
    const Strides k_strides(k), v_strides(v);
    at::parallel_for(0, mask_batch * mask_heads * key_tiles, 1, [&](int64_t begin, int64_t end) {
      QuerySide qs(p, shape);
      PairBuffers buf(p, shape);
      std::vector<float> keys(n * p.head_dim), values(n * p.head_dim_v), acc(acc_rows * acc_cols);
      for (int64_t task = begin; task < end; ++task) {
        const int64_t key_tile = task % key_tiles;
        const int64_t mask_head = task / key_tiles % mask_heads;
        const int64_t mask_b = task / (key_tiles * mask_heads);
        // What the tile gathers: every batch, head and key block that dmask spans with one.
        const int64_t b_begin = mask_batch > 1 ? mask_b : 0, b_end = mask_batch > 1 ? mask_b + 1 : p.batch;
        const int64_t h_begin = mask_heads > 1 ? mask_head : 0, h_end = mask_heads > 1 ? mask_head + 1 : p.heads;
        const int64_t block_begin = mask_keys > 1 ? key_tile : 0;
        const int64_t block_end = mask_keys > 1 ? key_tile + 1 : shape.key_blocks;
        std::fill(acc.begin(), acc.end(), 0.0f);
        for (int64_t b = b_begin; b < b_end; ++b) {
          for (int64_t h = h_begin; h < h_end; ++h) {
            qs.pack(p, shape, b, h, q_ptr, Strides(q), g_ptr, Strides(grad_out), out_ptr, Strides(out), lse_ptr);
            for (int64_t block = block_begin; block < block_end; ++block) {
              const int64_t n0 = block * n;
              const auto [query_begin, query_end] = queries_seeing(p, shape, b, n0);
              if (query_begin >= query_end) {
                continue;  // no query sees these keys: dS is 0
              }
              load_key_block(
                  p, shape, b, h / p.group(), n0, k_ptr, k_strides, v_ptr, v_strides, keys.data(), values.data());
              for (int64_t i0 = query_begin; i0 < query_end; i0 += m) {
                pair_score_grads(p, shape, b, h, n0, i0, qs, keys.data(), values.data(), 1.0f, buf);  // buf.dp: dS^T
                for (int64_t r = 0; r < n; ++r) {
                  const float* ds = buf.dp.data() + r * m;
                  float* row = acc.data() + (acc_rows > 1 ? r : 0) * acc_cols;
                  if (acc_cols > 1) {
                    at::vec::map2([](Vec x, Vec y) { return x + y; }, row + i0, row + i0, ds, m);
                  } else {
                    row[0] += at::vec::reduce_all<float>([](Vec& x, Vec& y) { return x + y; }, ds, m);
                  }
                }
              }
            }
          }
        }
        const int64_t key0 = mask_keys > 1 ? key_tile * n : 0;
        const int64_t tile_keys = mask_keys > 1 ? std::min(n, p.seqlen_k - key0) : 1;
        if (relative) {
          float* sums = diagonal_sums.data() + task * diagonals;
          for (int64_t i = 0; i < mask_queries; ++i) {
            for (int64_t r = 0; r < tile_keys; ++r) {
              sums[r - i + p.seqlen_q - 1] += acc[r * acc_cols + i];
            }
          }
          continue;
        }
        // The tile, transposed into dmask's (query, key) rows.
        float* tile = dmask_ptr + (mask_b * mask_heads + mask_head) * mask_queries * mask_keys;
        for (int64_t i = 0; i < mask_queries; ++i) {
          for (int64_t r = 0; r < tile_keys; ++r) {
            tile[i * mask_keys + key0 + r] = acc[r * acc_cols + i];
          }
        }
      }
    });
  });
  // The key blocks' diagonal sums, in order: key block t's start at dmask's column t N.
  for (int64_t task = 0; task < static_cast<int64_t>(diagonal_sums.size()) / diagonals; ++task) {
    const int64_t key0 = task % key_tiles * n;
    float* row = dmask.data_ptr<float>() + task / key_tiles * dmask.size(1) + key0;
    const float* sums = diagonal_sums.data() + task * diagonals;
    const int64_t count = std::min(n, p.seqlen_k - key0) + p.seqlen_q - 1;
    for (int64_t c = 0; c < count; ++c) {
      row[c] += sums[c];
    }
  }
}

}  // namespace
}  // namespace lmkern

#if defined(LMKERN_ATTENTION_AVX512) || defined(LMKERN_ATTENTION_AVX2)
#pragma GCC pop_options
#endif

namespace lmkern {
namespace {
constexpr AttentionKernels kAttentionKernels{&attention_forward, &attention_backward, &attention_mask_backward};
}  // namespace

#if defined(LMKERN_ATTENTION_AVX512)
const AttentionKernels* attention_kernels_avx512() {
#elif defined(LMKERN_ATTENTION_AVX2)
const AttentionKernels* attention_kernels_avx2() {
#else
const AttentionKernels* attention_kernels_default() {
#endif
  return &kAttentionKernels;
}

}  // namespace lmkern
