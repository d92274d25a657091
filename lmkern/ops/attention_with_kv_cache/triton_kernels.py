"""Flash-decoding over a KV cache in Triton, for lmkern.attention_with_kv_cache, on the
blocks of the attention kernels (lmkern/ops/attention/triton_kernels.py).

A small kernel writes the new keys and values into the caches (rotating the keys first
when rotary caches are given); then one program per (split of the keys, block of query
rows, sequence and key/value head) attends, with the query heads that share a key/value
head packed as rows of one tile, so that a single new token still fills a tile under GQA.
With several splits each writes its partial output and lse, and a combine kernel merges
them (flash-decoding). With a sliding window the splits share only the keys that some
query's window holds, so that the cost follows the window, not the cache. A query that
sees no key gets zeros; a sequence whose new keys would not fit gets NaN and writes
nothing. With rotary embeddings each program rotates its queries as it loads them
(apply_rotary's rotate_loaded_rows): q is never rotated through memory.
"""

import functools

import torch
import triton
import triton.language as tl

from lmkern.ops.apply_rotary.triton_kernels import rotate_loaded_rows
from lmkern.ops.attention.triton_kernels import FLT_MAX, LOG2E, NO_MASK, _attend, _block_dim, _exact_fp32, _tile_sizes
from lmkern.ops.attention_with_kv_cache.reference import check_cache_lengths_on_cpu
from lmkern.ops.triton_tuning import autotune
from lmkern.triton_support import interpreting

# A decoding split covers at least this many keys.
MIN_KEYS_PER_SPLIT = 128

# Candidate configs, best first (BLOCK_N, warps, stages); the interpreter gets one small one.
if interpreting():
    DECODE_CONFIGS = [triton.Config({"BLOCK_N": 32}, num_warps=4, num_stages=1)]
else:
    DECODE_CONFIGS = [
        triton.Config({"BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for n, warps, stages in [(64, 4, 2), (64, 4, 4), (32, 2, 3), (32, 4, 2), (16, 4, 2)]
    ]


def _decode_resources(config, args, target):
    """As forward, with BLOCK_M packed query rows; its blocks are too small for wgmma, so
    the key and value blocks are register operands (of mma) on every target."""
    size, m, n, d, dv, threads, stages = _tile_sizes(config, args)
    if _exact_fp32(size, m, n, largest=16 * 16):
        return float("inf"), float("inf")
    registers = m * dv + 2 * m * n + m * d * size / 4 + n * (d + dv) * size / 4
    return size * (m * d + stages * n * (d + dv)), registers / threads


@triton.jit(do_not_specialize=["new_len", "capacity", "rotary_half", "max_positions"])
def kv_cache_append_kernel(
    k_new_ptr,  # (B, H_kv, L_new, D)
    v_new_ptr,  # (B, H_kv, L_new, Dv)
    k_cache_ptr,  # (B, H_kv, L_max, D)
    v_cache_ptr,  # (B, H_kv, L_max, Dv)
    seqlens_ptr,  # (B,) int32 or int64: where each sequence's new keys go
    cos_ptr,  # (P, R / 2) contiguous rotary caches, read if ROTARY
    sin_ptr,
    stride_nb, stride_nh, stride_nn, stride_nd,
    stride_wb, stride_wh, stride_wn, stride_wd,
    stride_cb, stride_ch, stride_cn, stride_cd,
    stride_ub, stride_uh, stride_un, stride_ud,
    new_len,
    capacity,
    rotary_half,  # R / 2
    max_positions,  # P
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """cache[b, h, seqlen_b + n] = new[b, h, n], the keys rotated at position seqlen_b + n if
    ROTARY; a sequence whose new keys would not fit (or with a negative length) writes nothing."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    seqlen = tl.load(seqlens_ptr + b).to(tl.int64)
    fits = (seqlen >= 0) & (seqlen + new_len <= capacity)
    n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    rows_ok = n[:, None] < tl.where(fits, new_len, 0)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = rows_ok & (offs_d[None, :] < HEAD_DIM)
    k_new_ptr += b * stride_nb + h * stride_nh
    k = tl.load(k_new_ptr + n[:, None] * stride_nn + offs_d[None, :] * stride_nd, mask=ok)
    if ROTARY:
        k = rotate_loaded_rows(
            k, k_new_ptr + n * stride_nn, stride_nd, seqlen + n, n < tl.where(fits, new_len, 0), cos_ptr, sin_ptr,
            rotary_half, max_positions, INTERLEAVED, BLOCK_D,
        ).to(k_cache_ptr.dtype.element_ty)
    tl.store(
        k_cache_ptr + b * stride_cb + h * stride_ch + (seqlen + n[:, None]) * stride_cn + offs_d[None, :] * stride_cd,
        k,
        mask=ok,
    )
    ok = rows_ok & (offs_dv[None, :] < HEAD_DIM_V)
    v_new_ptr += b * stride_wb + h * stride_wh
    v = tl.load(v_new_ptr + n[:, None] * stride_wn + offs_dv[None, :] * stride_wd, mask=ok)
    tl.store(
        v_cache_ptr + b * stride_ub + h * stride_uh + (seqlen + n[:, None]) * stride_un + offs_dv[None, :] * stride_ud,
        v,
        mask=ok,
    )


@autotune(
    DECODE_CONFIGS,
    ["capacity_bucket", "HEAD_DIM", "HEAD_DIM_V", "BLOCK_M", "SPLIT", "WINDOWED"],
    _decode_resources,
    do_not_specialize=["seqlen_q", "new_len", "capacity", "capacity_bucket", "rotary_half", "max_positions",
                       "window_left"],
)
def attention_decode_kernel(
    q_ptr,  # (B, H, Lq, D)
    k_ptr,  # (B, H_kv, L_max, D) cache
    v_ptr,  # (B, H_kv, L_max, Dv) cache
    seqlens_ptr,  # (B,) int32 or int64: each sequence's cached length before the new keys
    cos_ptr,  # (P, R / 2) contiguous rotary caches, read if ROTARY
    sin_ptr,
    out_ptr,  # (B, H, Lq, Dv) out, contiguous; with SPLIT (splits, B, H, Lq, Dv) fp32 partial outputs
    lse_ptr,  # with SPLIT: (splits, B, H, Lq) fp32 partial lse in base 2, -inf where a split saw no key
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    kv_heads,
    kv_group,
    seqlen_q,
    new_len,
    capacity,
    capacity_bucket,  # autotuning key only
    qk_scale,
    rotary_half,  # R / 2
    max_positions,  # P
    window_left,  # with WINDOWED query i sees the positions from total - Lq + i - window_left on
    SPLIT: tl.constexpr,
    WINDOWED: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    ROTARY: tl.constexpr,
    INTERLEAVED: tl.constexpr,
):
    """One split of one sequence's keys for one key/value head, against BLOCK_M packed rows
    r = g Lq + i: query i of query head kv_head * kv_group + g. Query i sits at position
    total - Lq + i, total being the sequence's length with its new keys, and sees the keys
    up to there (bottom-right causal alignment); if ROTARY it is rotated at that position
    (at 0 when negative: such a query sees no key)."""
    bh = tl.program_id(0).to(tl.int64)
    b = bh // kv_heads
    kv_head = bh % kv_heads
    split = tl.program_id(1)
    splits = tl.num_programs(1)
    packed = tl.program_id(2) * BLOCK_M + tl.arange(0, BLOCK_M)
    packed_ok = packed < kv_group * seqlen_q
    rows = (packed % seqlen_q).to(tl.int64)
    h = kv_head * kv_group + packed // seqlen_q
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q_rows = q_ptr + b * stride_qb + h * stride_qh + rows * stride_qm
    q = tl.load(q_rows[:, None] + offs_d[None, :] * stride_qd, mask=packed_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
                other=0.0)
    seqlen = tl.load(seqlens_ptr + b).to(tl.int64)
    fits = (seqlen >= 0) & (seqlen + new_len <= capacity)
    total = tl.where(fits, seqlen + new_len, 0)  # a sequence that does not fit reads nothing, and gets NaN
    if ROTARY:
        positions = tl.maximum(total - seqlen_q + rows, 0)
        q = rotate_loaded_rows(q, q_rows, stride_qd, positions, packed_ok, cos_ptr, sin_ptr, rotary_half,
                               max_positions, INTERLEAVED, BLOCK_D).to(q_ptr.dtype.element_ty)
    causal_shift = total - seqlen_q
    first = 0  # no query sees the keys before it: the splits share [first, total)
    if WINDOWED:
        first = tl.minimum(tl.maximum(causal_shift - window_left, 0), total) // BLOCK_N * BLOCK_N
    per_split = tl.cdiv(tl.cdiv(total - first, splits), BLOCK_N) * BLOCK_N
    start = first + split * per_split
    stop = tl.minimum(total, start + per_split)
    # Query 0 sees the keys up to total - Lq: blocks before that need no causal check.
    seen_by_all = tl.maximum(tl.minimum(stop, causal_shift + 1), start)
    unchecked_stop = start + (seen_by_all - start) // BLOCK_N * BLOCK_N
    k_ptr += b * stride_kb + kv_head * stride_kh
    v_ptr += b * stride_vb + kv_head * stride_vh

    m_i = tl.full([BLOCK_M], -FLT_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, q_ptr, 0, 0, q_ptr,
        rows, seqlen_q, stop, causal_shift, window_left, qk_scale, 0, rows, 0.0, 1.0, start, unchecked_stop,
        False, WINDOWED, False, NO_MASK, False, False, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
    )
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, q_ptr, 0, 0, q_ptr,
        rows, seqlen_q, stop, causal_shift, window_left, qk_scale, 0, rows, 0.0, 1.0, unchecked_stop, stop,
        True, WINDOWED, True, NO_MASK, False, False, False, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM, HEAD_DIM_V,
    )
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    out = tl.where(fits, out, float("nan"))
    heads = kv_heads * kv_group
    out_rows = (b * heads + h) * seqlen_q + rows  # (B, H, Lq) row index
    out_ok = packed_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V)
    if SPLIT:
        out_rows += split * (tl.num_programs(0) // kv_heads) * heads * seqlen_q
        lse = tl.where(seen, m_i + tl.log2(tl.where(seen, l_i, 1.0)), float("-inf"))
        tl.store(lse_ptr + out_rows, tl.where(fits, lse, 0.0), mask=packed_ok)
    tl.store(out_ptr + out_rows[:, None] * HEAD_DIM_V + offs_dv[None, :], out.to(out_ptr.dtype.element_ty), mask=out_ok)


@triton.jit
def attention_decode_combine_kernel(
    partial_out_ptr,  # (splits, B H Lq, Dv) fp32
    partial_lse_ptr,  # (splits, B H Lq) fp32, base 2
    out_ptr,  # (B H Lq, Dv) out
    n_rows,
    splits,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_S: tl.constexpr,
):
    """out = sum_s w_s out_s / sum_s w_s with w_s = 2^(lse_s - max lse): the softmax over
    all keys from the splits' softmaxes. A row no split saw anything for gets 0."""
    row = tl.program_id(0).to(tl.int64)
    s = tl.arange(0, BLOCK_S).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    lse = tl.load(partial_lse_ptr + s * n_rows + row, mask=s < splits, other=float("-inf"))
    weight = tl.where(lse > float("-inf"), tl.exp2(lse - tl.max(lse, 0)), 0.0)
    parts = tl.load(
        partial_out_ptr + (s[:, None] * n_rows + row) * HEAD_DIM_V + offs_dv[None, :],
        mask=(s[:, None] < splits) & (offs_dv[None, :] < HEAD_DIM_V),
        other=0.0,
    )
    total = tl.sum(weight, 0)
    out = tl.sum(parts * weight[:, None], 0) / tl.where(total > 0, total, 1.0)
    tl.store(out_ptr + row * HEAD_DIM_V + offs_dv, out.to(out_ptr.dtype.element_ty), mask=offs_dv < HEAD_DIM_V)


@functools.lru_cache
def _programs_to_fill(device):
    """Programs that keep the device busy: two per SM on a GPU; a few in the interpreter,
    so that the tests see keys split."""
    if device.type != "cuda":
        return 4
    return 2 * torch.cuda.get_device_properties(device).multi_processor_count


def decode_splits(programs, keys, device):
    """How many parts each sequence's keys are split into: enough programs to fill the
    device, with at least MIN_KEYS_PER_SPLIT of the `keys` a sequence may read each (the
    cache's capacity, or a window's span), at most 64."""
    wanted = triton.cdiv(_programs_to_fill(device), programs)
    return max(1, min(wanted, keys // MIN_KEYS_PER_SPLIT, 64))


def attention_with_kv_cache_fwd(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
    window_left=-1,
):
    """Same contract as reference.attention_with_kv_cache_fwd (rotary_cos and rotary_sin
    contiguous, of one dtype)."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, capacity, head_dim_v = k_cache.shape[1], k_cache.shape[2], v_cache.shape[3]
    new_len = 0 if k_new is None else k_new.shape[2]
    rotary = rotary_cos is not None
    # CPU tensors run in the interpreter
    check_cache_lengths_on_cpu(cache_seqlens, new_len, capacity, rotary_cos.shape[0] if rotary else None)
    if rotary:
        rotary_args = (rotary_cos, rotary_sin)
        rotary_sizes = (rotary_cos.shape[1], rotary_cos.shape[0])
    else:  # never read
        rotary_args, rotary_sizes = (cache_seqlens, cache_seqlens), (1, 0)
    rotary_flags = {"ROTARY": rotary, "INTERLEAVED": bool(rotary_interleaved)}
    block_d, block_dv = _block_dim(head_dim), _block_dim(head_dim_v)
    if new_len > 0:
        block_n = 16
        kv_cache_append_kernel[(triton.cdiv(new_len, block_n), kv_heads, batch)](
            k_new, v_new, k_cache, v_cache, cache_seqlens, *rotary_args,
            *k_new.stride(), *v_new.stride(), *k_cache.stride(), *v_cache.stride(), new_len, capacity, *rotary_sizes,
            HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d, BLOCK_DV=block_dv, BLOCK_N=block_n,
            **rotary_flags,
        )
    out = torch.empty(batch, heads, seqlen_q, head_dim_v, dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    packed_rows = heads // kv_heads * seqlen_q
    block_m = min(64, max(16, triton.next_power_of_2(packed_rows)))
    row_blocks = triton.cdiv(packed_rows, block_m)
    span = capacity if window_left < 0 else min(capacity, window_left + seqlen_q)  # keys a sequence may read
    splits = decode_splits(batch * kv_heads * row_blocks, span, q.device)
    if splits > 1:
        partial_out = torch.empty(splits, *out.shape, dtype=torch.float32, device=q.device)
        partial_lse = torch.empty(splits, batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    else:
        partial_out, partial_lse = out, out
    attention_decode_kernel[(batch * kv_heads, splits, row_blocks)](
        q, k_cache, v_cache, cache_seqlens, *rotary_args, partial_out, partial_lse,
        *q.stride(), *k_cache.stride(), *v_cache.stride(),
        kv_heads, heads // kv_heads, seqlen_q, new_len, capacity, triton.next_power_of_2(capacity), scale * LOG2E.value,
        *rotary_sizes, window_left,
        SPLIT=splits > 1, WINDOWED=window_left >= 0, HEAD_DIM=head_dim, HEAD_DIM_V=head_dim_v, BLOCK_D=block_d,
        BLOCK_DV=block_dv, BLOCK_M=block_m, **rotary_flags,
    )
    if splits > 1:
        n_rows = batch * heads * seqlen_q
        attention_decode_combine_kernel[(n_rows,)](
            partial_out, partial_lse, out, n_rows, splits,
            HEAD_DIM_V=head_dim_v, BLOCK_DV=block_dv, BLOCK_S=max(16, triton.next_power_of_2(splits)),
        )
    return out
