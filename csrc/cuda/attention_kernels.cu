// Flash attention on tensor cores (FlashAttention-2): forward, backward and KV-cache decoding.
//
// Math, for one (batch, query head), S = scale q k^T with masked entries at -inf, P = softmax(S):
//   forward   out = P v and lse_i = log sum_j exp(S_ij), one key block at a time with the online
//             softmax: a running row max m, sum l = sum exp(S - m) and acc = sum exp(S - m) v,
//             rescaled by exp(m_old - m_new) when the max grows; out = acc / l, lse = m + log l.
//             Exponentials are taken in base 2 of S log2(e) (one ex2 instruction each).
//   backward  P = exp(S - lse) recomputed from the saved lse, delta_i = sum_d dout_id out_id, then
//             dv = P^T dout,  dP = dout v^T,  dS = P (dP - delta),  dq = scale dS k,  dk = scale dS^T q.
//   decoding  the new keys and values are appended to the caches, then the forward runs over
//             each sequence's valid length with its keys split across programs (flash-decoding):
//             split s yields out_s (normalised over its keys) and lse_s, and the combine takes
//             lse = log sum_s exp(lse_s) and out = sum_s exp(lse_s - lse) out_s.
// A row that sees no key gets out = 0 and lse = +inf, where torch's softmax gives NaN. +inf (as
// flash-attn and lmkern's reference) makes backward's exp(S - lse) = 0 for every key, so the
// row's gradients are 0 with no special case. A split that sees no key writes lse_s = -inf,
// which weighs nothing in the combine.
//
// Design. Each warp owns 16 rows of its program's output tile and runs its products with
// mma.sync m16n8k16 (fp16/bf16 operands, fp32 accumulators), operands read from shared memory
// with ldmatrix. mma.sync rather than WMMA: the online softmax must know which rows and
// columns of the score tile each thread holds, which WMMA leaves unspecified and the PTX ISA
// fixes for mma.sync; the score accumulators then become the A operand of the next product in
// registers, with no shared-memory round trip. Not Hopper's wgmma: its asynchronous
// warpgroup pipeline could not be validated without a GPU, and sm_80 needs this path anyway.
// Tiles are copied with cp.async into rows padded by 16 bytes and double-buffered: block i + 1
// is in flight while block i is computed. The backward's dk/dv kernel computes S^T = k q^T
// (its warps own key rows), so that P^T and dS^T are A operands in registers too.
//
// Kernels, in file order: attention_fwd_kernel (forward, and decoding with the query heads of a
// key/value head packed into its rows), attention_append_kernel and attention_combine_kernel
// (decoding), attention_delta_kernel, attention_dkdv_kernel and attention_dq_kernel (backward).
//
// m16n8k16 fragments (PTX ISA, "Matrix Fragments for mma.m16n8k16"), lane = 4 g + t:
//   A 16x16  registers a[0..3] of 2 elements each: a[0] (row g, cols 2t, 2t+1), a[1] (row g+8,
//            cols 2t, 2t+1), a[2] (row g, cols 2t+8, 2t+9), a[3] (row g+8, cols 2t+8, 2t+9)
//   B 16x8   registers b0 (rows 2t, 2t+1, col g) and b1 (rows 2t+8, 2t+9, col g)
//   C 16x8   4 floats: c0, c1 (row g, cols 2t, 2t+1), c2, c3 (row g+8, cols 2t, 2t+1)
// A warp's 16 x N accumulator tile is float acc[N / 8][4]: acc[nb][r] is row g + 8 (r / 2),
// column 8 nb + 2t + r % 2. Its columns 16 kk .. 16 kk + 15 are exactly A fragment kk:
// (acc[2kk][0, 1], acc[2kk][2, 3], acc[2kk+1][0, 1], acc[2kk+1][2, 3]).
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <type_traits>

#include "attention_kernels.h"
#include "common.cuh"
#include "rotary.cuh"

namespace lmkern::cuda {
namespace {

constexpr float kLog2e = 1.4426950408889634f;
constexpr float kLn2 = 0.6931471805599453f;
constexpr int kBlockKeys = 64;  // key rows per block in the forward, decoding and dq kernels

// ---------------------------------------------------------------------------------------------
// PTX wrappers

__device__ __forceinline__ uint32_t shared_address(const void* pointer) {
  return static_cast<uint32_t>(__cvta_generic_to_shared(pointer));
}

// Copies 16 bytes from global to shared memory without passing through registers; when !valid it
// reads nothing (src-size 0) and writes 16 zero bytes. src must be a valid address either way.
__device__ __forceinline__ void cp_async_16(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 16 : 0));
}

__device__ __forceinline__ void cp_async_4(void* dst, const void* src, bool valid) {
  asm volatile("cp.async.ca.shared.global [%0], [%1], 4, %2;\n" ::"r"(shared_address(dst)), "l"(src),
               "r"(valid ? 4 : 0));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::: "memory"); }

// Waits until at most `pending` of this thread's committed groups are still in flight.
template <int pending>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(pending) : "memory");
}

// Four 8x8 matrices of 16-bit elements: lanes 8i .. 8i+7 give the addresses of matrix i's rows,
// and register i receives matrix i's row lane / 4, columns 2 (lane % 4) and 2 (lane % 4) + 1.
__device__ __forceinline__ void ldmatrix_x4(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// The same, transposed: register i receives matrix i's column lane / 4, rows 2 (lane % 4), +1.
__device__ __forceinline__ void ldmatrix_x4_trans(uint32_t (&r)[4], const void* row) {
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(shared_address(row)));
}

// c (16x8) += a (16x16) b (16x8).
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const uint32_t (&a)[4], uint32_t b0, uint32_t b1) {
  if constexpr (std::is_same_v<T, __half>) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    static_assert(std::is_same_v<T, __nv_bfloat16>);
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two floats rounded to T in one register, `low` in the low half (the lower column of a fragment).
template <typename T>
__device__ __forceinline__ uint32_t pack_pair(float low, float high) {
  if constexpr (std::is_same_v<T, __half>) {
    const __half2 pair = __floats2half2_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  } else {
    const __nv_bfloat162 pair = __floats2bfloat162_rn(low, high);
    return *reinterpret_cast<const uint32_t*>(&pair);
  }
}

// ---------------------------------------------------------------------------------------------
// Shared-memory tiles: rows of D elements padded by 8 (16 bytes). Rows are then 16 bytes apart
// modulo 128, so the 8 rows of an ldmatrix matrix, and the 8 chunks a quarter-warp's cp.async
// writes, fall in 8 distinct groups of 4 banks: no bank conflicts.

template <int D>
constexpr int kRowStride = D + 8;

// Rows row0, row0 + 1, ... of one (batch, head) slab of a strided tensor; those at or past `end`
// are outside the tensor (nullptr).
template <typename T>
struct SlabRows {
  T* slab;
  int64_t stride;
  int row0;
  int end;

  __device__ __forceinline__ T* operator()(int r) const {
    return row0 + r < end ? slab + (row0 + r) * stride : nullptr;
  }
};

template <typename T>
__device__ __forceinline__ SlabRows<T> slab_rows(const StridedTensor& t, int64_t b, int64_t h, int row0, int end) {
  return {static_cast<T*>(t.data) + b * t.batch + h * t.head, t.row, row0, end};
}

// Starts copying a kRows x D tile into shared memory in 16-byte chunks spread over the block.
// row_src(r) is the global address of row r, or nullptr for a row outside the tensor, which is
// filled with zeros (any_row, a valid address, is then handed to the copy).
template <int kRows, int D, int kThreads, typename T, typename RowSource>
__device__ __forceinline__ void load_tile(T* tile, const RowSource& row_src, const T* any_row) {
  constexpr int kChunks = kRows * D / 8;
#pragma unroll
  for (int i = 0; i < (kChunks + kThreads - 1) / kThreads; ++i) {
    const int chunk = i * kThreads + threadIdx.x;
    if (kChunks % kThreads == 0 || chunk < kChunks) {
      const int r = chunk / (D / 8);
      const int column = chunk % (D / 8) * 8;
      const T* src = row_src(r);
      cp_async_16(tile + r * kRowStride<D> + column, src ? src + column : any_row, src != nullptr);
    }
  }
}

template <int kRows, int D, int kThreads, typename T>
__device__ __forceinline__ void load_tile(T* tile, const SlabRows<const T>& rows) {
  load_tile<kRows, D, kThreads>(tile, rows, rows.slab);
}

// Starts copying src[0, n) (fp32) into dst[0, kN), zeros past n (n >= 1: src is valid).
template <int kN, int kThreads>
__device__ __forceinline__ void load_vector(float* dst, const float* src, int n) {
  for (int i = threadIdx.x; i < kN; i += kThreads) {
    cp_async_4(dst + i, i < n ? src + i : src, i < n);
  }
}

// Two stages of key and value tiles, kBlockKeys rows each (the forward's and dq's stream).
template <typename T, int D>
struct KeyValueStages {
  T* k;  // [2][kBlockKeys][kRowStride<D>]
  T* v;  // [2][kBlockKeys][kRowStride<D>]

  __device__ __forceinline__ T* k_tile(int stage) const { return k + stage * kBlockKeys * kRowStride<D>; }
  __device__ __forceinline__ T* v_tile(int stage) const { return v + stage * kBlockKeys * kRowStride<D>; }

  // Starts copying keys and values [n0, n0 + kBlockKeys) of (b, kv_head), zeros past seqlen_k.
  template <int kThreads>
  __device__ __forceinline__ void load(int stage, const AttentionParams& p, int64_t b, int64_t kv_head, int n0,
                                       int seqlen_k) const {
    load_tile<kBlockKeys, D, kThreads>(k_tile(stage), slab_rows<const T>(p.k, b, kv_head, n0, seqlen_k));
    load_tile<kBlockKeys, D, kThreads>(v_tile(stage), slab_rows<const T>(p.v, b, kv_head, n0, seqlen_k));
  }
};

// Runs compute(i % 2, i) for i in [0, n) on double-buffered shared tiles: load((i + 1) % 2, i + 1)
// is in flight while block i is computed from the other stage. Copies issued before the call
// (tiles loaded once) join block 0's group. On return every copy has landed and all threads are
// past the loop, so the tiles may be reused.
template <typename Load, typename Compute>
__device__ __forceinline__ void pipeline(int n, const Load& load, const Compute& compute) {
  if (n > 0) load(0, 0);
  cp_async_commit();
  for (int i = 0; i < n; ++i) {
    if (i + 1 < n) load((i + 1) % 2, i + 1);
    cp_async_commit();  // possibly empty, so that "all but the newest group" is always block i's
    cp_async_wait<1>();
    __syncthreads();  // block i, copied by every thread, is visible to all
    compute(i % 2, i);
    __syncthreads();  // every read of this stage is done before iteration i + 1 refills it
  }
  cp_async_wait<0>();
  __syncthreads();
}

// ---------------------------------------------------------------------------------------------
// Warp-level products on 16-row tiles

// Row and column of acc[nb][r] in the warp's 16 x N accumulator tile.
__device__ __forceinline__ int fragment_row(int r) { return threadIdx.x % 32 / 4 + r / 2 * 8; }
__device__ __forceinline__ int fragment_column(int nb, int r) { return nb * 8 + threadIdx.x % 4 * 2 + r % 2; }

// The A operand (16 x D) of a warp's product, read from 16 consecutive rows of a shared tile at
// each k step. Lanes 0-15 address rows 0-15 at column 16 kk, lanes 16-31 the same rows at
// 16 kk + 8: matrices (rows 0-7, +0), (8-15, +0), (0-7, +8), (8-15, +8) are a[0], a[1], a[2], a[3].
template <typename T, int D>
struct SharedRows {
  const T* rows;

  __device__ __forceinline__ void fragment(int kk, uint32_t (&a)[4]) const {
    const int lane = threadIdx.x % 32;
    ldmatrix_x4(a, rows + lane % 16 * kRowStride<D> + kk * 16 + lane / 16 * 8);
  }
};

// The same operand held in registers (the forward's queries, read once per program).
template <typename T, int D>
struct RegisterRows {
  uint32_t frag[D / 16][4];

  __device__ __forceinline__ void load(const SharedRows<T, D>& rows) {
#pragma unroll
    for (int kk = 0; kk < D / 16; ++kk) rows.fragment(kk, frag[kk]);
  }

  __device__ __forceinline__ void fragment(int kk, uint32_t (&a)[4]) const {
#pragma unroll
    for (int i = 0; i < 4; ++i) a[i] = frag[kk][i];
  }
};

// acc (16 x kN) += A (16 x D) B^T, B^T's columns being the kN rows of shared tile b (D
// contiguous, as keys are for S = q k^T). Per 16 rows of b, lanes 0-7, 8-15, 16-23, 24-31
// address matrices (rows 0-7, +0), (0-7, +8), (8-15, +0), (8-15, +8): b0 and b1 of column
// block 2 nn, then b0 and b1 of column block 2 nn + 1.
template <typename T, int kN, int D, typename ASource>
__device__ __forceinline__ void mma_abt(float (&acc)[kN / 8][4], const ASource& a_source, const T* b) {
  const int lane = threadIdx.x % 32;
  const T* b_lane = b + (lane % 8 + lane / 16 * 8) * kRowStride<D> + lane / 8 % 2 * 8;
#pragma unroll
  for (int kk = 0; kk < D / 16; ++kk) {
    uint32_t a[4];
    a_source.fragment(kk, a);
#pragma unroll
    for (int nn = 0; nn < kN / 16; ++nn) {
      uint32_t bf[4];
      ldmatrix_x4(bf, b_lane + nn * 16 * kRowStride<D> + kk * 16);
      mma_16816<T>(acc[2 * nn], a, bf[0], bf[1]);
      mma_16816<T>(acc[2 * nn + 1], a, bf[2], bf[3]);
    }
  }
}

// acc (16 x D) += A (16 x kK) B, A in registers as fragments, B the kK rows of shared tile b
// (D contiguous, as values are for out = P v), read transposed. Per 16 rows of b, lanes 0-7,
// 8-15, 16-23, 24-31 address matrices (rows 0-7, +0), (8-15, +0), (0-7, +8), (8-15, +8):
// b0 and b1 of column block 2 nn, then b0 and b1 of column block 2 nn + 1.
template <typename T, int kK, int D>
__device__ __forceinline__ void mma_ab(float (&acc)[D / 8][4], const uint32_t (&a)[kK / 16][4], const T* b) {
  const int lane = threadIdx.x % 32;
  const T* b_lane = b + (lane % 8 + lane / 8 % 2 * 8) * kRowStride<D> + lane / 16 * 8;
#pragma unroll
  for (int kk = 0; kk < kK / 16; ++kk) {
#pragma unroll
    for (int nn = 0; nn < D / 16; ++nn) {
      uint32_t bf[4];
      ldmatrix_x4_trans(bf, b_lane + kk * 16 * kRowStride<D> + nn * 16);
      mma_16816<T>(acc[2 * nn], a[kk], bf[0], bf[1]);
      mma_16816<T>(acc[2 * nn + 1], a[kk], bf[2], bf[3]);
    }
  }
}

// The accumulator tile (16 x kN) rounded to T as the A fragments of the next product.
template <typename T, int kN>
__device__ __forceinline__ void to_a_fragments(const float (&acc)[kN / 8][4], uint32_t (&a)[kN / 16][4]) {
#pragma unroll
  for (int kk = 0; kk < kN / 16; ++kk) {
    a[kk][0] = pack_pair<T>(acc[2 * kk][0], acc[2 * kk][1]);
    a[kk][1] = pack_pair<T>(acc[2 * kk][2], acc[2 * kk][3]);
    a[kk][2] = pack_pair<T>(acc[2 * kk + 1][0], acc[2 * kk + 1][1]);
    a[kk][3] = pack_pair<T>(acc[2 * kk + 1][2], acc[2 * kk + 1][3]);
  }
}

template <int kBlocks>
__device__ __forceinline__ void scale_tile(float (&acc)[kBlocks][4], float factor) {
#pragma unroll
  for (int nb = 0; nb < kBlocks; ++nb) {
#pragma unroll
    for (int r = 0; r < 4; ++r) acc[nb][r] *= factor;
  }
}

// Sets to -inf the entries of the 16 x kN tile for which visible(row, column) is false.
template <int kN, typename Visible>
__device__ __forceinline__ void mask_tile(float (&s)[kN / 8][4], const Visible& visible) {
#pragma unroll
  for (int nb = 0; nb < kN / 8; ++nb) {
#pragma unroll
    for (int r = 0; r < 4; ++r) {
      if (!visible(fragment_row(r), fragment_column(nb, r))) s[nb][r] = -INFINITY;
    }
  }
}

// Across the 4 lanes that hold a row (4g .. 4g + 3).
__device__ __forceinline__ float quad_max(float x) {
  x = fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 1));
  return fmaxf(x, __shfl_xor_sync(0xffffffffu, x, 2));
}

__device__ __forceinline__ float quad_sum(float x) {
  x += __shfl_xor_sync(0xffffffffu, x, 1);
  return x + __shfl_xor_sync(0xffffffffu, x, 2);
}

// Writes the warp's accumulator tile (16 x D) to global rows row_dst(r) (nullptr: not written)
// in T, staged through `stage`, the warp's own 16 rows of a shared tile, so that the global
// writes are whole coalesced 16-byte chunks. The caller guarantees no other warp uses `stage`.
template <typename T, int D, typename RowDestination>
__device__ __forceinline__ void store_tile(const float (&acc)[D / 8][4], T* stage, const RowDestination& row_dst) {
  __syncwarp();  // the warp's earlier reads of `stage` are done
#pragma unroll
  for (int nb = 0; nb < D / 8; ++nb) {
#pragma unroll
    for (int r = 0; r < 4; r += 2) {
      *reinterpret_cast<uint32_t*>(stage + fragment_row(r) * kRowStride<D> + fragment_column(nb, r)) =
          pack_pair<T>(acc[nb][r], acc[nb][r + 1]);
    }
  }
  __syncwarp();
#pragma unroll
  for (int i = 0; i < 16 * D / 8 / 32; ++i) {
    const int chunk = i * 32 + threadIdx.x % 32;
    const int r = chunk / (D / 8);
    const int column = chunk % (D / 8) * 8;
    T* dst = row_dst(r);
    if (dst != nullptr) {
      *reinterpret_cast<Pack<T>*>(dst + column) = *reinterpret_cast<const Pack<T>*>(stage + r * kRowStride<D> + column);
    }
  }
}

// ---------------------------------------------------------------------------------------------
// Masks

// Whether query `query` sees key `key` of batch b: inside the lengths, not hidden by the key
// padding mask, for causal attention key <= query + shift (p.causal_shift: 0 for torch's
// top-left alignment; decoding: the cache length minus the new queries, aligning bottom-right),
// and with a sliding window key >= query + shift - window_left.
__device__ __forceinline__ bool visible(const AttentionParams& p, int64_t b, int query, int key, int seqlen_k,
                                        int shift) {
  return key < seqlen_k && query < p.seqlen_q && (!p.causal || key <= query + shift) &&
         (p.window_left < 0 || key >= query + shift - static_cast<int>(p.window_left)) &&
         (p.key_padding_mask == nullptr || p.key_padding_mask[b * p.mask_batch_stride + key]);
}

// Whether a sliding window hides some key at or past `first_key` from a query up to last_query:
// the tile of them then needs the per-element mask.
__device__ __forceinline__ bool window_cuts(const AttentionParams& p, int last_query, int first_key, int shift) {
  return p.window_left >= 0 && first_key < last_query + shift - static_cast<int>(p.window_left);
}

// Decoding: how many keys sequence b attends over (its cache length after the append), or -1
// when its new keys do not fit in the cache.
__device__ __forceinline__ int64_t decode_keys(const AttentionParams& p, int64_t b) {
  const int64_t cached = p.cache_seqlens_int64 ? static_cast<const int64_t*>(p.cache_seqlens)[b]
                                               : static_cast<const int32_t*>(p.cache_seqlens)[b];
  const int64_t total = cached + p.seqlen_new;
  return cached >= 0 && total <= p.seqlen_k ? total : -1;
}

__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// Key blocks [0, end) hold every key that queries up to last_query may see.
__device__ __forceinline__ int key_blocks_end(const AttentionParams& p, int last_query, int shift, int seqlen_k) {
  const int all = (seqlen_k + kBlockKeys - 1) / kBlockKeys;
  if (!p.causal) return all;
  const int last_key = last_query + shift;
  return last_key < 0 ? 0 : min(all, last_key / kBlockKeys + 1);
}

// Key blocks before begin hold no key that queries from first_query on may see (a sliding
// window's; 0 without one). It may pass key_blocks_end: then there is none to visit.
__device__ __forceinline__ int key_blocks_begin(const AttentionParams& p, int first_query, int shift) {
  if (p.window_left < 0) return 0;
  const int first_key = first_query + shift - static_cast<int>(p.window_left);
  return first_key <= 0 ? 0 : first_key / kBlockKeys;
}

// ---------------------------------------------------------------------------------------------
// Forward and decoding

// Decoding with rotary caches: a warp turns the pairs of its 16 rows of a shared query tile in
// place, row r at position position_of(r) (-1: a row past the queries, left as it is). Each lane
// owns both elements of its pairs, so no lane reads what another writes. Not inlined: inside
// the forward kernel's key loop its registers made attention_fwd_kernel<half|bf16, 64, 8>
// spill on sm_80 (scripts/check_cuda.py); the call is made once per program, not per key block.
template <typename T, int D, typename PositionOf>
__device__ __noinline__ void rotate_query_rows(const AttentionParams& p, T* rows, const PositionOf& position_of) {
  const int half = static_cast<int>(p.rotary_half);
  for (int item = threadIdx.x % 32; item < 16 * half; item += 32) {
    const int r = item / half;
    const int i = item % half;
    const int position = position_of(r);
    if (position < 0) continue;
    T* row = rows + r * kRowStride<D>;
    const PairColumns pair = rotary_pair_columns(i, half, p.rotary_interleaved);
    const float2 turned = rotate_pair(
        to_float(row[pair.first]), to_float(row[pair.second]),
        rotary_angle(p.rotary_cos, p.rotary_sin, half, p.rotary_max_positions, position, i));
    row[pair.first] = from_float<T>(turned.x);
    row[pair.second] = from_float<T>(turned.y);
  }
}

template <typename T, int D, int kWarps>
constexpr size_t fwd_shared_bytes() {
  return (16 * kWarps + 4 * kBlockKeys) * kRowStride<D> * sizeof(T);  // q, then 2 stages of k and v
}

// One program per (query block, head, batch) and split. In the forward (no cache_seqlens) tile
// row r is query m0 + r of head blockIdx.y. Decoding packs the `group` query heads that share
// key/value head blockIdx.y into the rows (row r is query (m0 + r) / group of head
// blockIdx.y * group + (m0 + r) % group), so the cache is read once per group; its key range is
// split over `num_splits` programs, each writing fp32 partials that the combine kernel merges.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32)
    attention_fwd_kernel(const AttentionParams p, const DecodeSplits splits) {
  constexpr int kBlockM = 16 * kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStride = kRowStride<D>;
  extern __shared__ __align__(16) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);  // [kBlockM][kStride]
  const KeyValueStages<T, D> kv{q_tile + kBlockM * kStride, q_tile + (kBlockM + 2 * kBlockKeys) * kStride};

  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  const int num_m_blocks = gridDim.x / splits.num_splits;
  // Causal programs with later queries have more keys: start them first, so the grid's tail is light.
  const int m0 = (num_m_blocks - 1 - static_cast<int>(blockIdx.x) / splits.num_splits) * kBlockM;
  const int split = blockIdx.x % splits.num_splits;
  const int64_t b = blockIdx.z;
  const bool decoding = p.cache_seqlens != nullptr;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int pack = decoding ? group : 1;
  const int64_t first_head = decoding ? blockIdx.y * static_cast<int64_t>(group) : blockIdx.y;
  const int64_t kv_head = decoding ? blockIdx.y : blockIdx.y / group;
  const int rows = static_cast<int>(p.seqlen_q) * pack;
  // -1: a decoded sequence whose new keys did not fit, which reads no key and gets NaN.
  const int64_t total_keys = decoding ? decode_keys(p, b) : p.seqlen_k;
  const int seqlen_k = static_cast<int>(max(total_keys, int64_t{0}));
  const int shift = decoding ? seqlen_k - static_cast<int>(p.seqlen_q) : static_cast<int>(p.causal_shift);
  const auto query_of = [&](int r) { return (m0 + r) / pack; };
  const auto head_of = [&](int r) { return first_head + (m0 + r) % pack; };

  // The splits share the key blocks [n_first, n_all) that some row of the tile may see.
  const int last_query = query_of(min(kBlockM, rows - m0) - 1);
  const int n_all = key_blocks_end(p, last_query, shift, seqlen_k);
  const int n_first = key_blocks_begin(p, query_of(0), shift);
  const int per_split = (max(0, n_all - n_first) + splits.num_splits - 1) / splits.num_splits;
  const int n_begin = n_first + split * per_split;
  const int n_blocks = max(0, min(n_all, n_begin + per_split) - n_begin);

  const T* q = static_cast<const T*>(p.q.data) + b * p.q.batch;
  load_tile<kBlockM, D, kThreads>(
      q_tile, [&](int r) { return m0 + r < rows ? q + head_of(r) * p.q.head + query_of(r) * p.q.row : nullptr; }, q);
  const auto load_kv = [&](int stage, int i) {
    kv.template load<kThreads>(stage, p, b, kv_head, (n_begin + i) * kBlockKeys, seqlen_k);
  };

  RegisterRows<T, D> q_fragments;
  float acc[D / 8][4] = {};
  float row_max[2] = {-INFINITY, -INFINITY};  // rows g and g + 8, in units of log2
  float row_sum[2] = {0.0f, 0.0f};            // this lane's columns only, until the end
  const float scale_log2 = p.scale * kLog2e;
  const auto compute = [&](int stage, int i) {
    if (i == 0) {
      if (p.rotary_cos != nullptr) {  // each warp turns its own 16 query rows where they landed
        rotate_query_rows<T, D>(p, q_tile + warp * 16 * kStride, [&](int r) {
          const int row = warp * 16 + r;
          return m0 + row < rows ? max(query_of(row) + shift, 0) : -1;
        });
        __syncwarp();
      }
      q_fragments.load(SharedRows<T, D>{q_tile + warp * 16 * kStride});
    }
    const int n0 = (n_begin + i) * kBlockKeys;
    float s[kBlockKeys / 8][4] = {};
    mma_abt<T, kBlockKeys, D>(s, q_fragments, kv.k_tile(stage));
    scale_tile(s, scale_log2);
    if (p.key_padding_mask != nullptr || n0 + kBlockKeys > seqlen_k ||
        (p.causal && n0 + kBlockKeys - 1 > query_of(0) + shift) || window_cuts(p, last_query, n0, shift)) {
      mask_tile<kBlockKeys>(
          s, [&](int r, int c) { return visible(p, b, query_of(warp * 16 + r), n0 + c, seqlen_k, shift); });
    }
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      float new_max = row_max[half];
#pragma unroll
      for (int nb = 0; nb < kBlockKeys / 8; ++nb) {
        new_max = fmaxf(new_max, fmaxf(s[nb][2 * half], s[nb][2 * half + 1]));
      }
      new_max = quad_max(new_max);
      // While a row has seen no key its max is -inf; subtracting 0 then keeps exp2 at 0, not NaN.
      const float base = new_max == -INFINITY ? 0.0f : new_max;
      const float rescale = exp2f(row_max[half] - base);
      row_max[half] = new_max;
      row_sum[half] *= rescale;
#pragma unroll
      for (int nb = 0; nb < D / 8; ++nb) {
        acc[nb][2 * half] *= rescale;
        acc[nb][2 * half + 1] *= rescale;
      }
#pragma unroll
      for (int nb = 0; nb < kBlockKeys / 8; ++nb) {
        s[nb][2 * half] = exp2f(s[nb][2 * half] - base);
        s[nb][2 * half + 1] = exp2f(s[nb][2 * half + 1] - base);
        row_sum[half] += s[nb][2 * half] + s[nb][2 * half + 1];
      }
    }
    uint32_t probs[kBlockKeys / 16][4];
    to_a_fragments<T, kBlockKeys>(s, probs);
    mma_ab<T, kBlockKeys, D>(acc, probs, kv.v_tile(stage));
  };
  pipeline(n_blocks, load_kv, compute);

  // out = acc / l and lse = (m + log2 l) ln 2; l = 0 exactly when the row saw no key (the max
  // element contributes exp2(0) = 1 otherwise).
  const bool partial = splits.num_splits > 1;
  float* lse_out = partial ? splits.lse_partial : p.lse;
  float inverse_sum[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const float sum = quad_sum(row_sum[half]);
    const float lse = total_keys < 0 ? quiet_nan()
                      : sum == 0.0f  ? (partial ? -INFINITY : INFINITY)
                                     : (row_max[half] + log2f(sum)) * kLn2;
    inverse_sum[half] = total_keys < 0 ? quiet_nan() : sum == 0.0f ? 0.0f : 1.0f / sum;
    const int r = warp * 16 + fragment_row(2 * half);
    if (lse_out != nullptr && lane % 4 == 0 && m0 + r < rows) {
      lse_out[((split * p.batch + b) * p.heads_q + head_of(r)) * p.seqlen_q + query_of(r)] = lse;
    }
#pragma unroll
    for (int nb = 0; nb < D / 8; ++nb) {
      acc[nb][2 * half] *= inverse_sum[half];
      acc[nb][2 * half + 1] *= inverse_sum[half];
    }
  }
  if (partial) {
#pragma unroll
    for (int half = 0; half < 2; ++half) {
      const int r = warp * 16 + fragment_row(2 * half);
      if (m0 + r < rows) {
        float* dst = splits.out_partial +
                     (((split * p.batch + b) * p.heads_q + head_of(r)) * p.seqlen_q + query_of(r)) * D;
#pragma unroll
        for (int nb = 0; nb < D / 8; ++nb) {
          *reinterpret_cast<float2*>(dst + fragment_column(nb, 0)) =
              make_float2(acc[nb][2 * half], acc[nb][2 * half + 1]);
        }
      }
    }
  } else {
    T* out = static_cast<T*>(p.out.data) + b * p.out.batch;
    store_tile<T, D>(acc, q_tile + warp * 16 * kStride, [&](int r) {
      const int row = warp * 16 + r;
      return m0 + row < rows ? out + head_of(row) * p.out.head + query_of(row) * p.out.row : nullptr;
    });
  }
}

// Decoding, before the attention: copies the new keys and values into the caches at each
// sequence's position, one 16-byte chunk per thread, the keys rotated on the way with rotary
// caches; nothing for a sequence that does not fit.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_append_kernel(const AttentionParams p, const NewKeys n) {
  const int64_t index = blockIdx.x * int64_t{256} + threadIdx.x;
  const int64_t row = index / (D / 8);
  const int column = static_cast<int>(index % (D / 8)) * 8;
  if (row >= p.batch * p.heads_kv * p.seqlen_new) return;
  const int64_t j = row % p.seqlen_new;
  const int64_t h = row / p.seqlen_new % p.heads_kv;
  const int64_t b = row / p.seqlen_new / p.heads_kv;
  const int64_t total = decode_keys(p, b);
  if (total < 0) return;
  const int64_t position = total - p.seqlen_new + j;
  const auto copy = [&](const StridedTensor& cache, const StridedTensor& update, bool rotate) {
    const T* src = static_cast<const T*>(update.data) + b * update.batch + h * update.head + j * update.row;
    T* dst = static_cast<T*>(cache.data) + b * cache.batch + h * cache.head + position * cache.row + column;
    Pack<T> pack = *reinterpret_cast<const Pack<T>*>(src + column);
    if (rotate && column < 2 * p.rotary_half) {  // the cache holds rotated keys
#pragma unroll
      for (int e = 0; e < Pack<T>::kN; ++e) {
        if (column + e < 2 * p.rotary_half) {
          pack.v[e] = from_float<T>(rotated_column(src, column + e, p.rotary_half, p.rotary_interleaved,
                                                   p.rotary_cos, p.rotary_sin, p.rotary_max_positions, position));
        }
      }
    }
    *reinterpret_cast<Pack<T>*>(dst) = pack;
  };
  copy(p.k, n.k, p.rotary_cos != nullptr);
  copy(p.v, n.v, false);
}

// Decoding: merges the splits of each (b, h, i) row, one warp per row, each lane holding D / 32
// consecutive features.
template <typename T, int D>
__global__ void __launch_bounds__(128) attention_combine_kernel(const AttentionParams p, const DecodeSplits splits) {
  constexpr int kPerLane = D / 32;
  struct alignas(kPerLane * sizeof(float)) Floats {
    float v[kPerLane];
  };
  struct alignas(kPerLane * sizeof(T)) Values {
    T v[kPerLane];
  };
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  const int64_t row = blockIdx.x * int64_t{4} + threadIdx.x / 32;
  if (row >= rows) return;
  const int lane = threadIdx.x % 32;

  const int64_t i = row % p.seqlen_q;
  const int64_t h = row / p.seqlen_q % p.heads_q;
  const int64_t b = row / p.seqlen_q / p.heads_q;

  float lse_max = -INFINITY;
  for (int s = 0; s < splits.num_splits; ++s) lse_max = fmaxf(lse_max, splits.lse_partial[s * rows + row]);
  float lse = INFINITY;  // no split saw a key: out 0, lse +inf, as in the forward
  Floats out{};
  if (decode_keys(p, b) < 0) {
    lse = quiet_nan();
#pragma unroll
    for (int j = 0; j < kPerLane; ++j) out.v[j] = quiet_nan();
  } else if (lse_max != -INFINITY) {
    float sum = 0.0f;
    for (int s = 0; s < splits.num_splits; ++s) sum += expf(splits.lse_partial[s * rows + row] - lse_max);
    lse = lse_max + logf(sum);
    for (int s = 0; s < splits.num_splits; ++s) {
      const float weight = expf(splits.lse_partial[s * rows + row] - lse);
      const Floats part = reinterpret_cast<const Floats*>(splits.out_partial + (s * rows + row) * D)[lane];
#pragma unroll
      for (int j = 0; j < kPerLane; ++j) out.v[j] += weight * part.v[j];
    }
  }
  Values values;
#pragma unroll
  for (int j = 0; j < kPerLane; ++j) values.v[j] = from_float<T>(out.v[j]);
  T* dst = static_cast<T*>(p.out.data) + b * p.out.batch + h * p.out.head + i * p.out.row;
  reinterpret_cast<Values*>(dst)[lane] = values;
  if (lane == 0 && p.lse != nullptr) p.lse[row] = lse;
}

// ---------------------------------------------------------------------------------------------
// Backward

// delta = rowsum(dout * out) in fp32; each row's D / 8 16-byte chunks are summed by D / 8
// consecutive lanes of one warp.
template <typename T, int D>
__global__ void __launch_bounds__(256) attention_delta_kernel(const AttentionParams p, const AttentionGrads g) {
  constexpr int kLanesPerRow = D / 8;
  const int64_t rows = p.batch * p.heads_q * p.seqlen_q;
  const int64_t index = blockIdx.x * int64_t{256} + threadIdx.x;
  const int64_t row = index / kLanesPerRow;
  const int column = static_cast<int>(index % kLanesPerRow) * 8;
  float sum = 0.0f;
  if (row < rows) {
    const int64_t i = row % p.seqlen_q;
    const int64_t h = row / p.seqlen_q % p.heads_q;
    const int64_t b = row / p.seqlen_q / p.heads_q;
    const auto out = *reinterpret_cast<const Pack<T>*>(static_cast<const T*>(p.out.data) + b * p.out.batch +
                                                       h * p.out.head + i * p.out.row + column);
    const auto dout = *reinterpret_cast<const Pack<T>*>(static_cast<const T*>(g.dout.data) + b * g.dout.batch +
                                                        h * g.dout.head + i * g.dout.row + column);
#pragma unroll
    for (int j = 0; j < Pack<T>::kN; ++j) sum += to_float(out.v[j]) * to_float(dout.v[j]);
  }
#pragma unroll
  for (int offset = kLanesPerRow / 2; offset > 0; offset /= 2) sum += __shfl_xor_sync(0xffffffffu, sum, offset);
  if (row < rows && column == 0) g.delta[row] = sum;
}

template <typename T, int D, int kWarps, int kBlockM>
constexpr size_t dkdv_shared_bytes() {
  // k and v, then 2 stages of q and dout, then 2 stages of lse and delta
  return (2 * 16 * kWarps + 4 * kBlockM) * kRowStride<D> * sizeof(T) + 4 * kBlockM * sizeof(float);
}

// One program per (key block, key/value head, batch); warp w owns keys n0 + 16 w .. n0 + 16 w + 15.
// It loops over the query heads of the group and their query blocks (dk and dv summed in
// registers: deterministic, no atomics), computing the transposed products
//   S^T = k q^T,  P^T = exp(S^T - lse),  dv += P^T dout,  dP^T = v dout^T,
//   dS^T = P^T (dP^T - delta),  dk += dS^T q.
template <typename T, int D, int kWarps, int kBlockM>
__global__ void __launch_bounds__(kWarps * 32) attention_dkdv_kernel(const AttentionParams p, const AttentionGrads g) {
  constexpr int kBlockN = 16 * kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStride = kRowStride<D>;
  extern __shared__ __align__(16) unsigned char shared[];
  T* k_tile = reinterpret_cast<T*>(shared);       // [kBlockN][kStride]
  T* v_tile = k_tile + kBlockN * kStride;          // [kBlockN][kStride]
  T* q_tiles = v_tile + kBlockN * kStride;         // [2][kBlockM][kStride]
  T* dout_tiles = q_tiles + 2 * kBlockM * kStride;  // [2][kBlockM][kStride]
  float* lse_tiles = reinterpret_cast<float*>(dout_tiles + 2 * kBlockM * kStride);  // [2][kBlockM]
  float* delta_tiles = lse_tiles + 2 * kBlockM;                                     // [2][kBlockM]

  const int warp = threadIdx.x / 32;
  const int n0 = blockIdx.x * kBlockN;
  const int64_t kv_head = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int group = static_cast<int>(p.heads_q / p.heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q);
  const int seqlen_k = static_cast<int>(p.seqlen_k);

  load_tile<kBlockN, D, kThreads>(k_tile, slab_rows<const T>(p.k, b, kv_head, n0, seqlen_k));
  load_tile<kBlockN, D, kThreads>(v_tile, slab_rows<const T>(p.v, b, kv_head, n0, seqlen_k));

  // Causal: query i sees key j when j <= i + shift, so blocks before the one holding query
  // n0 - shift see none of these keys. A sliding window: query i sees key j when
  // j >= i + shift - window_left, so blocks after the one holding query
  // n0 + kBlockN - 1 - shift + window_left see none of them.
  const int shift = static_cast<int>(p.causal_shift);
  const int m_begin = p.causal ? max(0, n0 - shift) / kBlockM : 0;
  const int m_blocks = (seqlen_q + kBlockM - 1) / kBlockM;
  const int last_query = n0 + kBlockN - 1 - shift + static_cast<int>(p.window_left);
  const int m_end = p.window_left < 0 ? m_blocks : last_query < 0 ? 0 : min(m_blocks, last_query / kBlockM + 1);
  const int m_per_head = max(0, m_end - m_begin);
  const auto head_of = [&](int i) { return kv_head * group + i / m_per_head; };
  const auto m0_of = [&](int i) { return (m_begin + i % m_per_head) * kBlockM; };
  const auto load_queries = [&](int stage, int i) {
    const int64_t h = head_of(i);
    const int m0 = m0_of(i);
    load_tile<kBlockM, D, kThreads>(q_tiles + stage * kBlockM * kStride, slab_rows<const T>(p.q, b, h, m0, seqlen_q));
    load_tile<kBlockM, D, kThreads>(
        dout_tiles + stage * kBlockM * kStride, slab_rows<const T>(g.dout, b, h, m0, seqlen_q));
    const int64_t row = (b * p.heads_q + h) * p.seqlen_q + m0;
    load_vector<kBlockM, kThreads>(lse_tiles + stage * kBlockM, p.lse + row, seqlen_q - m0);
    load_vector<kBlockM, kThreads>(delta_tiles + stage * kBlockM, g.delta + row, seqlen_q - m0);
  };

  float dk[D / 8][4] = {};
  float dv[D / 8][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  const auto compute = [&](int stage, int i) {
    const int m0 = m0_of(i);
    const T* q_tile = q_tiles + stage * kBlockM * kStride;
    const T* dout_tile = dout_tiles + stage * kBlockM * kStride;
    const float* lse = lse_tiles + stage * kBlockM;
    const float* delta = delta_tiles + stage * kBlockM;
    float s[kBlockM / 8][4] = {};
    mma_abt<T, kBlockM, D>(s, SharedRows<T, D>{k_tile + warp * 16 * kStride}, q_tile);
    scale_tile(s, scale_log2);
    if (p.key_padding_mask != nullptr || n0 + kBlockN > seqlen_k || m0 + kBlockM > seqlen_q ||
        (p.causal && n0 + kBlockN - 1 > m0 + shift) || window_cuts(p, m0 + kBlockM - 1, n0, shift)) {
      mask_tile<kBlockM>(s, [&](int r, int c) { return visible(p, b, m0 + c, n0 + warp * 16 + r, seqlen_k, shift); });
    }
    // Masked entries are -inf and lse is finite or +inf (zero-filled past the queries): P^T is 0 there.
#pragma unroll
    for (int nb = 0; nb < kBlockM / 8; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) s[nb][r] = exp2f(s[nb][r] - lse[fragment_column(nb, r)] * kLog2e);
    }
    uint32_t a[kBlockM / 16][4];
    to_a_fragments<T, kBlockM>(s, a);
    mma_ab<T, kBlockM, D>(dv, a, dout_tile);
    float dp[kBlockM / 8][4] = {};
    mma_abt<T, kBlockM, D>(dp, SharedRows<T, D>{v_tile + warp * 16 * kStride}, dout_tile);
#pragma unroll
    for (int nb = 0; nb < kBlockM / 8; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) dp[nb][r] = s[nb][r] * (dp[nb][r] - delta[fragment_column(nb, r)]);
    }
    to_a_fragments<T, kBlockM>(dp, a);
    mma_ab<T, kBlockM, D>(dk, a, q_tile);
  };
  pipeline(group * m_per_head, load_queries, compute);

  // Each warp stages its results through its own rows of k_tile and v_tile, which only it read.
  scale_tile(dk, p.scale);
  store_tile<T, D>(dk, k_tile + warp * 16 * kStride, slab_rows<T>(g.dk, b, kv_head, n0 + warp * 16, seqlen_k));
  store_tile<T, D>(dv, v_tile + warp * 16 * kStride, slab_rows<T>(g.dv, b, kv_head, n0 + warp * 16, seqlen_k));
}

template <typename T, int D, int kWarps>
constexpr size_t dq_shared_bytes() {
  return (2 * 16 * kWarps + 4 * kBlockKeys) * kRowStride<D> * sizeof(T);  // q, dout, 2 stages of k and v
}

// One program per (query block, head, batch); warp w owns queries m0 + 16 w .. m0 + 16 w + 15 and
// loops over key blocks:  S = q k^T,  P = exp(S - lse),  dP = dout v^T,  dS = P (dP - delta),
// dq += dS k.
template <typename T, int D, int kWarps>
__global__ void __launch_bounds__(kWarps * 32) attention_dq_kernel(const AttentionParams p, const AttentionGrads g) {
  constexpr int kBlockM = 16 * kWarps;
  constexpr int kThreads = kWarps * 32;
  constexpr int kStride = kRowStride<D>;
  extern __shared__ __align__(16) unsigned char shared[];
  T* q_tile = reinterpret_cast<T*>(shared);  // [kBlockM][kStride]
  T* dout_tile = q_tile + kBlockM * kStride;  // [kBlockM][kStride]
  const KeyValueStages<T, D> kv{dout_tile + kBlockM * kStride, dout_tile + (kBlockM + 2 * kBlockKeys) * kStride};

  const int warp = threadIdx.x / 32;
  const int m0 = (gridDim.x - 1 - blockIdx.x) * kBlockM;  // later (causal: longer) blocks first
  const int64_t h = blockIdx.y;
  const int64_t b = blockIdx.z;
  const int64_t kv_head = h / (p.heads_q / p.heads_kv);
  const int seqlen_q = static_cast<int>(p.seqlen_q);
  const int seqlen_k = static_cast<int>(p.seqlen_k);
  const int shift = static_cast<int>(p.causal_shift);  // causal: query i sees key j <= i + shift

  const int last_query = min(m0 + kBlockM, seqlen_q) - 1;
  const int n_first = key_blocks_begin(p, m0, shift);  // a sliding window's first key block
  load_tile<kBlockM, D, kThreads>(q_tile, slab_rows<const T>(p.q, b, h, m0, seqlen_q));
  load_tile<kBlockM, D, kThreads>(dout_tile, slab_rows<const T>(g.dout, b, h, m0, seqlen_q));
  const auto load_kv = [&](int stage, int i) {
    kv.template load<kThreads>(stage, p, b, kv_head, (n_first + i) * kBlockKeys, seqlen_k);
  };

  // Rows g and g + 8 of the warp; rows past the queries get lse +inf (P = 0) and delta 0.
  float lse_log2[2];
  float delta[2];
#pragma unroll
  for (int half = 0; half < 2; ++half) {
    const int query = m0 + warp * 16 + fragment_row(2 * half);
    const int64_t row = (b * p.heads_q + h) * p.seqlen_q + query;
    lse_log2[half] = query < seqlen_q ? p.lse[row] * kLog2e : INFINITY;
    delta[half] = query < seqlen_q ? g.delta[row] : 0.0f;
  }

  float dq[D / 8][4] = {};
  const float scale_log2 = p.scale * kLog2e;
  const auto compute = [&](int stage, int i) {
    const int n0 = (n_first + i) * kBlockKeys;
    const T* k_tile = kv.k_tile(stage);
    float s[kBlockKeys / 8][4] = {};
    mma_abt<T, kBlockKeys, D>(s, SharedRows<T, D>{q_tile + warp * 16 * kStride}, k_tile);
    scale_tile(s, scale_log2);
    if (p.key_padding_mask != nullptr || n0 + kBlockKeys > seqlen_k ||
        (p.causal && n0 + kBlockKeys - 1 > m0 + shift) || window_cuts(p, last_query, n0, shift)) {
      mask_tile<kBlockKeys>(
          s, [&](int r, int c) { return visible(p, b, m0 + warp * 16 + r, n0 + c, seqlen_k, shift); });
    }
    float dp[kBlockKeys / 8][4] = {};
    mma_abt<T, kBlockKeys, D>(dp, SharedRows<T, D>{dout_tile + warp * 16 * kStride}, kv.v_tile(stage));
#pragma unroll
    for (int nb = 0; nb < kBlockKeys / 8; ++nb) {
#pragma unroll
      for (int r = 0; r < 4; ++r) {
        dp[nb][r] = exp2f(s[nb][r] - lse_log2[r / 2]) * (dp[nb][r] - delta[r / 2]);
      }
    }
    uint32_t a[kBlockKeys / 16][4];
    to_a_fragments<T, kBlockKeys>(dp, a);
    mma_ab<T, kBlockKeys, D>(dq, a, k_tile);
  };
  pipeline(max(0, key_blocks_end(p, last_query, shift, seqlen_k) - n_first), load_kv, compute);

  scale_tile(dq, p.scale);
  store_tile<T, D>(dq, q_tile + warp * 16 * kStride, slab_rows<T>(g.dq, b, h, m0 + warp * 16, seqlen_q));
}

// ---------------------------------------------------------------------------------------------
// Launchers

// Launches kernel on grid (nothing for an empty grid), first raising its dynamic shared-memory
// limit past the default 48 KB when it needs more.
template <typename... KernelArgs, typename... Args>
cudaError_t launch(void (*kernel)(KernelArgs...), dim3 grid, int threads, size_t shared_bytes, cudaStream_t stream,
                   const Args&... args) {
  if (grid.x == 0 || grid.y == 0 || grid.z == 0) return cudaSuccess;
  if (shared_bytes > 48 * 1024) {
    const cudaError_t error =
        cudaFuncSetAttribute(kernel, cudaFuncAttributeMaxDynamicSharedMemorySize, static_cast<int>(shared_bytes));
    if (error != cudaSuccess) return error;
  }
  kernel<<<grid, threads, shared_bytes, stream>>>(args...);
  return cudaGetLastError();
}

// Calls f(T{}, std::integral_constant<int, D>{}) for the params' dtype and head dimension after
// checking what every launcher needs; cudaErrorInvalidValue for anything unsupported.
template <typename F>
cudaError_t dispatch(const AttentionParams& p, const F& f) {
  const int64_t grid_limit = 65535;  // gridDim.y and gridDim.z
  if (p.heads_kv <= 0 || p.heads_q % p.heads_kv != 0 || p.heads_q > grid_limit || p.batch > grid_limit ||
      p.seqlen_q * (p.heads_q / p.heads_kv) > INT32_MAX / 2 || p.seqlen_k > INT32_MAX / 2) {
    return cudaErrorInvalidValue;
  }
  const auto with_dim = [&](auto type) -> cudaError_t {
    switch (p.head_dim) {
      case 64:
        return f(type, std::integral_constant<int, 64>{});
      case 128:
        return f(type, std::integral_constant<int, 128>{});
      default:
        return cudaErrorInvalidValue;
    }
  };
  switch (p.dtype) {
    case FloatType::kFloat16:
      return with_dim(__half{});
    case FloatType::kBFloat16:
      return with_dim(__nv_bfloat16{});
    default:
      return cudaErrorInvalidValue;
  }
}

int ceil_div(int64_t a, int64_t b) { return static_cast<int>((a + b - 1) / b); }

// Forward and decoding programs: 4 warps (64 rows) when the rows fit, otherwise 8 (128 rows, so
// that each key block is read from memory once per 128 rows).
int fwd_rows_per_program(int64_t rows) { return rows <= 64 ? 64 : 128; }

template <typename T, int D>
cudaError_t launch_fwd(const AttentionParams& p, const DecodeSplits& splits, int64_t rows, int64_t heads,
                       cudaStream_t stream) {
  if (rows == 0) return cudaSuccess;
  const dim3 grid(ceil_div(rows, fwd_rows_per_program(rows)) * splits.num_splits, heads, p.batch);
  if (fwd_rows_per_program(rows) == 64) {
    return launch(attention_fwd_kernel<T, D, 4>, grid, 128, fwd_shared_bytes<T, D, 4>(), stream, p, splits);
  }
  return launch(attention_fwd_kernel<T, D, 8>, grid, 256, fwd_shared_bytes<T, D, 8>(), stream, p, splits);
}

// Backward programs have 4 warps: 64 keys (dk/dv) or 64 queries (dq) each. The dk/dv kernel's
// query blocks have 64 rows, 32 at D = 128, where dk and dv alone take 128 registers a thread.
constexpr int kBackwardWarps = 4;
constexpr int kBackwardRows = 16 * kBackwardWarps;
template <int D>
constexpr int kDkdvQueryBlock = D == 64 ? 64 : 32;

}  // namespace

cudaError_t attention_fwd(const AttentionParams& params, cudaStream_t stream) {
  if (params.cache_seqlens != nullptr) return cudaErrorInvalidValue;
  return dispatch(params, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    return launch_fwd<T, D>(params, DecodeSplits{1, nullptr, nullptr}, params.seqlen_q, params.heads_q, stream);
  });
}

cudaError_t attention_bwd(const AttentionParams& params, const AttentionGrads& grads, cudaStream_t stream) {
  if (params.cache_seqlens != nullptr) return cudaErrorInvalidValue;
  return dispatch(params, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    const int64_t delta_blocks = (params.batch * params.heads_q * params.seqlen_q * (D / 8) + 255) / 256;
    if (delta_blocks > INT32_MAX) return cudaErrorInvalidValue;
    cudaError_t error = launch(attention_delta_kernel<T, D>, dim3(static_cast<unsigned>(delta_blocks)), 256, 0,
                               stream, params, grads);
    if (error != cudaSuccess) return error;
    constexpr int kBlockM = kDkdvQueryBlock<D>;
    error = launch(attention_dkdv_kernel<T, D, kBackwardWarps, kBlockM>,
                   dim3(ceil_div(params.seqlen_k, kBackwardRows), params.heads_kv, params.batch), 32 * kBackwardWarps,
                   dkdv_shared_bytes<T, D, kBackwardWarps, kBlockM>(), stream, params, grads);
    if (error != cudaSuccess) return error;
    return launch(attention_dq_kernel<T, D, kBackwardWarps>,
                  dim3(ceil_div(params.seqlen_q, kBackwardRows), params.heads_q, params.batch), 32 * kBackwardWarps,
                  dq_shared_bytes<T, D, kBackwardWarps>(), stream, params, grads);
  });
}

cudaError_t attention_decode_num_splits(const AttentionParams& params, int* num_splits) {
  // A split of at least 4 key blocks (256 keys) amortises its partial writes and the combine;
  // a sliding window bounds the keys a sequence reads.
  const int64_t keys = params.window_left < 0 ? params.seqlen_k
                                              : std::min(params.seqlen_k, params.window_left + params.seqlen_q);
  const int most = std::clamp(ceil_div(keys, kBlockKeys) / 4, 1, 128);
  int device = 0;
  int multiprocessors = 0;
  cudaError_t error = cudaGetDevice(&device);
  if (error == cudaSuccess) error = cudaDeviceGetAttribute(&multiprocessors, cudaDevAttrMultiProcessorCount, device);
  if (error != cudaSuccess) return error;
  // Split until the programs fill about two waves of the multiprocessors.
  const int64_t rows = params.seqlen_q * (params.heads_q / std::max<int64_t>(params.heads_kv, 1));
  const int64_t programs = params.batch * params.heads_kv * ceil_div(rows, fwd_rows_per_program(rows));
  const int64_t wanted = programs == 0 ? 1 : (2 * multiprocessors + programs - 1) / programs;
  *num_splits = static_cast<int>(std::clamp<int64_t>(wanted, 1, most));
  return cudaSuccess;
}

cudaError_t attention_decode(const AttentionParams& params, const NewKeys& new_keys, const DecodeSplits& splits,
                             cudaStream_t stream) {
  const bool workspace = splits.num_splits == 1 || (splits.out_partial != nullptr && splits.lse_partial != nullptr);
  if (params.cache_seqlens == nullptr || !params.causal || params.key_padding_mask != nullptr ||
      params.seqlen_new < 0 || splits.num_splits < 1 || !workspace) {
    return cudaErrorInvalidValue;
  }
  return dispatch(params, [&](auto type, auto dim) {
    using T = decltype(type);
    constexpr int D = decltype(dim)::value;
    // Stream order puts the append before the attention, which reads the new keys.
    const int64_t append_blocks = (params.batch * params.heads_kv * params.seqlen_new * (D / 8) + 255) / 256;
    if (append_blocks > INT32_MAX) return cudaErrorInvalidValue;
    cudaError_t error = launch(attention_append_kernel<T, D>, dim3(static_cast<unsigned>(append_blocks)), 256, 0,
                               stream, params, new_keys);
    if (error != cudaSuccess) return error;
    const int64_t rows = params.seqlen_q * (params.heads_q / params.heads_kv);
    error = launch_fwd<T, D>(params, splits, rows, params.heads_kv, stream);
    if (error != cudaSuccess || splits.num_splits == 1) return error;
    const int64_t combine_blocks = (params.batch * params.heads_q * params.seqlen_q + 3) / 4;
    if (combine_blocks > INT32_MAX) return cudaErrorInvalidValue;
    return launch(attention_combine_kernel<T, D>, dim3(static_cast<unsigned>(combine_blocks)), 128, 0, stream, params,
                  splits);
  });
}

}  // namespace lmkern::cuda
