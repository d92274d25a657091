"""LayerNorm (with optional residual add and dropout) in Triton.

Forward, one program per row held in registers (rows up to 64 KiB):
    s = residual + dropout(x);  mean = sum(s) / D;  var = sum((s - mean)^2) / D
    out = (s - mean) rstd w + b,  rstd = 1 / sqrt(var + eps)
The two passes over the row (mean, then the centred variance) run on registers, so the
variance has no cancellation. With a residual or dropout, s is stored in the input's
dtype and the rounded s is what gets normalised, so that backward sees the same rows.

Backward, for xhat = (s - mean) rstd and g = dy w:
    ds = rstd (g - mean(g) - xhat mean(g xhat)) [+ the gradient that reached s directly]
    dx = dropout(ds) with the forward's mask (drawn again from the seed)
    dw = sum over rows of dy xhat,  db = sum over rows of dy
Rows up to MAX_FUSED_WIDTH elements: a fixed number G of programs each take rows pid,
pid + G, ... held in registers, and add up dy xhat and dy over their rows in fp32
registers, written as one row of partial sums per program. Wider rows would need more
registers than a thread has (the two sums alone are 2 D fp32 per program: at D = 32768
the whole register file of an SM), so there one program per row computes ds chunk by chunk
(a first pass for the two row sums, a second that reads the chunks again, from cache, for
ds), and a second kernel, tiled over columns, adds dy xhat and dy over G groups of rows:
two more reads of s and dy, and no spills. Either way the weight and bias gradients are
the sums of the G rows of partial sums, in a fixed order: deterministic, without atomics.

RMSNorm (lmkern.rms_norm, add_rms_norm) runs the same kernels with RMS set: mean = 0 and no
bias, so forward skips the first sum (rstd = 1 / sqrt(sum(s^2) / D + eps)), stores no mean,
and backward drops the mean(g) term.
"""

import torch
import triton
import triton.language as tl

from lmkern.triton_support import interpreting
from lmkern.ops.layer_norm.backends import MAX_GPU_ROW_BYTES
from lmkern.ops.triton_dropout import dropout, dropout_args


@triton.jit
def layer_norm_fwd_kernel(
    x_ptr,  # (N, D), rows x_row_stride apart, last dim contiguous
    x_row_stride,
    residual_ptr,  # (N, D), rows residual_row_stride apart; read if HAS_RESIDUAL
    residual_row_stride,
    weight_ptr,  # (D,) fp32, read if HAS_WEIGHT
    bias_ptr,  # (D,) fp32, read if HAS_BIAS
    out_ptr,  # (N, D) contiguous, out
    summed_ptr,  # (N, D) contiguous, out: s, written if KEEP_SUM
    mean_ptr,  # (N,) fp32 out, unless RMS
    rstd_ptr,  # (N,) fp32 out
    width,  # D
    eps,
    dropout_p,
    dropout_scale,  # 1 / (1 - dropout_p)
    seed,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    KEEP_SUM: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    RMS: tl.constexpr,  # RMSNorm: not centred (masked-off columns of s are 0 already)
    BLOCK_D: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < width
    s = tl.load(x_ptr + row * x_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if HAS_DROPOUT:
        s = dropout(s, seed, row * width + cols, dropout_p, dropout_scale)
    if HAS_RESIDUAL:
        s += tl.load(residual_ptr + row * residual_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    if KEEP_SUM:
        rounded = s.to(summed_ptr.dtype.element_ty)
        tl.store(summed_ptr + row * width + cols, rounded, mask=mask)
        s = rounded.to(tl.float32)
    if RMS:
        centered = s
    else:
        mean = tl.sum(s, axis=0) / width
        centered = tl.where(mask, s - mean, 0.0)
        tl.store(mean_ptr + row, mean)
    var = tl.sum(centered * centered, axis=0) / width
    # Correctly rounded: one rstd scales the whole row.
    rstd = tl.div_rn(1.0, tl.sqrt_rn(var + eps))
    tl.store(rstd_ptr + row, rstd)
    out = centered * rstd
    if HAS_WEIGHT:
        out *= tl.load(weight_ptr + cols, mask=mask, other=0.0)
    if HAS_BIAS:
        out += tl.load(bias_ptr + cols, mask=mask, other=0.0)
    tl.store(out_ptr + row * width + cols, out, mask=mask)


@triton.jit
def _row_terms(summed_ptr, grad_out_ptr, weight_ptr, mean, rstd, cols, mask, HAS_WEIGHT: tl.constexpr):
    """(xhat, dy, g = dy w) in fp32 at columns `cols` of one row; 0 where masked off. The
    weight is read again for every row (from cache) rather than held in registers."""
    s = tl.load(summed_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    dy = tl.load(grad_out_ptr + cols, mask=mask, other=0.0).to(tl.float32)
    g = dy
    if HAS_WEIGHT:
        g = dy * tl.load(weight_ptr + cols, mask=mask, other=0.0)
    return tl.where(mask, (s - mean) * rstd, 0.0), dy, g


@triton.jit
def _row_mean(mean_ptr, row, RMS: tl.constexpr):
    """The mean saved by forward for `row`: 0 for RMSNorm, which saves none. (One return:
    the compiler refuses a return inside an if.)"""
    mean = 0.0
    if not RMS:
        mean = tl.load(mean_ptr + row)
    return mean


@triton.jit
def _store_row_grads(
    ds,  # d(s) of columns `cols` of row `row`, without the direct gradient of s
    grad_sum_ptr,
    grad_sum_row_stride,
    grad_summed_ptr,
    grad_x_ptr,
    row,
    width,
    cols,
    mask,
    dropout_p,
    dropout_scale,
    seed,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
):
    """Stores ds (plus the gradient that reached s directly) and dx = dropout(ds)."""
    if HAS_GRAD_SUM:
        ds += tl.load(grad_sum_ptr + row * grad_sum_row_stride + cols, mask=mask, other=0.0).to(tl.float32)
    tl.store(grad_summed_ptr + row * width + cols, ds, mask=mask)
    if HAS_DROPOUT:
        grad_x = dropout(ds, seed, row * width + cols, dropout_p, dropout_scale)
        tl.store(grad_x_ptr + row * width + cols, grad_x, mask=mask)


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_bwd_kernel(
    grad_out_ptr,  # (N, D), rows grad_out_row_stride apart, last dim contiguous
    grad_out_row_stride,
    grad_sum_ptr,  # (N, D), rows grad_sum_row_stride apart; read if HAS_GRAD_SUM
    grad_sum_row_stride,
    summed_ptr,  # (N, D) s, rows summed_row_stride apart
    summed_row_stride,
    weight_ptr,  # (D,) fp32, read if HAS_WEIGHT
    mean_ptr,  # (N,) fp32, read unless RMS
    rstd_ptr,  # (N,) fp32
    grad_summed_ptr,  # (N, D) contiguous out: ds
    grad_x_ptr,  # (N, D) contiguous out: dropout(ds), written if HAS_DROPOUT
    partial_ptr,  # (G, 2, D) fp32 out: per program, sum of dy xhat (if HAS_WEIGHT) and of dy
    n_rows,
    width,
    dropout_p,
    dropout_scale,
    seed,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    """Rows of up to MAX_FUSED_WIDTH, each held in registers: ds, dx and the partial sums."""
    program = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)
    mask = cols < width
    sum_dy_xhat = tl.zeros([BLOCK_D], tl.float32)
    sum_dy = tl.zeros([BLOCK_D], tl.float32)
    # An int64 start makes the row index int64, so row offsets do not overflow.
    for row in range(program.to(tl.int64), n_rows, tl.num_programs(0)):
        rstd = tl.load(rstd_ptr + row)
        xhat, dy, g = _row_terms(
            summed_ptr + row * summed_row_stride, grad_out_ptr + row * grad_out_row_stride, weight_ptr,
            _row_mean(mean_ptr, row, RMS), rstd, cols, mask, HAS_WEIGHT,
        )
        centered_g = g if RMS else g - tl.sum(g, axis=0) / width
        ds = (centered_g - xhat * (tl.sum(g * xhat, axis=0) / width)) * rstd
        _store_row_grads(
            ds, grad_sum_ptr, grad_sum_row_stride, grad_summed_ptr, grad_x_ptr, row, width, cols, mask,
            dropout_p, dropout_scale, seed, HAS_GRAD_SUM, HAS_DROPOUT,
        )
        sum_dy_xhat += dy * xhat
        sum_dy += dy
    partial_ptr += program.to(tl.int64) * 2 * width
    if HAS_WEIGHT:
        tl.store(partial_ptr + cols, sum_dy_xhat, mask=mask)
    tl.store(partial_ptr + width + cols, sum_dy, mask=mask)


@triton.jit
def layer_norm_bwd_wide_kernel(
    grad_out_ptr,  # as in layer_norm_bwd_kernel
    grad_out_row_stride,
    grad_sum_ptr,
    grad_sum_row_stride,
    summed_ptr,
    summed_row_stride,
    weight_ptr,
    mean_ptr,
    rstd_ptr,
    grad_summed_ptr,
    grad_x_ptr,
    width,
    dropout_p,
    dropout_scale,
    seed,
    HAS_GRAD_SUM: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    HAS_WEIGHT: tl.constexpr,
    RMS: tl.constexpr,
    BLOCK_D: tl.constexpr,  # the chunk
):
    """Rows wider than MAX_FUSED_WIDTH, one program per row, BLOCK_D columns at a time:
    ds and dx (the weight and bias gradients are layer_norm_weight_grad_kernel's)."""
    row = tl.program_id(0).to(tl.int64)
    summed_ptr += row * summed_row_stride
    grad_out_ptr += row * grad_out_row_stride
    mean = _row_mean(mean_ptr, row, RMS)
    rstd = tl.load(rstd_ptr + row)
    chunk = tl.arange(0, BLOCK_D)
    sum_g = tl.zeros([BLOCK_D], tl.float32)
    sum_g_xhat = tl.zeros([BLOCK_D], tl.float32)
    for start in range(0, width, BLOCK_D):
        cols = start + chunk
        mask = cols < width
        xhat, _, g = _row_terms(summed_ptr, grad_out_ptr, weight_ptr, mean, rstd, cols, mask, HAS_WEIGHT)
        sum_g += g
        sum_g_xhat += g * xhat
    mean_g = 0.0 if RMS else tl.sum(sum_g, axis=0) / width
    mean_g_xhat = tl.sum(sum_g_xhat, axis=0) / width
    for start in range(0, width, BLOCK_D):
        cols = start + chunk
        mask = cols < width
        xhat, _, g = _row_terms(summed_ptr, grad_out_ptr, weight_ptr, mean, rstd, cols, mask, HAS_WEIGHT)
        _store_row_grads(
            (g - mean_g - xhat * mean_g_xhat) * rstd, grad_sum_ptr, grad_sum_row_stride, grad_summed_ptr,
            grad_x_ptr, row, width, cols, mask, dropout_p, dropout_scale, seed, HAS_GRAD_SUM, HAS_DROPOUT,
        )


@triton.jit(do_not_specialize=["n_rows"])
def layer_norm_weight_grad_kernel(
    grad_out_ptr,  # (N, D), rows grad_out_row_stride apart, last dim contiguous
    grad_out_row_stride,
    summed_ptr,  # (N, D) s, rows summed_row_stride apart
    summed_row_stride,
    mean_ptr,  # (N,) fp32, read unless RMS
    rstd_ptr,  # (N,) fp32
    partial_ptr,  # (G, 2, D) fp32 out: per row group, sum of dy xhat and of dy
    n_rows,
    width,
    RMS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """Program (c, g): columns [c BLOCK_N, (c + 1) BLOCK_N) over the rows of group g (G
    groups of BLOCK_M rows, taken in turn), summed in a fixed order."""
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    cols_ok = cols < width
    group = tl.program_id(1).to(tl.int64)
    groups = tl.num_programs(1)
    sum_dy_xhat = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    sum_dy = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for start in range(group * BLOCK_M, n_rows, groups * BLOCK_M):
        rows = start + tl.arange(0, BLOCK_M)
        rows_ok = rows < n_rows
        ok = rows_ok[:, None] & cols_ok[None, :]
        s = tl.load(summed_ptr + rows[:, None] * summed_row_stride + cols[None, :], mask=ok, other=0.0)
        dy = tl.load(grad_out_ptr + rows[:, None] * grad_out_row_stride + cols[None, :], mask=ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=rows_ok, other=0.0)
        dy = dy.to(tl.float32)
        xhat = s.to(tl.float32)
        if not RMS:
            xhat -= tl.load(mean_ptr + rows, mask=rows_ok, other=0.0)[:, None]
        sum_dy_xhat += dy * (xhat * rstd[:, None])
        sum_dy += dy
    partial_ptr += group * 2 * width
    tl.store(partial_ptr + cols, tl.sum(sum_dy_xhat, axis=0), mask=cols_ok)
    tl.store(partial_ptr + width + cols, tl.sum(sum_dy, axis=0), mask=cols_ok)


def block_width(width, dtype):
    """The power-of-two block holding a row, refusing rows wider than MAX_GPU_ROW_BYTES."""
    if width * dtype.itemsize > MAX_GPU_ROW_BYTES:
        raise ValueError(
            f"the Triton LayerNorm holds rows of at most {MAX_GPU_ROW_BYTES} bytes, got {width} {dtype} elements"
        )
    return triton.next_power_of_2(width)


def num_warps_for(block, element_size):
    """256 elements a warp, from 1 to 16 warps; 32 for rows of 64 KiB (32,768 fp16/bf16 or
    16,384 fp32 elements), whose forward spills at 16 (the row in fp32 registers, with the
    weight and bias beside it)."""
    return 32 if block * element_size >= 65536 else min(max(block // 256, 1), 16)


def layer_norm_fwd(x, weight, bias, eps, residual=None, dropout_p=0.0, seed=0, keep_sum=False, rms=False):
    """Same contract as reference.layer_norm_fwd."""
    n_rows, width = x.shape
    block = block_width(width, x.dtype)
    out = torch.empty((n_rows, width), dtype=x.dtype, device=x.device)
    summed = torch.empty_like(out) if keep_sum else None
    rstd = torch.empty(n_rows, dtype=torch.float32, device=x.device)
    mean = None if rms else torch.empty_like(rstd)
    if n_rows == 0:
        return out, mean, rstd, summed
    layer_norm_fwd_kernel[(n_rows,)](
        x,
        x.stride(0),
        residual,
        0 if residual is None else residual.stride(0),
        weight,
        bias,
        out,
        summed,
        mean,
        rstd,
        width,
        eps,
        *dropout_args(dropout_p),
        seed,
        HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0,
        KEEP_SUM=keep_sum,
        HAS_WEIGHT=weight is not None,
        HAS_BIAS=bias is not None,
        RMS=rms,
        BLOCK_D=block,
        num_warps=num_warps_for(block, x.element_size()),
    )
    return out, mean, rstd, summed


def num_row_programs(n_rows, device):
    """G, the programs of the backward pass: a few per SM, each looping over its rows."""
    if interpreting() or device.type != "cuda":
        return max(1, min(n_rows, 8))
    return max(1, min(n_rows, 4 * torch.cuda.get_device_properties(device).multi_processor_count))


# Rows up to this many elements are held in registers by one program through backward,
# with the two column sums beside them; wider ones take the two-kernel path.
MAX_FUSED_WIDTH = 8192
# The wide path's chunk of a row, and the weight-gradient kernel's tile (rows x columns).
WIDE_CHUNK = 4096
WEIGHT_GRAD_TILE = (16, 256)


def layer_norm_bwd(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias, rms=False):
    """Same contract as reference.layer_norm_bwd."""
    n_rows, width = summed.shape
    block = block_width(width, summed.dtype)
    grad_summed = torch.empty((n_rows, width), dtype=summed.dtype, device=summed.device)
    grad_x = torch.empty_like(grad_summed) if dropout_p > 0 else grad_summed
    programs = num_row_programs(n_rows, summed.device)
    wide = block > MAX_FUSED_WIDTH
    if wide:
        # As many row groups as keep the column-tiled kernel at `programs` programs or more.
        block_m, block_n = WEIGHT_GRAD_TILE
        column_tiles = triton.cdiv(width, block_n)
        programs = max(1, min(triton.cdiv(n_rows, block_m), triton.cdiv(programs, column_tiles)))
    partial = torch.zeros((programs, 2, width), dtype=torch.float32, device=summed.device)
    if n_rows > 0:
        tensors = (grad_out, grad_out.stride(0), grad_sum, 0 if grad_sum is None else grad_sum.stride(0), summed,
                   summed.stride(0), weight, mean, rstd, grad_summed, grad_x)
        flags = dict(HAS_GRAD_SUM=grad_sum is not None, HAS_DROPOUT=dropout_p > 0, HAS_WEIGHT=weight is not None,
                     RMS=rms)
        # g = dy w is used rounded, not fused into g - mean(g): a constant row (xhat = 0,
        # e.g. of width 1) must get exactly 0.
        if wide:
            layer_norm_bwd_wide_kernel[(n_rows,)](
                *tensors, width, *dropout_args(dropout_p), seed, **flags,
                BLOCK_D=WIDE_CHUNK, num_warps=num_warps_for(WIDE_CHUNK, summed.element_size()), enable_fp_fusion=False,
            )
            layer_norm_weight_grad_kernel[(column_tiles, programs)](
                grad_out, grad_out.stride(0), summed, summed.stride(0), mean, rstd, partial, n_rows, width, RMS=rms,
                BLOCK_M=block_m, BLOCK_N=block_n, num_warps=4,
            )
        else:
            layer_norm_bwd_kernel[(programs,)](
                *tensors, partial, n_rows, width, *dropout_args(dropout_p), seed, **flags,
                BLOCK_D=block, num_warps=num_warps_for(block, summed.element_size()), enable_fp_fusion=False,
            )
    grad_weight = partial[:, 0].sum(dim=0) if weight is not None else None
    grad_bias = partial[:, 1].sum(dim=0) if has_bias else None
    return grad_x, grad_summed, grad_weight, grad_bias
