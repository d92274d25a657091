// Fused softmax cross-entropy on CUDA, one thread block per row. Pass 1 streams the row
// with 16-byte loads, each thread keeping an online softmax (running max and sum of
// exponentials) and the smoothing sums, merged across the block by warp shuffles and
// shared memory; pass 2 re-reads the row (mostly from L2) and writes the gradient, so
// backward is only a scale of it.
//
// For a row x with target t, smoothing e, class weights w (all 1 without weights),
// W = sum_c w_c, lse = logsumexp(x) and z-loss coefficient z:
//   loss       = (1 - e) w_t (lse - x_t) + e/V (W lse - sum_c w_c x_c) + z lse^2
//   dloss/dx_c = softmax(x)_c ((1 - e) w_t + e W/V + 2 z lse) - e/V w_c - [c == t] (1 - e) w_t
// An ignored row gets loss 0 and a zero gradient; a target outside [0, V) gets NaN loss
// and a NaN gradient row, and nothing is read out of bounds.
#include <algorithm>
#include <cfloat>
#include <cstdint>

#include "common.cuh"
#include "cross_entropy_kernels.h"

namespace lmkern::cuda {
namespace {

// Softmax statistics of part of a row. max starts at -FLT_MAX rather than -inf so that
// rescaling after a run of -inf logits is exp(0) = 1, not exp(-inf + inf) = NaN.
struct RowStats {
  float max = -FLT_MAX;
  float sum_exp = 0.0f;
  float sum_wx = 0.0f;  // sum_c w_c x_c, kept only with label smoothing
  float sum_w = 0.0f;   // sum_c w_c, kept only with label smoothing and class weights

  __device__ void merge(const RowStats& other) {
    const float new_max = fmaxf(max, other.max);
    sum_exp = sum_exp * expf(max - new_max) + other.sum_exp * expf(other.max - new_max);
    max = new_max;
    sum_wx += other.sum_wx;
    sum_w += other.sum_w;
  }
};

__device__ RowStats warp_reduce(RowStats stats) {
#pragma unroll
  for (int offset = 16; offset > 0; offset /= 2) {
    RowStats other;
    other.max = __shfl_xor_sync(0xffffffffu, stats.max, offset);
    other.sum_exp = __shfl_xor_sync(0xffffffffu, stats.sum_exp, offset);
    other.sum_wx = __shfl_xor_sync(0xffffffffu, stats.sum_wx, offset);
    other.sum_w = __shfl_xor_sync(0xffffffffu, stats.sum_w, offset);
    stats.merge(other);
  }
  return stats;
}

// Every thread gets the statistics of the whole row.
template <int kThreads>
__device__ RowStats block_reduce(RowStats stats, RowStats* shared /* [kThreads / 32] */) {
  constexpr int kWarps = kThreads / 32;
  const int warp = threadIdx.x / 32;
  const int lane = threadIdx.x % 32;
  stats = warp_reduce(stats);
  if (lane == 0) {
    shared[warp] = stats;
  }
  __syncthreads();
  if (warp == 0) {
    stats = warp_reduce(lane < kWarps ? shared[lane] : RowStats{});
    if (lane == 0) {
      shared[0] = stats;
    }
  }
  __syncthreads();
  const RowStats total = shared[0];
  __syncthreads();  // shared is reused by the next row
  return total;
}

// A row as single elements up to the first 16-byte boundary, whole packs, then single
// elements after the last pack. If the logits and gradient rows are not aligned alike,
// the whole row is single elements.
struct RowSplit {
  int64_t head;     // columns [0, head) one by one
  int64_t n_packs;  // then n_packs packs
  int64_t tail;     // then columns [tail, vocab) one by one
};

template <typename T>
__device__ RowSplit split_row(const T* x, const T* grad, int64_t vocab) {
  const auto x_offset = reinterpret_cast<uintptr_t>(x) % 16;
  if (x_offset != reinterpret_cast<uintptr_t>(grad) % 16) {
    return {vocab, 0, vocab};
  }
  const int64_t to_boundary = static_cast<int64_t>((16 - x_offset) % 16 / sizeof(T));
  const int64_t head = to_boundary < vocab ? to_boundary : vocab;
  const int64_t n_packs = (vocab - head) / Pack<T>::kN;
  return {head, n_packs, head + n_packs * Pack<T>::kN};
}

// Calls visit(vals, n, first) on this thread's share of the row: vals holds the n logits
// (n is 1 or a whole pack) starting at column first, converted to fp32.
template <typename T, int kThreads, typename Visit>
__device__ void for_each_piece(const T* x, int64_t vocab, const RowSplit& split, Visit&& visit) {
  constexpr int kN = Pack<T>::kN;
  float vals[kN];
  for (int64_t c = threadIdx.x; c < split.head; c += kThreads) {
    vals[0] = to_float(x[c]);
    visit(vals, 1, c);
  }
  const Pack<T>* packs = reinterpret_cast<const Pack<T>*>(x + split.head);
  for (int64_t i = threadIdx.x; i < split.n_packs; i += kThreads) {
    const Pack<T> pack = packs[i];
#pragma unroll
    for (int k = 0; k < kN; ++k) {
      vals[k] = to_float(pack.v[k]);
    }
    visit(vals, kN, split.head + i * kN);
  }
  for (int64_t c = split.tail + threadIdx.x; c < vocab; c += kThreads) {
    vals[0] = to_float(x[c]);
    visit(vals, 1, c);
  }
}

template <typename T, int kThreads>
__global__ void __launch_bounds__(kThreads) cross_entropy_fwd_kernel(const CrossEntropyParams p) {
  constexpr int kN = Pack<T>::kN;
  __shared__ RowStats shared[kThreads / 32];
  const float e = p.label_smoothing;
  const bool smoothing = e > 0.0f;
  for (int64_t row = blockIdx.x; row < p.n_rows; row += gridDim.x) {
    const T* x = static_cast<const T*>(p.logits) + row * p.logits_row_stride;
    T* grad = static_cast<T*>(p.grad_logits) + row * p.grad_row_stride;
    const int64_t target = p.target[row];
    const bool ignored = target == p.ignore_index;
    if (ignored || target < 0 || target >= p.vocab) {
      const float fill = ignored ? 0.0f : __int_as_float(0x7fc00000);  // quiet NaN
      for (int64_t c = threadIdx.x; c < p.vocab; c += kThreads) {
        grad[c] = from_float<T>(fill);
      }
      if (threadIdx.x == 0) {
        p.loss[row] = fill;
      }
      continue;
    }
    // Read before any thread reaches pass 2, which may overwrite it in place.
    const float x_target = to_float(x[target]);
    const RowSplit split = split_row(x, grad, p.vocab);

    RowStats stats;
    for_each_piece<T, kThreads>(x, p.vocab, split, [&](const float* vals, int n, int64_t first) {
      float new_max = stats.max;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (k < n) new_max = fmaxf(new_max, vals[k]);
      }
      float sum_exp = stats.sum_exp * expf(stats.max - new_max);
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (k < n) sum_exp += expf(vals[k] - new_max);
      }
      stats.max = new_max;
      stats.sum_exp = sum_exp;
      if (smoothing) {
#pragma unroll
        for (int k = 0; k < kN; ++k) {
          if (k < n) {
            const float w = p.weight ? p.weight[first + k] : 1.0f;
            stats.sum_wx += w * vals[k];
            stats.sum_w += w;
          }
        }
      }
    });
    stats = block_reduce<kThreads>(stats, shared);

    // lse - x_t as (max - x_t) + log(sum_exp), and softmax as exp(x - max) / sum_exp: lse
    // itself is rounded at its own (possibly large) magnitude.
    const float log_sum_exp = logf(stats.sum_exp);
    const float lse = stats.max + log_sum_exp;
    const float w_target = p.weight ? p.weight[target] : 1.0f;
    const float sum_w = p.weight ? stats.sum_w : static_cast<float>(p.vocab);
    if (threadIdx.x == 0) {
      float loss = (1.0f - e) * w_target * ((stats.max - x_target) + log_sum_exp) + p.z_loss * lse * lse;
      if (smoothing) {
        loss += e / p.vocab * (sum_w * lse - stats.sum_wx);
      }
      p.loss[row] = loss;
    }

    const float p_scale = ((1.0f - e) * w_target + e * sum_w / p.vocab + 2.0f * p.z_loss * lse) / stats.sum_exp;
    const float smooth_per_weight = e / p.vocab;
    const float target_term = (1.0f - e) * w_target;
    for_each_piece<T, kThreads>(x, p.vocab, split, [&](const float* vals, int n, int64_t first) {
      Pack<T> out;
#pragma unroll
      for (int k = 0; k < kN; ++k) {
        if (k < n) {
          const int64_t c = first + k;
          const float w = p.weight ? p.weight[c] : 1.0f;
          float g = expf(vals[k] - stats.max) * p_scale - smooth_per_weight * w;
          if (c == target) g -= target_term;
          out.v[k] = from_float<T>(g);
        }
      }
      if (n == kN) {
        *reinterpret_cast<Pack<T>*>(grad + first) = out;
      } else {
        grad[first] = out.v[0];
      }
    });
  }
}

template <typename T>
cudaError_t launch(const CrossEntropyParams& p, cudaStream_t stream) {
  // Rows beyond the grid are taken by the blocks' row loop.
  const auto grid = static_cast<unsigned>(std::min<int64_t>(p.n_rows, INT32_MAX));
  if (p.vocab <= 1024) {
    cross_entropy_fwd_kernel<T, 128><<<grid, 128, 0, stream>>>(p);
  } else if (p.vocab <= 4096) {
    cross_entropy_fwd_kernel<T, 256><<<grid, 256, 0, stream>>>(p);
  } else if (p.vocab <= 16384) {
    cross_entropy_fwd_kernel<T, 512><<<grid, 512, 0, stream>>>(p);
  } else {
    cross_entropy_fwd_kernel<T, 1024><<<grid, 1024, 0, stream>>>(p);
  }
  return cudaGetLastError();
}

}  // namespace

cudaError_t cross_entropy_fwd(const CrossEntropyParams& params, cudaStream_t stream) {
  if (params.n_rows == 0) {
    return cudaSuccess;
  }
  switch (params.dtype) {
    case FloatType::kFloat32:
      return launch<float>(params, stream);
    case FloatType::kFloat16:
      return launch<__half>(params, stream);
    case FloatType::kBFloat16:
      return launch<__nv_bfloat16>(params, stream);
  }
  return cudaErrorInvalidValue;
}

}  // namespace lmkern::cuda
