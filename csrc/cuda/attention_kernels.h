// Launchers of the flash-attention CUDA kernels (forward, backward, KV-cache decoding): raw
// pointers and a stream, no torch headers. The math and the kernel design are written at
// the top of attention_kernels.cu.
#pragma once

#include <cuda_runtime.h>

#include <cstdint>

#include "float_type.h"

namespace lmkern::cuda {

// A (B, H, L, D) tensor: element (b, h, i, d) is at data[b * batch + h * head + i * row + d].
// data must be 16-byte aligned and batch, head and row multiples of 8 (one 16-byte chunk of
// fp16/bf16), so that every row starts on a 16-byte boundary.
struct StridedTensor {
  void* data;  // read through a const pointer where the tensor is an input
  int64_t batch;
  int64_t head;
  int64_t row;
};

// What forward, backward and decoding share. Shapes: q and out (B, heads_q, seqlen_q, D),
// k and v (B, heads_kv, seqlen_k, D); query head h reads key/value head h / (heads_q / heads_kv).
struct AttentionParams {
  StridedTensor q;
  StridedTensor k;
  StridedTensor v;
  StridedTensor out;              // written by forward and decoding, read by backward
  float* lse;                     // (B, heads_q, seqlen_q) contiguous, fp32, natural log: written
                                  // by forward, read by backward; decoding writes it unless nullptr
  // Forward and backward only (nullptr otherwise): (B, seqlen_k), true = the key takes part;
  // row b at key_padding_mask + b * mask_batch_stride (0 broadcasts one row), keys contiguous.
  const bool* key_padding_mask;
  int64_t mask_batch_stride;
  // Decoding only (nullptr otherwise): (B,) each sequence's cache length before the call,
  // int32 (int64 when cache_seqlens_int64). k and v are then the caches, seqlen_k their
  // capacity L_max, and seqlen_new keys per sequence are appended at position cache_seqlens[b].
  const void* cache_seqlens;
  bool cache_seqlens_int64;
  int64_t seqlen_new;
  // Decoding only (nullptr otherwise): rotary caches (rotary_max_positions, rotary_half) fp32,
  // contiguous. The new keys are rotated at positions cache_seqlens[b] + j as they are appended,
  // and query i at position max(total_b - seqlen_q + i, 0) as it is loaded; pairs
  // (x_{2i}, x_{2i+1}) if rotary_interleaved, else (x_i, x_{i + rotary_half}). A position past
  // the caches gives NaN (no read out of bounds).
  const float* rotary_cos;
  const float* rotary_sin;
  int64_t rotary_half;            // 1 <= rotary_half <= head_dim / 2
  int64_t rotary_max_positions;
  bool rotary_interleaved;
  int64_t batch;
  int64_t heads_q;
  int64_t heads_kv;               // divides heads_q
  int64_t seqlen_q;
  int64_t seqlen_k;
  int64_t head_dim;               // 64 or 128, for q, k and v alike
  float scale;                    // softmax scale, usually 1 / sqrt(head_dim)
  bool causal;                    // forward/backward: key j <= query i + causal_shift; decoding: true
  int64_t causal_shift;           // forward/backward: 0 aligns top-left (torch), Lk - Lq bottom-right
  int64_t window_left;            // -1: none; else a sliding window: key j >= query i + shift - window_left
                                  // (shift: causal_shift, or decoding's bottom-right one); key blocks
                                  // outside it are skipped
  FloatType dtype;                // of q, k, v, out and the gradients: fp16 or bf16
};

// The gradients and the backward's workspace. dout is (B, heads_q, seqlen_q, D) like out;
// dq like q, dk and dv like k and v (written in the input dtype).
struct AttentionGrads {
  StridedTensor dout;
  StridedTensor dq;
  StridedTensor dk;
  StridedTensor dv;
  float* delta;                   // workspace (B, heads_q, seqlen_q) fp32: rowsum(dout * out)
};

// Decoding's new keys and values (B, heads_kv, seqlen_new, D); unused when seqlen_new is 0.
struct NewKeys {
  StridedTensor k;
  StridedTensor v;
};

// Split-K decoding's workspace: each split's output, normalised by its own softmax sum, and
// its logsumexp; unused (may be nullptr) when num_splits is 1.
struct DecodeSplits {
  int num_splits;                 // >= 1
  float* out_partial;             // (num_splits, B, heads_q, seqlen_q, D) contiguous
  float* lse_partial;             // (num_splits, B, heads_q, seqlen_q) contiguous
};

// Every launcher returns cudaErrorInvalidValue for what its kernels do not support: a head
// dimension other than 64 or 128, a dtype other than fp16/bf16, heads that do not divide,
// lengths past 2^30, B or heads above 65535 (CUDA's grid limit); otherwise the launches' error.

// out = softmax(scale q k^T [masked]) v and its logsumexp. A query row that sees no key gets
// out = 0 and lse = +inf.
cudaError_t attention_fwd(const AttentionParams& params, cudaStream_t stream);

// dq, dk, dv from params (q, k, v, out, lse, mask, causal and scale as in the forward) and
// dout. Deterministic: no atomics.
cudaError_t attention_bwd(const AttentionParams& params, const AttentionGrads& grads, cudaStream_t stream);

// The number of splits decoding uses on the current device for these sizes: enough programs
// for about two waves of the multiprocessors, each split keeping at least 256 keys.
cudaError_t attention_decode_num_splits(const AttentionParams& params, int* num_splits);

// Decoding against KV caches (params.k, params.v): appends the new keys and values at
// positions cache_seqlens[b] .. cache_seqlens[b] + seqlen_new - 1, then attends. With
// total_b = cache_seqlens[b] + seqlen_new, query i of sequence b sees the cache positions
// <= total_b - seqlen_q + i (bottom-right causal alignment), and with a window only those
// >= total_b - seqlen_q + i - window_left; a query that sees none gets
// zeros. A sequence whose new keys do not fit (cache_seqlens[b] < 0 or total_b > L_max) gets
// NaN outputs and nothing written into its cache: checking on the host would stall the stream.
cudaError_t attention_decode(const AttentionParams& params, const NewKeys& new_keys, const DecodeSplits& splits,
                             cudaStream_t stream);

}  // namespace lmkern::cuda
