"""Attention in Triton: the FlashAttention-2 forward and backward (the decoding kernels of
lmkern.attention_with_kv_cache, in lmkern/ops/attention_with_kv_cache/triton_kernels.py,
build on the blocks here).

Forward, one program per BLOCK_M query rows of one head: for each block of BLOCK_N keys,
s = scale q k^T (+ mask), kept in base 2 (times log2 e) so that exp is exp2. An online
softmax keeps per row the running max m and the running sum l of exp2(s - m), and rescales
the output accumulator by exp2(m_old - m_new) when m grows; at the end out = acc / l, and
lse = (m + log2 l) ln 2 is saved for backward. With is_causal the key blocks above the
diagonal are skipped, not masked, and the blocks that every row of the tile sees run
without per-element causal or bounds checks. A sliding window (window_left >= 0: query i
sees keys j >= i + causal_shift - window_left; its right bound arrives as a shifted causal
diagonal) skips the key blocks before it too, so that a fixed window costs time linear in
the length; the blocks it keeps are checked against its bound element by element.

Backward, with P = exp(s - lse) recomputed from the saved lse, Z the dropout factor
(keep / (1 - p), 1 without dropout) and delta_i = sum_d dO_id O_id from a pre-pass:

    dV = (P Z)^T dO,   dP = (dO V^T) Z,   dS = P (dP - delta),   dQ = scale dS K,   dK = scale dS^T Q.

The backward kernel runs twice: once with a program per key block computing dK and dV,
looping over the query blocks (and over the query heads that share a key/value head under
GQA), once with a program per query block computing dQ. Every gradient element has one
writer: no atomics, and the results are deterministic.

An additive mask that requires grad gets dmask = dS, summed over the dimensions it
broadcasts over (T5's bias (1, H, Lq, Lk) over the batch), from a third kernel: one program
per tile of the mask as the caller holds it, which recomputes dS for every (batch, head)
the tile gathers and adds them in a fixed order. One writer per element again, and no
(B, H, Lq, Lk) buffer; the price is the two matmuls of S and dP once more.

A relative bias (H | 1, Lq + Lk - 1), whose row i is the slice starting at column
Lq - 1 - i, is read as a full mask with query stride -1; a mask beside it that depends on
the key only (T5's encoder padding) is read as a key bias, a vector per key block (any
other is materialised with the bias into one mask). The bias's gradient comes from the
same third kernel, with a program per (key block, query block, head) of a (1, H | 1, Lq,
Lk) mask; each sums its fp32 tile along the diagonals j - i (a gather that skews the
tile) into a partial buffer, one writer per element, which the host sums in a fixed order.

Dropout regenerates its mask from (seed, offset) with tl.rand, in forward and in backward;
the offsets number the (B, H, Lq, Lk) probabilities in row-major order, as in
lmkern.philox and the other backends.

Rows that see no key get out = 0 and lse = +inf, so that backward's P is 0 there.
"""

import torch
import triton
import triton.language as tl

from lmkern.triton_support import interpreting
from lmkern.ops.triton_tuning import autotune
from lmkern.ops.attention import reference
from lmkern.ops.attention.backends import depends_on_key_only
from lmkern.ops.attention.reference import dropout_scale

LOG2E = tl.constexpr(1.4426950408889634)
LN2 = tl.constexpr(0.6931471805599453)
# Start of the running max: -FLT_MAX rather than -inf, so that rescaling after a block of
# only masked scores is exp2(0) = 1 instead of exp2(-inf + inf) = NaN.
FLT_MAX = tl.constexpr(3.4028234663852886e38)
# How a mask is read: per key (its query stride is 0, as for a key-padding mask: one
# vector per key block) or per element (one tile per block).
NO_MASK = tl.constexpr(0)
KEY_MASK = tl.constexpr(1)
FULL_MASK = tl.constexpr(2)
# Columns after a key bias's last key, so that its key blocks load it without bounds checks.
KEY_BIAS_PAD = tl.constexpr(128)


def _configs(shapes):
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=warps, num_stages=stages)
        for m, n, warps, stages in shapes
    ]


# Candidate configs, best first, (BLOCK_M, BLOCK_N, warps, stages); the autotuner keeps the
# first MAX_CONFIGS whose tiles fit (lmkern/ops/triton_tuning.py, with the estimates below):
# the big tiles at head dim 64, 8 warps over smaller ones at 128 and 256. Static lists:
# nothing here asks a GPU what it is. The interpreter gets one small config, which the
# autotuner then runs without timing anything.
if interpreting():
    FWD_CONFIGS = BWD_CONFIGS = _configs([(32, 32, 4, 1)])
else:
    FWD_CONFIGS = _configs(
        [(128, 64, 8, 3), (128, 128, 8, 3), (128, 64, 4, 3), (64, 64, 4, 3), (128, 32, 8, 2), (64, 64, 8, 2),
         (32, 32, 4, 2), (16, 16, 4, 2)]
    )
    # One list for both backward roles, each taking its own shape of tile: wide key blocks
    # (BLOCK_N >= BLOCK_M) for dK/dV, wide query blocks for dQ.
    BWD_CONFIGS = _configs(
        [(64, 128, 8, 3), (128, 64, 8, 3), (64, 64, 4, 3), (32, 64, 4, 4), (64, 32, 4, 4), (64, 32, 8, 2),
         (16, 32, 8, 2), (16, 16, 4, 2)]
    )


def _tile_sizes(config, args):
    """(bytes per element, BLOCK_M, BLOCK_N, BLOCK_D, BLOCK_DV, threads, stages) of a launch."""
    return (
        args["q_ptr"].element_size(), config.kwargs.get("BLOCK_M", args.get("BLOCK_M")), config.kwargs["BLOCK_N"],
        args["BLOCK_D"], args["BLOCK_DV"], 32 * config.num_warps, config.num_stages,
    )


def _score_tiles(args, computed):
    """Tiles of the scores' shape live at once, in registers: `computed` fp32 tiles of the
    math; a full mask's int64 addresses and values (3, and 6 for a relative bias, whose
    negative query stride defeats vector loads: 64 x 64 forward tiles at head dim 128
    spilled at 4 on sm_90, triton 3.9), a key mask's selects (1); dropout's
    int64 offsets, random numbers and keep factors (4); a causal shift's bounds (1); a
    window's bounds (1, and 3 at head dims over 128, where 64-row tiles with a window spilled
    at the estimate of 1: benchmarks/results/triton-check/)."""
    kind = args["MASK_KIND"]
    mask = {NO_MASK.value: 0, KEY_MASK.value: 1, FULL_MASK.value: 3}[kind] + 3 * (
        kind == FULL_MASK.value and args["stride_mm"] < 0
    )
    window = (1 if args["BLOCK_D"] <= 128 else 3) * bool(args["WINDOWED"])
    return computed + mask + 4 * bool(args["HAS_DROPOUT"]) + bool(args["CAUSAL_SHIFTED"]) + window


def _exact_fp32(size, m, n, largest=16 * 32):
    """fp32 attention multiplies exactly, in FMA dots that hold each thread's rows of both
    operands at the full head dim: only tiles of 16 x 16 or 16 x 32 compile quickly and
    without spills at head dims up to 256 (16 x 16 for decoding; see
    benchmarks/results/triton-check/)."""
    return size == 4 and m * n > largest


def _operand_registers(tile, size, target):
    """Registers of a matrix-product operand that streams through the loop: none with
    wgmma (read from shared memory) unless fp32 (exact FMA dots take registers), all of it
    with mma.sync."""
    return 0 if target.wgmma and size < 4 else tile * size / 4


def _fwd_resources(config, args, target):
    """Shared memory: q, and `stages` buffers of a key and a value block. Registers: the
    fp32 output accumulator and the score tiles, q, and the key and value blocks as
    operands."""
    size, m, n, d, dv, threads, stages = _tile_sizes(config, args)
    if _exact_fp32(size, m, n):
        return float("inf"), float("inf")
    if args["stride_mm"] < 0 and target.wgmma and (m, n, threads) == (32, 32, 128) and d <= 64:
        # A relative bias: 32 x 32 tiles on 4 warps spilled at head dim 64 on sm_90 (triton
        # 3.9; benchmarks/results/triton-check/), where the estimate stays under the budget.
        return float("inf"), float("inf")
    registers = (
        m * dv + _score_tiles(args, 2) * m * n + m * d * size / 4 + _operand_registers(n * (d + dv), size, target)
    )
    return size * (m * d + stages * n * (d + dv)), registers / threads


def _bwd_resources(config, args, target):
    """Per role, the block that stays (keys and values for dK/dV, queries and dO for dQ)
    with its fp32 gradient accumulators, against `stages` buffers of the block that streams
    past, and the score tiles (P, dP, dS and more). A role's configs are those of its shape
    (wide key blocks for dK/dV); others get an infinite estimate, so none is kept."""
    size, m, n, d, dv, threads, stages = _tile_sizes(config, args)
    resident, streamed = (n, m) if args["DKDV"] else (m, n)
    # Exact fp32 (see _exact_fp32): one tile per role, 16 keys x 32 queries for dK/dV (16 x
    # 16 spills there with a causal shift on sm_80) and 16 x 16 for dQ.
    fp32_tile = (16, 32) if args["DKDV"] else (16, 16)
    if resident < streamed or (size == 4 and (m, n) != fp32_tile):
        return float("inf"), float("inf")
    full_mask = args["MASK_KIND"] == FULL_MASK.value
    if args["DKDV"] and (args["WINDOWED"] or full_mask) and d > 128 and threads < 256:
        # dK/dV of a window, or with a full mask (a learned bias), at head dims over 128:
        # 16 x 16 tiles on 4 warps spilled under triton 3.6 on sm_90
        # (benchmarks/results/triton-check/); 8 warps hold them.
        return float("inf"), float("inf")
    accumulators = n * (d + dv) if args["DKDV"] else m * d
    registers = (
        accumulators + _score_tiles(args, 3) * m * n + resident * (d + dv) * size / 4
        + _operand_registers(streamed * (d + dv), size, target)
    )
    return size * (resident + stages * streamed) * (d + dv), registers / threads


def _mask_bwd_resources(config, args, target):
    """As the dQ role of _bwd_resources (queries and dO stay, keys and values stream past:
    query blocks at least as wide as key blocks), with the fp32 mask tile in place of the
    dQ accumulator. What spilled (benchmarks/results/triton-check/) is left out: exact fp32
    (see _exact_fp32) takes 16 x 16 tiles on 4 warps up to head dim 64 (16 x 32 on 8 warps
    spilled there on sm_80, triton 3.6) and 16 x 32 on 8 warps above (16 x 16 spilled at 128
    on sm_90, triton 3.9); without wgmma, 64-query tiles need 8 warps (4 spilled at head
    dim 64 on sm_80, triton 3.6), and head dims over 128 16-query tiles (64 x 32 spilled
    at 256 on sm_80, triton 3.9)."""
    size, m, n, d, dv, threads, stages = _tile_sizes(config, args)
    # A relative bias's 16 x 16 fp32 tiles on 4 warps spilled at head dim 64 on sm_90 (triton 3.6).
    wide_fp32 = max(d, dv) > 64 or (args["RELATIVE"] and target.wgmma)
    fp32_tile = (16, 32, 256) if wide_fp32 else (16, 16, 128)
    if (size == 4 and (m, n, threads) != fp32_tile) or (size < 4 and m < n):
        return float("inf"), float("inf")
    if not target.wgmma and ((m >= 64 and threads < 256) or (max(d, dv) > 128 and m > 16)):
        return float("inf"), float("inf")
    # A relative bias's diagonal sums gather the tile into (BLOCK_M, diagonals): values and indices.
    diagonals = 2 * n if m <= n else 4 * n
    registers = (
        m * n + _score_tiles(args, 3) * m * n + m * (d + dv) * size / 4
        + _operand_registers(n * (d + dv), size, target) + 2 * m * diagonals * bool(args["RELATIVE"])
    )
    return size * (m + stages * n) * (d + dv), registers / threads


# Autotuning keys: lengths are bucketed to powers of two so that varying lengths do not
# re-tune at every call, and lengths (and the causal shift and window) that only bound loops
# and masks are not specialised on, so that they do not recompile either.
ATTENTION_KEY = [
    "seqlen_bucket", "HEAD_DIM", "HEAD_DIM_V", "IS_CAUSAL", "CAUSAL_SHIFTED", "WINDOWED", "MASK_KIND", "KEY_BIAS",
    "HAS_DROPOUT",
]
LENGTHS = ["seqlen_q", "seqlen_k", "causal_shift", "window_left", "seqlen_bucket"]


@triton.jit
def _load_tile(ptrs, rows_ok, cols_ok, CHECK_ROWS: tl.constexpr, CHECK_COLS: tl.constexpr):
    """A tile, zero where a checked bound fails; each check is a compile-time choice."""
    if CHECK_ROWS:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=rows_ok & cols_ok, other=0.0)
        else:
            tile = tl.load(ptrs, mask=rows_ok, other=0.0)
    else:
        if CHECK_COLS:
            tile = tl.load(ptrs, mask=cols_ok, other=0.0)
        else:
            tile = tl.load(ptrs)
    return tile


@triton.jit
def _mask_scores(
    s,  # scores in base 2, shaped like rows x cols after broadcasting (a tile or its transpose)
    rows,  # query indices, int64
    cols,  # key indices
    mask_ptr,  # the mask of this (batch, head): mask_ptr + i stride_mm + j stride_mn
    stride_mm,
    stride_mn,
    key_bias_ptr,  # with KEY_BIAS, this batch's (Lk + KEY_BIAS_PAD,) fp32 additive key mask, 0 past Lk
    seqlen_q,
    seqlen_k,
    causal_shift,  # query i sees key j when j <= i + causal_shift
    window_left,  # and with WINDOWED when j >= i + causal_shift - window_left
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
):
    """s with -inf where query `rows` may not see key `cols`, plus an additive mask and with
    KEY_BIAS a key bias (whose values are in natural units). rows and cols broadcast to s's
    shape, so that one function serves the forward's tiles and the backward's transposed ones."""
    if MASK_KIND == KEY_MASK:
        values = tl.load(mask_ptr + cols * stride_mn, mask=cols < seqlen_k, other=0)
    if MASK_KIND == FULL_MASK:
        in_bounds = (rows < seqlen_q) & (cols < seqlen_k)
        values = tl.load(mask_ptr + rows * stride_mm + cols * stride_mn, mask=in_bounds, other=0)
    if MASK_KIND != NO_MASK:
        if MASK_IS_BOOL:
            s = tl.where(values != 0, s, float("-inf"))
        else:
            s = s + values.to(tl.float32) * LOG2E
    if KEY_BIAS:
        s = s + tl.load(key_bias_ptr + cols) * LOG2E
    # In int32 (lengths fit): 64-bit bounds made small tiles spill on sm_80.
    if CAUSAL:
        s = tl.where(cols.to(tl.int32) <= rows.to(tl.int32) + causal_shift, s, float("-inf"))
    if WINDOWED:
        s = tl.where(cols.to(tl.int32) >= rows.to(tl.int32) + (causal_shift - window_left), s, float("-inf"))
    if CHECK_KEYS:
        s = tl.where(cols < seqlen_k, s, float("-inf"))
    return s


@triton.jit
def _dropout_factor(seed, row_offsets, cols, seqlen_k, dropout_p, dropout_scale):
    """keep / (1 - p) for the probabilities at (row_offsets + cols): element (b, h, i, j)
    has offset ((b H + h) Lq + i) Lk + j, with row_offsets = (b H + h) Lq + i, int64."""
    keep = tl.rand(seed, row_offsets * seqlen_k + cols) >= dropout_p
    return tl.where(keep, dropout_scale, 0.0)


@triton.jit
def _key_blocks(
    start_m,
    seqlen_k,
    causal_shift,
    window_left,
    IS_CAUSAL: tl.constexpr,
    CAUSAL_SHIFTED: tl.constexpr,
    WINDOWED: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """(start, unchecked_stop, checked_start, stop) for the query rows [start_m, start_m +
    BLOCK_M): the key blocks from start to unchecked_stop are seen whole by every row (no
    causal or bounds check; a window's bound is checked); those from checked_start to stop
    need the checks. Under is_causal the blocks after stop (above the diagonal, query i
    seeing keys j <= i + causal_shift) are skipped, and with a window those before start
    (before start_m + causal_shift - window_left). Without a window the bounds are computed
    as they were before windows existed: at head dim 256 one more operation spilled."""
    if IS_CAUSAL and CAUSAL_SHIFTED:  # the shift may make the bounds negative
        stop = tl.minimum(seqlen_k, tl.maximum(start_m + BLOCK_M + causal_shift, 0))
        seen_by_all = tl.minimum(seqlen_k, tl.maximum(start_m + 1 + causal_shift, 0))
    elif IS_CAUSAL:
        stop = tl.minimum(seqlen_k, start_m + BLOCK_M)
        seen_by_all = tl.minimum(seqlen_k, start_m + 1)
    else:
        stop = seqlen_k
        seen_by_all = seqlen_k
    unchecked_stop = seen_by_all // BLOCK_N * BLOCK_N
    start = 0
    checked_start = unchecked_stop
    if WINDOWED:
        start = tl.minimum(tl.maximum(start_m + causal_shift - window_left, 0), stop) // BLOCK_N * BLOCK_N
        checked_start = tl.maximum(start, unchecked_stop)
    return start, unchecked_stop, checked_start, stop


@triton.jit
def _block_scores(
    q,  # (BLOCK_M, BLOCK_D)
    k_ptr,  # this (batch, key/value head)'s keys, rows stride_kn apart
    stride_kn,
    stride_kd,
    mask_ptr,
    stride_mm,
    stride_mn,
    key_bias_ptr,
    rows,  # (BLOCK_M,) query indices, int64
    cols,  # (BLOCK_N,) key indices, int64
    seqlen_q,
    seqlen_k,
    causal_shift,
    window_left,
    qk_scale,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    BLOCK_D: tl.constexpr,
    HEAD_DIM: tl.constexpr,
):
    """(s, k^T): the masked scores of rows x cols in base 2, (BLOCK_M, BLOCK_N), and the
    keys they were computed from, read transposed, (BLOCK_D, BLOCK_N)."""
    offs_d = tl.arange(0, BLOCK_D)
    k_t = _load_tile(
        k_ptr + cols[None, :] * stride_kn + offs_d[:, None] * stride_kd,
        cols[None, :] < seqlen_k,
        offs_d[:, None] < HEAD_DIM,
        CHECK_KEYS,
        HEAD_DIM != BLOCK_D,
    )
    s = tl.dot(q, k_t, input_precision="ieee") * qk_scale
    s = _mask_scores(
        s, rows[:, None], cols[None, :], mask_ptr, stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k, causal_shift,
        window_left, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, CAUSAL, WINDOWED, CHECK_KEYS,
    )
    return s, k_t


@triton.jit
def _attend(
    acc,  # (BLOCK_M, BLOCK_DV) fp32: sum_j exp2(s_ij - m_i) Z_ij v_j so far
    m_i,  # (BLOCK_M,) running max of the scores, base 2
    l_i,  # (BLOCK_M,) running sum of exp2(s_ij - m_i), without dropout
    q,  # (BLOCK_M, BLOCK_D)
    k_ptr,  # this (batch, key/value head)'s keys, rows stride_kn apart
    stride_kn,
    stride_kd,
    v_ptr,
    stride_vn,
    stride_vd,
    mask_ptr,
    stride_mm,
    stride_mn,
    key_bias_ptr,
    rows,  # (BLOCK_M,) query index of each row, int64
    seqlen_q,
    seqlen_k,  # keys at or past it are not read
    causal_shift,
    window_left,
    qk_scale,  # scale * log2(e)
    seed,
    dropout_rows,  # (BLOCK_M,) (b H + h) Lq + i, int64
    dropout_p,
    dropout_scale,
    start,
    stop,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """The online softmax over the key blocks starting in [start, stop)."""
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # cols * stride may pass 2^31
        s, _ = _block_scores(
            q, k_ptr, stride_kn, stride_kd, mask_ptr, stride_mm, stride_mn, key_bias_ptr, rows, cols, seqlen_q,
            seqlen_k, causal_shift, window_left, qk_scale, CAUSAL, WINDOWED, CHECK_KEYS, MASK_KIND, MASK_IS_BOOL,
            KEY_BIAS, BLOCK_D, HEAD_DIM,
        )
        m_new = tl.maximum(m_i, tl.max(s, 1))
        alpha = tl.exp2(m_i - m_new)
        p = tl.exp2(s - m_new[:, None])
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            p = p * _dropout_factor(seed, dropout_rows[:, None], cols[None, :], seqlen_k, dropout_p, dropout_scale)
        v = _load_tile(  # (BLOCK_N, BLOCK_DV)
            v_ptr + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            cols[:, None] < seqlen_k,
            offs_dv[None, :] < HEAD_DIM_V,
            CHECK_KEYS,
            HEAD_DIM_V != BLOCK_DV,
        )
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision="ieee")
        m_i = m_new
    return acc, m_i, l_i


@autotune(FWD_CONFIGS, ATTENTION_KEY, _fwd_resources, do_not_specialize=LENGTHS)
def attention_fwd_kernel(
    q_ptr,  # (B, H, Lq, D)
    k_ptr,  # (B, H_kv, Lk, D)
    v_ptr,  # (B, H_kv, Lk, Dv)
    mask_ptr,  # (B, H, Lq, Lk) bool (as uint8) or float, usually with 0 strides; unused without a mask
    key_bias_ptr,  # (B, Lk + KEY_BIAS_PAD) fp32, an additive key mask beside a relative bias; unused without KEY_BIAS
    out_ptr,  # (B, H, Lq, Dv) out
    lse_ptr,  # (B, H, Lq) fp32 out, contiguous
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_ob, stride_oh, stride_om, stride_od,
    heads,
    kv_group,  # query heads per key/value head
    seqlen_q,
    seqlen_k,
    causal_shift,  # with IS_CAUSAL query i sees key j when j <= i + causal_shift
    window_left,  # with WINDOWED query i sees key j when j >= i + causal_shift - window_left
    seqlen_bucket,  # autotuning key only
    qk_scale,
    dropout_p,
    dropout_scale,
    seed,
    IS_CAUSAL: tl.constexpr,
    CAUSAL_SHIFTED: tl.constexpr,  # else causal_shift is 0 (torch's top-left alignment), known when compiling
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    start_m = tl.program_id(0) * BLOCK_M
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    q = _load_tile(
        q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
        rows[:, None] < seqlen_q,
        offs_d[None, :] < HEAD_DIM,
        True,
        HEAD_DIM != BLOCK_D,
    )
    kv_head = h // kv_group
    k_ptr += b * stride_kb + kv_head * stride_kh
    v_ptr += b * stride_vb + kv_head * stride_vh
    mask_ptr += b * stride_mb + h * stride_mh
    key_bias_ptr += b * (seqlen_k + KEY_BIAS_PAD)
    dropout_rows = (b * heads + h) * seqlen_q + rows

    if not CAUSAL_SHIFTED:
        causal_shift = 0
    start, unchecked_stop, checked_start, stop = _key_blocks(
        start_m, seqlen_k, causal_shift, window_left, IS_CAUSAL, CAUSAL_SHIFTED, WINDOWED, BLOCK_M, BLOCK_N
    )

    m_i = tl.full([BLOCK_M], -FLT_MAX, tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_DV], tl.float32)
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
        key_bias_ptr, rows, seqlen_q, seqlen_k, causal_shift, window_left, qk_scale, seed, dropout_rows, dropout_p,
        dropout_scale,
        start, unchecked_stop,
        False, WINDOWED, False, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV, HEAD_DIM,
        HEAD_DIM_V,
    )
    acc, m_i, l_i = _attend(
        acc, m_i, l_i, q, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, mask_ptr, stride_mm, stride_mn,
        key_bias_ptr, rows, seqlen_q, seqlen_k, causal_shift, window_left, qk_scale, seed, dropout_rows, dropout_p,
        dropout_scale,
        checked_start, stop,
        IS_CAUSAL, WINDOWED, True, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV,
        HEAD_DIM, HEAD_DIM_V,
    )
    # Rows that saw no key (l = 0) get out = 0 and lse = +inf.
    seen = l_i > 0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * LN2, float("inf"))
    rows_ok = rows < seqlen_q
    out_ptrs = out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od
    tl.store(out_ptrs, out.to(out_ptr.dtype.element_ty), mask=rows_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V))
    tl.store(lse_ptr + (b * heads + h) * seqlen_q + rows, lse, mask=rows_ok)


@triton.jit(do_not_specialize=["seqlen_q"])
def attention_bwd_delta_kernel(
    out_ptr,  # (B, H, Lq, Dv)
    grad_out_ptr,  # (B, H, Lq, Dv)
    delta_ptr,  # (B, H, Lq) fp32 out, contiguous
    stride_ob, stride_oh, stride_om, stride_od,
    stride_gb, stride_gh, stride_gm, stride_gd,
    heads,
    seqlen_q,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
):
    """delta_i = sum_d dO_id O_id."""
    h = tl.program_id(1).to(tl.int64)
    b = tl.program_id(2).to(tl.int64)
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    offs_dv = tl.arange(0, BLOCK_DV)
    ok = (rows[:, None] < seqlen_q) & (offs_dv[None, :] < HEAD_DIM_V)
    out = tl.load(
        out_ptr + b * stride_ob + h * stride_oh + rows[:, None] * stride_om + offs_dv[None, :] * stride_od, mask=ok
    )
    grad_out = tl.load(
        grad_out_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
        mask=ok,
    )
    delta = tl.sum(out.to(tl.float32) * grad_out.to(tl.float32), axis=1)
    tl.store(delta_ptr + (b * heads + h) * seqlen_q + rows, delta, mask=rows < seqlen_q)


@triton.jit
def _dkdv_blocks(
    dk,  # (BLOCK_N, BLOCK_D) fp32, unscaled
    dv,  # (BLOCK_N, BLOCK_DV) fp32
    k,  # (BLOCK_N, BLOCK_D)
    v,  # (BLOCK_N, BLOCK_DV)
    cols,  # (BLOCK_N,) key indices
    q_ptr,  # this (batch, query head)'s rows
    stride_qm,
    stride_qd,
    grad_out_ptr,
    stride_gm,
    stride_gd,
    lse_ptr,  # this (batch, query head)'s (Lq,) lse and delta
    delta_ptr,
    mask_ptr,
    stride_mm,
    stride_mn,
    key_bias_ptr,
    seqlen_q,
    seqlen_k,
    causal_shift,
    window_left,
    qk_scale,
    seed,
    dropout_row0,  # (b H + h) Lq, int64
    dropout_p,
    dropout_scale,
    start,
    stop,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """dK, dV of one key block from the query blocks starting in [start, stop), computed
    transposed (keys as rows). Keys past seqlen_k were loaded as zeros and are never stored;
    queries past seqlen_q load lse = +inf, so P = 0 there."""
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_m in range(start, stop, BLOCK_M):
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        rows_ok = rows < seqlen_q
        q_t = _load_tile(  # (BLOCK_D, BLOCK_M)
            q_ptr + rows[None, :] * stride_qm + offs_d[:, None] * stride_qd,
            rows_ok[None, :],
            offs_d[:, None] < HEAD_DIM,
            True,
            HEAD_DIM != BLOCK_D,
        )
        grad_out = _load_tile(  # (BLOCK_M, BLOCK_DV)
            grad_out_ptr + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
            rows_ok[:, None],
            offs_dv[None, :] < HEAD_DIM_V,
            True,
            HEAD_DIM_V != BLOCK_DV,
        )
        lse = tl.load(lse_ptr + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(delta_ptr + rows, mask=rows_ok, other=0.0)
        s_t = tl.dot(k, q_t, input_precision="ieee") * qk_scale  # (BLOCK_N, BLOCK_M)
        s_t = _mask_scores(
            s_t, rows[None, :], cols[:, None], mask_ptr, stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k,
            causal_shift, window_left, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, CAUSAL, WINDOWED, False,
        )
        p_t = tl.exp2(s_t - lse[None, :] * LOG2E)
        dp_t = tl.dot(v, tl.trans(grad_out), input_precision="ieee")
        if HAS_DROPOUT:
            z_t = _dropout_factor(seed, dropout_row0 + rows[None, :], cols[:, None], seqlen_k, dropout_p, dropout_scale)
            dv += tl.dot((p_t * z_t).to(grad_out.dtype), grad_out, input_precision="ieee")
            dp_t = dp_t * z_t
        else:
            dv += tl.dot(p_t.to(grad_out.dtype), grad_out, input_precision="ieee")
        ds_t = p_t * (dp_t - delta[None, :])
        dk += tl.dot(ds_t.to(q_t.dtype), tl.trans(q_t), input_precision="ieee")
    return dk, dv


@triton.jit
def _dq_blocks(
    dq,  # (BLOCK_M, BLOCK_D) fp32, unscaled
    q,  # (BLOCK_M, BLOCK_D)
    grad_out,  # (BLOCK_M, BLOCK_DV)
    lse,  # (BLOCK_M,) natural units, +inf past seqlen_q
    delta,  # (BLOCK_M,)
    rows,
    k_ptr,
    stride_kn,
    stride_kd,
    v_ptr,
    stride_vn,
    stride_vd,
    mask_ptr,
    stride_mm,
    stride_mn,
    key_bias_ptr,
    seqlen_q,
    seqlen_k,
    causal_shift,
    window_left,
    qk_scale,
    seed,
    dropout_rows,
    dropout_p,
    dropout_scale,
    start,
    stop,
    CAUSAL: tl.constexpr,
    WINDOWED: tl.constexpr,
    CHECK_KEYS: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
):
    """dQ of one query block from the key blocks starting in [start, stop)."""
    offs_dv = tl.arange(0, BLOCK_DV)
    for start_n in range(start, stop, BLOCK_N):
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)  # cols * stride may pass 2^31
        s, k_t = _block_scores(
            q, k_ptr, stride_kn, stride_kd, mask_ptr, stride_mm, stride_mn, key_bias_ptr, rows, cols, seqlen_q,
            seqlen_k, causal_shift, window_left, qk_scale, CAUSAL, WINDOWED, CHECK_KEYS, MASK_KIND, MASK_IS_BOOL,
            KEY_BIAS, BLOCK_D, HEAD_DIM,
        )
        v_t = _load_tile(  # (BLOCK_DV, BLOCK_N)
            v_ptr + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
            cols[None, :] < seqlen_k, offs_dv[:, None] < HEAD_DIM_V, CHECK_KEYS, HEAD_DIM_V != BLOCK_DV,
        )
        p = tl.exp2(s - lse[:, None] * LOG2E)
        dp = tl.dot(grad_out, v_t, input_precision="ieee")
        if HAS_DROPOUT:
            dp = dp * _dropout_factor(seed, dropout_rows[:, None], cols[None, :], seqlen_k, dropout_p, dropout_scale)
        ds = p * (dp - delta[:, None])
        dq += tl.dot(ds.to(k_t.dtype), tl.trans(k_t), input_precision="ieee")
    return dq


@autotune(BWD_CONFIGS, [*ATTENTION_KEY, "DKDV"], _bwd_resources, do_not_specialize=LENGTHS)
def attention_bwd_kernel(
    q_ptr,  # (B, H, Lq, D)
    k_ptr,  # (B, H_kv, Lk, D)
    v_ptr,  # (B, H_kv, Lk, Dv)
    mask_ptr,  # as in attention_fwd_kernel
    key_bias_ptr,
    grad_out_ptr,  # (B, H, Lq, Dv)
    lse_ptr,  # (B, H, Lq) fp32, contiguous
    delta_ptr,  # (B, H, Lq) fp32, contiguous
    dq_ptr,  # (B, H, Lq, D) out, contiguous; written when not DKDV
    dk_ptr,  # (B, H_kv, Lk, D) out, contiguous; written when DKDV
    dv_ptr,  # (B, H_kv, Lk, Dv) out, contiguous; written when DKDV
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    heads,
    kv_group,
    seqlen_q,
    seqlen_k,
    causal_shift,
    window_left,
    seqlen_bucket,
    qk_scale,
    scale,
    dropout_p,
    dropout_scale,
    seed,
    DKDV: tl.constexpr,
    IS_CAUSAL: tl.constexpr,
    CAUSAL_SHIFTED: tl.constexpr,  # else causal_shift is 0 (torch's top-left alignment), known when compiling
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """The backward in two launches. DKDV: one program per (key block, key/value head,
    batch) computes the block's dK and dV over every query head of its group. Else: one
    program per (query block, query head, batch) computes the block's dQ."""
    if not CAUSAL_SHIFTED:
        causal_shift = 0
    if DKDV:
        start_n = tl.program_id(0) * BLOCK_N
        kv_head = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        kv_heads = tl.num_programs(1)
        cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
        cols_ok = cols < seqlen_k
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        k = _load_tile(
            k_ptr + b * stride_kb + kv_head * stride_kh + cols[:, None] * stride_kn + offs_d[None, :] * stride_kd,
            cols_ok[:, None], offs_d[None, :] < HEAD_DIM, True, HEAD_DIM != BLOCK_D,
        )
        v = _load_tile(
            v_ptr + b * stride_vb + kv_head * stride_vh + cols[:, None] * stride_vn + offs_dv[None, :] * stride_vd,
            cols_ok[:, None], offs_dv[None, :] < HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV,
        )
        dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
        dv = tl.zeros([BLOCK_N, BLOCK_DV], tl.float32)
        key_bias_ptr += b * (seqlen_k + KEY_BIAS_PAD)

        # Causal: queries before start_n - causal_shift see none of these keys (their blocks
        # are skipped); from start_n + BLOCK_N - 1 - causal_shift on they see all of them (no
        # causal check). A window: queries from start_n + BLOCK_N - causal_shift + window_left
        # on see none of them (skipped too).
        if IS_CAUSAL and CAUSAL_SHIFTED:
            start = tl.maximum(start_n - causal_shift, 0) // BLOCK_M * BLOCK_M
            all_seen_from = tl.maximum(start_n + BLOCK_N - 1 - causal_shift, 0)
            checked_stop = tl.minimum(tl.cdiv(all_seen_from, BLOCK_M) * BLOCK_M, seqlen_q)
        elif IS_CAUSAL:
            start = start_n // BLOCK_M * BLOCK_M
            checked_stop = tl.minimum(tl.cdiv(start_n + BLOCK_N - 1, BLOCK_M) * BLOCK_M, seqlen_q)
        else:
            start = 0
            checked_stop = 0
        query_stop = seqlen_q
        if WINDOWED:
            query_stop = tl.minimum(seqlen_q, tl.maximum(start_n + BLOCK_N - causal_shift + window_left, 0))
            checked_stop = tl.minimum(checked_stop, query_stop)
        for group_index in range(kv_group):
            h = kv_head * kv_group + group_index
            q_head_ptr = q_ptr + b * stride_qb + h * stride_qh
            grad_out_head_ptr = grad_out_ptr + b * stride_gb + h * stride_gh
            row0 = (b * heads + h) * seqlen_q
            mask_head_ptr = mask_ptr + b * stride_mb + h * stride_mh
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, cols, q_head_ptr, stride_qm, stride_qd, grad_out_head_ptr, stride_gm, stride_gd,
                lse_ptr + row0, delta_ptr + row0, mask_head_ptr, stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k,
                causal_shift, window_left, qk_scale,
                seed, row0, dropout_p, dropout_scale, start, checked_stop,
                IS_CAUSAL, WINDOWED, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_M, BLOCK_D, BLOCK_DV,
                HEAD_DIM, HEAD_DIM_V,
            )
            dk, dv = _dkdv_blocks(
                dk, dv, k, v, cols, q_head_ptr, stride_qm, stride_qd, grad_out_head_ptr, stride_gm, stride_gd,
                lse_ptr + row0, delta_ptr + row0, mask_head_ptr, stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k,
                causal_shift, window_left, qk_scale,
                seed, row0, dropout_p, dropout_scale, tl.maximum(start, checked_stop), query_stop,
                False, WINDOWED, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_M, BLOCK_D, BLOCK_DV, HEAD_DIM,
                HEAD_DIM_V,
            )
        kv_row0 = (b * kv_heads + kv_head) * seqlen_k
        tl.store(
            dk_ptr + (kv_row0 + cols[:, None]) * HEAD_DIM + offs_d[None, :],
            (dk * scale).to(dk_ptr.dtype.element_ty),
            mask=cols_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        )
        tl.store(
            dv_ptr + (kv_row0 + cols[:, None]) * HEAD_DIM_V + offs_dv[None, :],
            dv.to(dv_ptr.dtype.element_ty),
            mask=cols_ok[:, None] & (offs_dv[None, :] < HEAD_DIM_V),
        )
    else:
        start_m = tl.program_id(0) * BLOCK_M
        h = tl.program_id(1).to(tl.int64)
        b = tl.program_id(2).to(tl.int64)
        rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
        rows_ok = rows < seqlen_q
        offs_d = tl.arange(0, BLOCK_D)
        offs_dv = tl.arange(0, BLOCK_DV)
        q = _load_tile(
            q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
            rows_ok[:, None], offs_d[None, :] < HEAD_DIM, True, HEAD_DIM != BLOCK_D,
        )
        grad_out = _load_tile(
            grad_out_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm + offs_dv[None, :] * stride_gd,
            rows_ok[:, None], offs_dv[None, :] < HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV,
        )
        row0 = (b * heads + h) * seqlen_q
        lse = tl.load(lse_ptr + row0 + rows, mask=rows_ok, other=float("inf"))
        delta = tl.load(delta_ptr + row0 + rows, mask=rows_ok, other=0.0)
        kv_head = h // kv_group
        k_ptr += b * stride_kb + kv_head * stride_kh
        v_ptr += b * stride_vb + kv_head * stride_vh
        mask_ptr += b * stride_mb + h * stride_mh
        key_bias_ptr += b * (seqlen_k + KEY_BIAS_PAD)
        start, unchecked_stop, checked_start, stop = _key_blocks(
            start_m, seqlen_k, causal_shift, window_left, IS_CAUSAL, CAUSAL_SHIFTED, WINDOWED, BLOCK_M, BLOCK_N
        )
        dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        dq = _dq_blocks(
            dq, q, grad_out, lse, delta, rows, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, mask_ptr,
            stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k, causal_shift, window_left, qk_scale, seed,
            row0 + rows, dropout_p, dropout_scale,
            start, unchecked_stop,
            False, WINDOWED, False, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV,
            HEAD_DIM, HEAD_DIM_V,
        )
        dq = _dq_blocks(
            dq, q, grad_out, lse, delta, rows, k_ptr, stride_kn, stride_kd, v_ptr, stride_vn, stride_vd, mask_ptr,
            stride_mm, stride_mn, key_bias_ptr, seqlen_q, seqlen_k, causal_shift, window_left, qk_scale, seed,
            row0 + rows, dropout_p, dropout_scale,
            checked_start, stop,
            IS_CAUSAL, WINDOWED, True, MASK_KIND, MASK_IS_BOOL, KEY_BIAS, HAS_DROPOUT, BLOCK_N, BLOCK_D, BLOCK_DV,
            HEAD_DIM, HEAD_DIM_V,
        )
        tl.store(
            dq_ptr + (row0 + rows[:, None]) * HEAD_DIM + offs_d[None, :],
            (dq * scale).to(dq_ptr.dtype.element_ty),
            mask=rows_ok[:, None] & (offs_d[None, :] < HEAD_DIM),
        )


# Key blocks per slot of a relative bias's partial sums: a tile spans BLOCK_M + BLOCK_N - 1
# diagonals, fewer than RELATIVE_SLOTS * BLOCK_N where BLOCK_M <= 2 BLOCK_N, so that the
# key blocks of one slot (every third) write disjoint columns.
RELATIVE_SLOTS = tl.constexpr(3)
# The partial sums' columns before diagonal 0 (the padding rows of the last query block).
RELATIVE_PAD = tl.constexpr(128)


@triton.jit
def _store_diagonal_sums(acc, partial_ptr, stride_pm, stride_ps, seqlen_q, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
    """Sums the tile of query block program_id(1) x key block program_id(0) along its
    diagonals into partial[query block, key block % RELATIVE_SLOTS, RELATIVE_PAD + t],
    t = j - i + Lq - 1. Row r of the tile holds diagonal c - r + BLOCK_M - 1 at column c:
    a gather skews the tile so that each column holds one diagonal, then a column sum."""
    tl.static_assert(BLOCK_M <= 2 * BLOCK_N, "a tile's diagonals must span fewer than RELATIVE_SLOTS key blocks")
    DIAGONALS: tl.constexpr = 2 * BLOCK_N if BLOCK_M <= BLOCK_N else 4 * BLOCK_N
    r = tl.arange(0, BLOCK_M)[:, None]
    d = tl.arange(0, DIAGONALS)[None, :]
    c = d - (BLOCK_M - 1) + r
    in_tile = (c >= 0) & (c < BLOCK_N)
    skewed = tl.gather(acc, tl.where(in_tile, c, 0), 1)
    sums = tl.sum(tl.where(in_tile, skewed, 0.0), 0)
    key_block = tl.program_id(0)
    t0 = key_block * BLOCK_N - tl.program_id(1) * BLOCK_M - (BLOCK_M - 1) + seqlen_q - 1  # diagonal of d = 0
    diagonals = tl.arange(0, DIAGONALS)
    ptrs = partial_ptr + tl.program_id(1).to(tl.int64) * stride_pm + (key_block % RELATIVE_SLOTS) * stride_ps
    tl.store(ptrs + RELATIVE_PAD + t0 + diagonals, sums, mask=diagonals < BLOCK_M + BLOCK_N - 1)


@autotune(BWD_CONFIGS, [*ATTENTION_KEY, "SUM_QUERIES", "SUM_KEYS", "RELATIVE"], _mask_bwd_resources,
          do_not_specialize=[*LENGTHS, "batch_loop", "head_loop", "mask_heads"])
def attention_bwd_mask_kernel(
    q_ptr,  # (B, H, Lq, D)
    k_ptr,  # (B, H_kv, Lk, D)
    v_ptr,  # (B, H_kv, Lk, Dv)
    mask_ptr,  # the additive mask broadcast to (B, H, Lq, Lk), as in attention_fwd_kernel
    key_bias_ptr,
    grad_out_ptr,  # (B, H, Lq, Dv)
    lse_ptr,  # (B, H, Lq) fp32, contiguous
    delta_ptr,  # (B, H, Lq) fp32, contiguous
    dmask_ptr,  # (B | 1, H | 1, Lq | 1, Lk | 1) out, the mask as the caller holds it, in its dtype
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_mb, stride_mh, stride_mm, stride_mn,
    stride_gb, stride_gh, stride_gm, stride_gd,
    stride_db, stride_dh, stride_dm, stride_dn,
    heads,
    kv_group,
    seqlen_q,
    seqlen_k,
    causal_shift,
    window_left,
    seqlen_bucket,
    mask_heads,  # H | 1: dmask's heads
    batch_loop,  # the batches a program gathers: B where dmask has one, else 1
    head_loop,  # the heads a program gathers: H where dmask has one, else 1
    qk_scale,
    dropout_p,
    dropout_scale,
    seed,
    IS_CAUSAL: tl.constexpr,
    CAUSAL_SHIFTED: tl.constexpr,
    WINDOWED: tl.constexpr,
    MASK_KIND: tl.constexpr,
    MASK_IS_BOOL: tl.constexpr,
    KEY_BIAS: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HEAD_DIM: tl.constexpr,
    HEAD_DIM_V: tl.constexpr,
    BLOCK_D: tl.constexpr,
    BLOCK_DV: tl.constexpr,
    SUM_QUERIES: tl.constexpr,  # dmask has one query: its programs sum over the query blocks
    SUM_KEYS: tl.constexpr,  # dmask has one key: its programs sum over the key blocks
    RELATIVE: tl.constexpr,  # dmask is a relative bias's partial diagonal sums (see _store_diagonal_sums)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """dmask = dS = P (dP - delta), summed where dmask has size 1. One program per
    (key block, query block, batch x head) of dmask (one block where it sums that
    dimension) adds the tile's dS over the batches, heads, query blocks and key blocks it
    gathers, in that fixed order, into one fp32 tile; rows or columns summed are reduced
    once, at the end."""
    if not CAUSAL_SHIFTED:
        causal_shift = 0
    # int64, and so the loops' batch and head indices, which multiply strides.
    mask_b = (tl.program_id(2) // mask_heads).to(tl.int64)
    mask_h = (tl.program_id(2) % mask_heads).to(tl.int64)
    if SUM_QUERIES:
        query_begin, query_end = 0, seqlen_q
    else:
        query_begin = tl.program_id(1) * BLOCK_M
        query_end = query_begin + BLOCK_M
    if SUM_KEYS:
        key_begin, key_end = 0, seqlen_k
    else:
        key_begin = tl.program_id(0) * BLOCK_N
        key_end = key_begin + BLOCK_N
    offs_d = tl.arange(0, BLOCK_D)
    offs_dv = tl.arange(0, BLOCK_DV)
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for b in range(mask_b, mask_b + batch_loop):
        for h in range(mask_h, mask_h + head_loop):
            kv_head = h // kv_group
            k_head_ptr = k_ptr + b * stride_kb + kv_head * stride_kh
            v_head_ptr = v_ptr + b * stride_vb + kv_head * stride_vh
            mask_head_ptr = mask_ptr + b * stride_mb + h * stride_mh
            key_bias_batch_ptr = key_bias_ptr + b * (seqlen_k + KEY_BIAS_PAD)
            row0 = (b * heads + h) * seqlen_q
            for start_m in range(query_begin, query_end, BLOCK_M):
                rows = start_m + tl.arange(0, BLOCK_M).to(tl.int64)
                rows_ok = rows < seqlen_q
                q = _load_tile(
                    q_ptr + b * stride_qb + h * stride_qh + rows[:, None] * stride_qm + offs_d[None, :] * stride_qd,
                    rows_ok[:, None], offs_d[None, :] < HEAD_DIM, True, HEAD_DIM != BLOCK_D,
                )
                grad_out = _load_tile(
                    grad_out_ptr + b * stride_gb + h * stride_gh + rows[:, None] * stride_gm
                    + offs_dv[None, :] * stride_gd,
                    rows_ok[:, None], offs_dv[None, :] < HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV,
                )
                lse = tl.load(lse_ptr + row0 + rows, mask=rows_ok, other=float("inf"))
                delta = tl.load(delta_ptr + row0 + rows, mask=rows_ok, other=0.0)
                # Only the key blocks some row of the block sees (causal, window).
                start, _unchecked_stop, _checked_start, stop = _key_blocks(
                    start_m, seqlen_k, causal_shift, window_left, IS_CAUSAL, CAUSAL_SHIFTED, WINDOWED, BLOCK_M,
                    BLOCK_N,
                )
                for start_n in range(tl.maximum(key_begin, start), tl.minimum(key_end, stop), BLOCK_N):
                    cols = start_n + tl.arange(0, BLOCK_N).to(tl.int64)
                    s, _ = _block_scores(
                        q, k_head_ptr, stride_kn, stride_kd, mask_head_ptr, stride_mm, stride_mn, key_bias_batch_ptr,
                        rows, cols, seqlen_q, seqlen_k, causal_shift, window_left, qk_scale, IS_CAUSAL, WINDOWED, True,
                        MASK_KIND, MASK_IS_BOOL, KEY_BIAS, BLOCK_D, HEAD_DIM,
                    )
                    v_t = _load_tile(  # (BLOCK_DV, BLOCK_N)
                        v_head_ptr + cols[None, :] * stride_vn + offs_dv[:, None] * stride_vd,
                        cols[None, :] < seqlen_k, offs_dv[:, None] < HEAD_DIM_V, True, HEAD_DIM_V != BLOCK_DV,
                    )
                    p = tl.exp2(s - lse[:, None] * LOG2E)
                    dp = tl.dot(grad_out, v_t, input_precision="ieee")
                    if HAS_DROPOUT:
                        dp = dp * _dropout_factor(
                            seed, row0 + rows[:, None], cols[None, :], seqlen_k, dropout_p, dropout_scale
                        )
                    acc += p * (dp - delta[:, None])
    rows = tl.program_id(1) * BLOCK_M + tl.arange(0, BLOCK_M).to(tl.int64)
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N).to(tl.int64)
    dmask_ptr += mask_b * stride_db + mask_h * stride_dh
    if RELATIVE:
        _store_diagonal_sums(acc, dmask_ptr, stride_dm, stride_dn, seqlen_q, BLOCK_M, BLOCK_N)
    elif SUM_QUERIES and SUM_KEYS:
        tl.store(dmask_ptr, tl.sum(tl.sum(acc, 1), 0).to(dmask_ptr.dtype.element_ty))
    elif SUM_QUERIES:
        tl.store(dmask_ptr + cols * stride_dn, tl.sum(acc, 0).to(dmask_ptr.dtype.element_ty), mask=cols < seqlen_k)
    elif SUM_KEYS:
        tl.store(dmask_ptr + rows * stride_dm, tl.sum(acc, 1).to(dmask_ptr.dtype.element_ty), mask=rows < seqlen_q)
    else:
        tl.store(
            dmask_ptr + rows[:, None] * stride_dm + cols[None, :] * stride_dn,
            acc.to(dmask_ptr.dtype.element_ty),
            mask=(rows[:, None] < seqlen_q) & (cols[None, :] < seqlen_k),
        )


def _block_dim(head_dim):
    """The power of two (at least 16, the smallest tl.dot size) that holds a head dim (up
    to TRITON_MAX_HEAD_DIM, which lmkern.scaled_dot_product_attention checks)."""
    return max(16, triton.next_power_of_2(head_dim))


def _mask_args(mask, like, seqlen_k, relative_bias=None):
    """((mask tensor, key bias tensor), the mask's 4 strides, MASK_KIND, whether the mask is
    boolean, KEY_BIAS) for a 4-D mask broadcast to (B, H, Lq, Lk) (like: q), a relative bias,
    both, or None. Beside a relative bias (the mask the kernels read), a mask that depends on
    the key only (T5's encoder padding) becomes the key bias, (B, Lk + KEY_BIAS_PAD) fp32,
    contiguous and additive; any other is materialised with the bias into one mask
    (B | 1, H | 1, Lq, Lk) (the bias's gradient is still summed along diagonals in-kernel)."""
    key_bias = like
    if relative_bias is not None and mask is not None:
        if depends_on_key_only(mask):
            keys = mask.expand(like.shape[0], -1, -1, seqlen_k)[:, 0, 0]
            shape = (like.shape[0], seqlen_k + KEY_BIAS_PAD.value)
            key_bias = torch.zeros(shape, dtype=torch.float32, device=like.device)
            if keys.is_floating_point():
                key_bias[:, :seqlen_k] = keys
            else:
                key_bias[:, :seqlen_k].masked_fill_(~keys, float("-inf"))
        else:
            bias = reference.relative_bias_mask(relative_bias, like.shape[2], seqlen_k)
            mask = bias.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else bias + mask
            relative_bias = None
    has_key_bias = key_bias is not like
    if relative_bias is not None:
        # Query i reads the slice starting at column Lq - 1 - i: from column Lq - 1, query stride -1.
        head_stride = 0 if relative_bias.shape[0] == 1 else relative_bias.stride(0)
        strides = (0, head_stride, -relative_bias.stride(1), relative_bias.stride(1))
        return (relative_bias[:, like.shape[2] - 1:], key_bias), strides, FULL_MASK.value, False, has_key_bias
    if mask is None:
        return (like, key_bias), (0, 0, 0, 0), NO_MASK.value, False, False
    mask = mask.expand(*like.shape[:3], seqlen_k)
    kind = KEY_MASK.value if mask.stride(2) == 0 or mask.shape[2] == 1 else FULL_MASK.value
    is_bool = mask.dtype == torch.bool
    return ((mask.view(torch.uint8) if is_bool else mask), key_bias), mask.stride(), kind, is_bool, False


def _common_args(q, k, v, mask, is_causal, causal_shift, dropout_p, window_left, relative_bias=None):
    """The launch arguments that the forward and both backward kernels share, after the pointers."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k, head_dim_v = k.shape[1], k.shape[2], v.shape[3]
    masks, mask_strides, mask_kind, mask_is_bool, key_bias = _mask_args(mask, q, seqlen_k, relative_bias)
    strides = (*q.stride(), *k.stride(), *v.stride(), *mask_strides)
    bucket = triton.next_power_of_2(max(seqlen_q, seqlen_k))
    windowed = window_left >= 0
    sizes = (heads, heads // kv_heads, seqlen_q, seqlen_k, causal_shift, window_left, bucket)
    constants = dict(
        IS_CAUSAL=is_causal,
        CAUSAL_SHIFTED=(is_causal or windowed) and causal_shift != 0,
        WINDOWED=windowed,
        MASK_KIND=mask_kind,
        MASK_IS_BOOL=mask_is_bool,
        KEY_BIAS=key_bias,
        HAS_DROPOUT=dropout_p > 0,
        HEAD_DIM=head_dim,
        HEAD_DIM_V=head_dim_v,
        BLOCK_D=_block_dim(head_dim),
        BLOCK_DV=_block_dim(head_dim_v),
    )
    return masks, strides, sizes, constants


def attention_fwd(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1, relative_bias=None):
    """Same contract as reference.attention_fwd."""
    batch, heads, seqlen_q, _ = q.shape
    out = torch.empty(batch, heads, seqlen_q, v.shape[3], dtype=q.dtype, device=q.device)
    lse = torch.empty(batch, heads, seqlen_q, dtype=torch.float32, device=q.device)
    if out.numel() == 0:
        return out, lse.fill_(float("inf"))
    masks, strides, sizes, constants = _common_args(
        q, k, v, mask, is_causal, causal_shift, dropout_p, window_left, relative_bias
    )
    grid = lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)  # noqa: E731
    attention_fwd_kernel[grid](
        q, k, v, *masks, out, lse, *strides, *out.stride(), *sizes,
        scale * LOG2E.value, dropout_p, dropout_scale(dropout_p), seed, **constants,
    )
    return out, lse


def attention_bwd(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None,
):
    """Same contract as reference.attention_bwd."""
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias)
    return _backward(grad_out, q, k, v, out, lse, mask, *args, False, False)[:3]


def attention_bwd_with_bias_grads(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias,
    mask_grad, relative_bias_grad,
):
    """Same contract as reference.attention_bwd_with_bias_grads: the additive mask's or the
    relative bias's gradient from attention_bwd_mask_kernel, after dQ, dK and dV."""
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias)
    return _backward(grad_out, q, k, v, out, lse, mask, *args, mask_grad, relative_bias_grad)


def _backward(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias,
    mask_grad, relative_bias_grad,
):
    """(dq, dk, dv, dmask, d relative_bias): dmask with mask_grad, shaped like the mask (B | 1,
    H | 1, Lq | 1, Lk | 1) and in its dtype, d relative_bias with relative_bias_grad, shaped
    like it and in its dtype (None otherwise)."""
    batch, heads, seqlen_q, head_dim = q.shape
    kv_heads, seqlen_k = k.shape[1], k.shape[2]
    grad_q = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    grad_k = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    grad_v = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    grad_mask = torch.empty(mask.shape, dtype=mask.dtype, device=mask.device) if mask_grad else None
    grad_bias = torch.zeros_like(relative_bias) if relative_bias_grad else None
    if seqlen_q == 0 or seqlen_k == 0 or head_dim == 0 or v.shape[3] == 0:
        return tuple(None if grad is None else grad.zero_() for grad in (grad_q, grad_k, grad_v, grad_mask, grad_bias))
    masks, strides, sizes, constants = _common_args(
        q, k, v, mask, is_causal, causal_shift, dropout_p, window_left, relative_bias
    )
    delta = torch.empty_like(lse)
    delta_rows = 64
    attention_bwd_delta_kernel[(triton.cdiv(seqlen_q, delta_rows), heads, batch)](
        out, grad_out, delta, *out.stride(), *grad_out.stride(), heads, seqlen_q,
        HEAD_DIM_V=constants["HEAD_DIM_V"], BLOCK_DV=constants["BLOCK_DV"], BLOCK_M=delta_rows,
    )
    args = (q, k, v, *masks, grad_out, lse, delta, grad_q, grad_k, grad_v)
    dropout = (dropout_p, dropout_scale(dropout_p), seed)
    strides = (*strides, *grad_out.stride())
    attention_bwd_kernel[lambda meta: (triton.cdiv(seqlen_k, meta["BLOCK_N"]), kv_heads, batch)](
        *args, *strides, *sizes, scale * LOG2E.value, scale, *dropout, DKDV=True, **constants
    )
    attention_bwd_kernel[lambda meta: (triton.cdiv(seqlen_q, meta["BLOCK_M"]), heads, batch)](
        *args, *strides, *sizes, scale * LOG2E.value, scale, *dropout, DKDV=False, **constants
    )
    launch = (q, k, v, *masks, grad_out, lse, delta)
    if mask_grad:
        # One program per tile of the mask, gathering the batches and heads it broadcasts over.
        mask_batch, mask_heads, mask_queries, mask_keys = mask.shape
        loops = (mask_heads, batch if mask_batch == 1 else 1, heads if mask_heads == 1 else 1)
        grid = _mask_grad_grid(mask_batch * mask_heads, seqlen_q, seqlen_k, mask_queries == 1, mask_keys == 1)
        attention_bwd_mask_kernel[grid](
            *launch, grad_mask, *strides, *grad_mask.stride(), *sizes, *loops, scale * LOG2E.value, *dropout,
            SUM_QUERIES=mask_queries == 1, SUM_KEYS=mask_keys == 1, RELATIVE=False, **constants,
        )
    if relative_bias_grad:
        # One program per tile of a (1, H | 1, Lq, Lk) mask; its diagonal sums land in
        # partial (H | 1, query blocks, RELATIVE_SLOTS, columns) by distance, then one sum.
        bias_heads, distances = relative_bias.shape
        query_blocks = triton.cdiv(seqlen_q, min(config.kwargs["BLOCK_M"] for config in BWD_CONFIGS))
        columns = RELATIVE_PAD.value + distances + max(config.kwargs["BLOCK_N"] for config in BWD_CONFIGS)
        shape = (bias_heads, query_blocks, RELATIVE_SLOTS.value, columns)
        partial = torch.zeros(shape, dtype=torch.float32, device=q.device)
        loops = (bias_heads, batch, heads if bias_heads == 1 else 1)
        attention_bwd_mask_kernel[_mask_grad_grid(bias_heads, seqlen_q, seqlen_k, False, False)](
            *launch, partial, *strides, 0, *partial.stride()[:3], *sizes, *loops, scale * LOG2E.value, *dropout,
            SUM_QUERIES=False, SUM_KEYS=False, RELATIVE=True, **constants,
        )
        grad_bias = partial.sum((1, 2))[:, RELATIVE_PAD.value:][:, :distances].to(relative_bias.dtype)
    return grad_q, grad_k, grad_v, grad_mask, grad_bias


def _mask_grad_grid(tiles, seqlen_q, seqlen_k, sum_queries, sum_keys):
    """attention_bwd_mask_kernel's grid: (key blocks, query blocks, tiles), one block where it sums."""

    def grid(meta):
        key_blocks = 1 if sum_keys else triton.cdiv(seqlen_k, meta["BLOCK_N"])
        query_blocks = 1 if sum_queries else triton.cdiv(seqlen_q, meta["BLOCK_M"])
        return key_blocks, query_blocks, tiles

    return grid
