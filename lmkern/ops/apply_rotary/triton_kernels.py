"""Rotary position embeddings in Triton.

One program per (sequence b, head h, block of BLOCK_L tokens): it loads the positions of
its tokens, the cos and sin rows at those positions (R / 2 each, converted to fp32), and
the R / 2 pairs of each token, and writes
    out_1 = x_1 cos - x_2 sin,  out_2 = x_2 cos + x_1 sin
(pairs (x_i, x_{i + R/2}) half-split, (x_{2i}, x_{2i+1}) interleaved), then copies the
D - R elements that pass through (unless writing in place). Backward is the same kernel
with -sin. A position outside [0, P) reads no cache row: its rotated part is NaN.

The helpers rotary_angles and rotate_pairs hold that math for every kernel that rotates;
rotate_loaded_rows rotates a tile another kernel has already loaded whole (the queries and
new keys of lmkern.attention_with_kv_cache's kernels).
"""

import torch
import triton
import triton.language as tl

from lmkern.ops.apply_rotary.backends import MAX_TRITON_HEAD_DIM


@triton.jit
def rotary_angles(cos_ptr, sin_ptr, positions, pairs, half, max_positions, mask):
    """cos(p theta_i) and sin(p theta_i) in fp32 for positions p and pair indices i that
    broadcast together (e.g. (M, 1) int64 and (1, N)), where mask; NaN where p lies outside
    [0, max_positions), whose cache row is never read. cos and sin: (P, R / 2) contiguous."""
    in_range = (positions >= 0) & (positions < max_positions)
    offsets = positions * half + pairs
    c = tl.load(cos_ptr + offsets, mask=mask & in_range, other=float("nan")).to(tl.float32)
    s = tl.load(sin_ptr + offsets, mask=mask & in_range, other=float("nan")).to(tl.float32)
    return c, s


@triton.jit
def rotate_pairs(x1, x2, c, s):
    """The pairs (x1, x2) turned by the angles of (c, s), in fp32."""
    return x1 * c - x2 * s, x2 * c + x1 * s


@triton.jit
def rotate_loaded_rows(
    x,  # (M, BLOCK_D) rows already loaded, columns 0 .. BLOCK_D - 1
    rows_ptr,  # (M,) pointers to the rows' first elements
    stride_d,
    positions,  # (M,) int64: each row's position
    row_mask,  # (M,) rows that exist
    cos_ptr,
    sin_ptr,
    half,  # R / 2
    max_positions,
    INTERLEAVED: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """x (fp32) with the first R columns of each row rotated at its position, the rest as
    loaded; rows outside row_mask as loaded. Each column reloads its pair's other element
    (a cached read), so that a kernel holding whole rows rotates them in place."""
    d = tl.arange(0, BLOCK_D)
    if INTERLEAVED:
        first = d % 2 == 0
        partner = tl.where(first, d + 1, d - 1)
        pair = d // 2
    else:
        first = d < half
        partner = tl.where(first, d + half, d - half)
        pair = tl.where(first, d, d - half)
    mask = row_mask[:, None] & (d < 2 * half)[None, :]
    other = tl.load(rows_ptr[:, None] + partner[None, :] * stride_d, mask=mask, other=0.0).to(tl.float32)
    c, s = rotary_angles(cos_ptr, sin_ptr, positions[:, None], pair[None, :], half, max_positions, mask)
    x = x.to(tl.float32)
    # rotate_pairs' two outputs in one tile (fewer live registers than both and a select):
    # a pair's first element gets x c - other s, its second x c + other s.
    return tl.where(mask, x * c + other * tl.where(first[None, :], -s, s), x)


@triton.jit
def apply_rotary_kernel(
    x_ptr,  # (B, H, L, D), strides x_stride_*
    x_stride_b,
    x_stride_h,
    x_stride_l,
    x_stride_d,
    out_ptr,  # (B, H, L, D), strides out_stride_* (x's own for in place)
    out_stride_b,
    out_stride_h,
    out_stride_l,
    out_stride_d,
    cos_ptr,  # (P, R / 2) contiguous
    sin_ptr,  # (P, R / 2) contiguous
    positions_ptr,  # (B, L) int64, strides positions_stride_*
    positions_stride_b,
    positions_stride_l,
    n_heads,  # H
    seqlen,  # L
    head_dim,  # D
    half,  # R / 2
    max_positions,  # P
    SIGN: tl.constexpr,  # +1.0 forward, -1.0 backward (the rotation by minus the angle)
    INTERLEAVED: tl.constexpr,
    COPY_REST: tl.constexpr,  # write the D - R elements that pass through
    BLOCK_L: tl.constexpr,
    BLOCK_HALF: tl.constexpr,  # >= R / 2
    BLOCK_REST: tl.constexpr,  # >= D - R (used if COPY_REST)
):
    batch_head = tl.program_id(1)
    b = (batch_head // n_heads).to(tl.int64)
    h = (batch_head % n_heads).to(tl.int64)
    tokens = tl.program_id(0) * BLOCK_L + tl.arange(0, BLOCK_L)
    token_mask = tokens < seqlen
    tokens64 = tokens.to(tl.int64)
    x_rows = x_ptr + b * x_stride_b + h * x_stride_h + tokens64[:, None] * x_stride_l  # (BLOCK_L, 1)
    out_rows = out_ptr + b * out_stride_b + h * out_stride_h + tokens64[:, None] * out_stride_l

    positions = tl.load(positions_ptr + b * positions_stride_b + tokens64 * positions_stride_l, mask=token_mask, other=0)
    pairs = tl.arange(0, BLOCK_HALF)
    pair_mask = token_mask[:, None] & (pairs[None, :] < half)
    c, s = rotary_angles(cos_ptr, sin_ptr, positions[:, None], pairs[None, :], half, max_positions, pair_mask)
    s = s * SIGN
    if INTERLEAVED:
        first = pairs[None, :] * 2
        second = first + 1
    else:
        first = pairs[None, :]
        second = first + half
    x1 = tl.load(x_rows + first * x_stride_d, mask=pair_mask, other=0.0).to(tl.float32)
    x2 = tl.load(x_rows + second * x_stride_d, mask=pair_mask, other=0.0).to(tl.float32)
    out1, out2 = rotate_pairs(x1, x2, c, s)
    tl.store(out_rows + first * out_stride_d, out1.to(out_ptr.dtype.element_ty), mask=pair_mask)
    tl.store(out_rows + second * out_stride_d, out2.to(out_ptr.dtype.element_ty), mask=pair_mask)
    if COPY_REST:
        rest = 2 * half + tl.arange(0, BLOCK_REST)[None, :]
        rest_mask = token_mask[:, None] & (rest < head_dim)
        values = tl.load(x_rows + rest * x_stride_d, mask=rest_mask, other=0.0)
        tl.store(out_rows + rest * out_stride_d, values, mask=rest_mask)


def _rotate(x, cos, sin, positions, interleaved, sign, out):
    batch, heads, seqlen, head_dim = x.shape
    half = cos.shape[1]
    rest = head_dim - 2 * half
    copy_rest = out is not x and rest > 0
    if head_dim > MAX_TRITON_HEAD_DIM:
        raise ValueError(f"apply_rotary's Triton kernel holds heads of up to {MAX_TRITON_HEAD_DIM} elements, got {head_dim}")
    block_half = triton.next_power_of_2(half)
    block_rest = triton.next_power_of_2(rest) if copy_rest else 1
    # About 2048 pairs (or elements passed through) per program: enough work per program,
    # few registers per thread.
    block_l = max(1, min(triton.next_power_of_2(seqlen), 2048 // max(block_half, block_rest)))
    grid = (triton.cdiv(seqlen, block_l), batch * heads)
    apply_rotary_kernel[grid](
        x, *x.stride(), out, *out.stride(), cos, sin, positions, *positions.stride(),
        heads, seqlen, head_dim, half, cos.shape[0],
        SIGN=sign, INTERLEAVED=interleaved, COPY_REST=copy_rest,
        BLOCK_L=block_l, BLOCK_HALF=block_half, BLOCK_REST=block_rest,
    )
    return out


def apply_rotary_fwd(x, cos, sin, positions, interleaved, inplace):
    """Same contract as reference.apply_rotary_fwd (cos and sin contiguous)."""
    out = x if inplace else torch.empty(x.shape, dtype=x.dtype, device=x.device)
    return _rotate(x, cos, sin, positions, interleaved, 1.0, out)


def apply_rotary_bwd(cos, sin, positions, interleaved, grad_out):
    """Same contract as reference.apply_rotary_bwd."""
    out = torch.empty(grad_out.shape, dtype=grad_out.dtype, device=grad_out.device)
    return _rotate(grad_out, cos, sin, positions, interleaved, -1.0, out)
