"""A matmul with a fused epilogue, and the backward of that epilogue, in Triton.

Forward, one program per (BLOCK_M, BLOCK_N) tile of out = x @ w.T, tiles visited in
groups of GROUP_M rows of tiles so that neighbouring programs share the x and w blocks
they read from L2; the fp32 accumulator gets in registers
    pre = acc + bias   (stored if the pre-activation is kept for backward)
    out = residual + dropout(act(pre))
before one store. act is GELU, exact (x Phi(x), Phi(x) = (1 + erf(x / sqrt 2)) / 2) or
tanh-approximated (x (1 + tanh(u)) / 2, u = sqrt(2/pi) (x + 0.044715 x^3)), or none.
fp32 inputs multiply in IEEE fp32 (no TF32), so the result is as exact as torch's.

Backward of the epilogue, one program per (BLOCK_M, BLOCK_N) tile:
    d(pre) = act'(pre) dropout(d(out))
with act'(x) = Phi(x) + x phi(x) for exact GELU and (1 + t) / 2 + x (1 - t^2) u'(x) / 2
for tanh, t = tanh(u); optionally act(pre) too (a following matmul's input, recomputed
instead of saved). Each program writes its tile's column sums of d(pre); the bias
gradient is the sum of those rows in a second pass (deterministic, no atomics).
"""

import torch
import triton
import triton.language as tl

from lmkern.triton_support import interpreting
from lmkern.ops.triton_dropout import dropout, dropout_args
from lmkern.ops.triton_tuning import autotune

# tl.constexpr: compiled kernels may read no other global (the interpreter reads any).
SQRT_HALF = tl.constexpr(0.7071067811865476)
INV_SQRT_2PI = tl.constexpr(0.3989422804014327)
SQRT_2_OVER_PI = tl.constexpr(0.7978845608028654)
TANH_CUBIC = tl.constexpr(0.044715)


def matmul_configs():
    """Static autotuning candidates, best first (no device is queried): the Triton
    tutorial's for Ampere and Hopper fp16/bf16 matmuls, and 8-warp tiles whose accumulators
    leave room for a heavy epilogue (dropout); one small tile under the interpreter."""
    if interpreting():
        return [triton.Config({"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 32, "GROUP_M": 4}, num_warps=4)]
    tiles = [
        # BLOCK_M, BLOCK_N, BLOCK_K, stages, warps
        (128, 256, 64, 3, 8),
        (256, 128, 64, 3, 8),
        (128, 128, 64, 4, 8),
        (128, 64, 64, 4, 8),
        (64, 128, 64, 4, 8),
        (128, 128, 32, 4, 4),
        (64, 256, 32, 4, 4),
        (128, 64, 32, 4, 4),
        (64, 128, 32, 4, 4),
        (64, 64, 32, 5, 4),
        (32, 64, 32, 5, 2),
        (32, 32, 32, 4, 4),
    ]
    return [
        triton.Config({"BLOCK_M": m, "BLOCK_N": n, "BLOCK_K": k, "GROUP_M": 8}, num_stages=stages, num_warps=warps)
        for m, n, k, stages, warps in tiles
    ]


def matmul_resources(config, args, target):
    """Shared memory: `stages` buffers of an x and a w block. Registers: the fp32
    accumulator, once more for GELU's temporaries and twice more for dropout's random
    numbers; a K step of the x and w blocks where they are register operands (fp32's exact
    FMA dots; mma.sync without wgmma)."""
    size = args["x_ptr"].element_size()
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    epilogue = 1 + (args["ACTIVATION"] != "none") + 2 * bool(args["HAS_DROPOUT"])
    registers = m * n * epilogue
    if size == 4:  # FMA dots: each thread's rows and columns of a K step, in three layouts
        registers += 3 * (m + n) * k
    elif not target.wgmma:
        registers += (m + n) * k * size / 4
    return size * config.num_stages * k * (m + n), registers / (32 * config.num_warps)


@triton.jit
def tanh(u):
    # exp of a non-positive argument only, so it neither overflows nor loses the sign.
    e = tl.exp(-2.0 * tl.abs(u))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(u >= 0, t, -t)


@triton.jit
def activation_and_grad(x, ACTIVATION: tl.constexpr):
    """(act(x), act'(x)) in fp32 for ACTIVATION "gelu", "gelu_tanh" or "silu" (x sigmoid(x),
    with sigmoid from exp(-|x|), which neither overflows nor loses the tail)."""
    # Each constant multiplies a tensor from the right: the interpreter's tl.constexpr
    # times a tensor stays a constexpr.
    if ACTIVATION == "silu":
        e = tl.exp(-tl.abs(x))
        sigmoid = tl.where(x >= 0, 1.0, e) / (1.0 + e)
        value = x * sigmoid
        grad = sigmoid * (1.0 + x * (1.0 - sigmoid))
    elif ACTIVATION == "gelu_tanh":
        x_sq = x * x
        t = tanh((x + x_sq * x * TANH_CUBIC) * SQRT_2_OVER_PI)
        value = 0.5 * x * (1.0 + t)
        grad = 0.5 * (1.0 + t) + 0.5 * x * (1.0 - t * t) * SQRT_2_OVER_PI * (x_sq * TANH_CUBIC * 3.0 + 1.0)
    else:
        cdf = 0.5 * (1.0 + tl.erf(x * SQRT_HALF))
        value = x * cdf
        grad = cdf + x * tl.exp(-0.5 * x * x) * INV_SQRT_2PI
    return value, grad


@triton.jit
def grouped_tile(M, N, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, GROUP_M: tl.constexpr):
    """This program's (BLOCK_M, BLOCK_N) tile of an (M, N) matmul output, tiles visited
    GROUP_M rows of tiles at a time for L2 reuse: (offs_m, offs_n), its row and column
    numbers, and (rows, cols), the same as int64 with those past the edge replaced by 0,
    so that loads through them need no mask (those rows and columns are never stored)."""
    pid = tl.program_id(0)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    tiles_in_group = GROUP_M * tiles_n
    first_m = pid // tiles_in_group * GROUP_M
    group_m = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % tiles_in_group) % group_m
    pid_n = (pid % tiles_in_group) // group_m
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    rows = tl.where(offs_m < M, offs_m, 0).to(tl.int64)
    cols = tl.where(offs_n < N, offs_n, 0).to(tl.int64)
    return offs_m, offs_n, rows, cols


# Tuned per power-of-two bucket of M (tokens), which is only a bound: varying batch
# sizes neither re-tune nor recompile at every call.
@autotune(matmul_configs(), ["m_bucket", "N", "K", "ACTIVATION", "HAS_DROPOUT"], matmul_resources, ["M", "m_bucket"])
def linear_fwd_kernel(
    x_ptr,  # (M, K), any strides
    stride_xm,
    stride_xk,
    w_ptr,  # (N, K), any strides: out = x @ w.T
    stride_wn,
    stride_wk,
    bias_ptr,  # (N,) fp32, read if HAS_BIAS
    residual_ptr,  # (M, N), rows stride_rm apart, last dim contiguous; read if HAS_RESIDUAL
    stride_rm,
    out_ptr,  # (M, N) contiguous, out
    pre_ptr,  # (M, N) contiguous, out: acc + bias, written if KEEP_PRE
    M,
    N,
    K,
    m_bucket,  # autotuning key only
    dropout_p,
    dropout_scale,  # 1 / (1 - dropout_p)
    seed,
    ACTIVATION: tl.constexpr,  # "gelu", "gelu_tanh" or "none"
    HAS_BIAS: tl.constexpr,
    HAS_RESIDUAL: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    KEEP_PRE: tl.constexpr,
    IEEE_FP32: tl.constexpr,  # fp32 inputs: multiply in IEEE fp32, not TF32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    offs_m, offs_n, rows, cols = grouped_tile(M, N, BLOCK_M, BLOCK_N, GROUP_M)
    offs_k = tl.arange(0, BLOCK_K)
    x_ptrs = x_ptr + rows[:, None] * stride_xm + offs_k[None, :] * stride_xk
    w_ptrs = w_ptr + offs_k[:, None] * stride_wk + cols[None, :] * stride_wn
    acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b = tl.load(w_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE_FP32:
            acc = tl.dot(a, b, acc, input_precision="ieee")
        else:
            acc = tl.dot(a, b, acc)
        x_ptrs += BLOCK_K * stride_xk
        w_ptrs += BLOCK_K * stride_wk

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    index = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]  # element number, for dropout too
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=offs_n < N, other=0.0)[None, :]
    if KEEP_PRE:
        tl.store(pre_ptr + index, acc, mask=mask)
    if ACTIVATION != "none":
        acc, _ = activation_and_grad(acc, ACTIVATION)
    if HAS_DROPOUT:
        acc = dropout(acc, seed, index, dropout_p, dropout_scale)
    if HAS_RESIDUAL:
        residual_ptrs = residual_ptr + offs_m.to(tl.int64)[:, None] * stride_rm + offs_n[None, :]
        acc += tl.load(residual_ptrs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + index, acc, mask=mask)


@triton.jit(do_not_specialize=["M"])
def linear_gelu_bwd_kernel(
    grad_out_ptr,  # (M, N), rows stride_gm apart, last dim contiguous
    stride_gm,
    pre_ptr,  # (M, N), rows stride_pm apart; read unless ACTIVATION is "none"
    stride_pm,
    grad_pre_ptr,  # (M, N) contiguous out
    act_ptr,  # (M, N) contiguous out: act(pre), written if WANT_ACTIVATION
    partial_ptr,  # (cdiv(M, BLOCK_M), N) fp32 out: column sums of grad_pre per block of rows
    M,
    N,
    dropout_p,
    dropout_scale,
    seed,
    ACTIVATION: tl.constexpr,
    HAS_DROPOUT: tl.constexpr,
    WANT_ACTIVATION: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid_m = tl.program_id(0)
    offs_m = (pid_m * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    index = offs_m[:, None] * N + offs_n[None, :]
    grad = tl.load(grad_out_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=mask, other=0.0)
    grad = grad.to(tl.float32)
    if HAS_DROPOUT:
        grad = dropout(grad, seed, index, dropout_p, dropout_scale)
    if ACTIVATION != "none":
        pre = tl.load(pre_ptr + offs_m[:, None] * stride_pm + offs_n[None, :], mask=mask, other=0.0)
        value, slope = activation_and_grad(pre.to(tl.float32), ACTIVATION)
        grad *= slope
        if WANT_ACTIVATION:
            tl.store(act_ptr + index, value, mask=mask)
    tl.store(grad_pre_ptr + index, grad, mask=mask)
    tl.store(partial_ptr + pid_m.to(tl.int64) * N + offs_n, tl.sum(grad, axis=0), mask=offs_n < N)


def linear_gelu_fwd(x, weight, bias, activation, keep_preactivation, dropout_p=0.0, seed=0, residual=None):
    """Same contract as reference.linear_gelu_fwd."""
    (M, K), N = x.shape, weight.shape[0]
    keep_pre = keep_preactivation and activation != "none"
    out = torch.empty((M, N), dtype=x.dtype, device=x.device)
    pre = torch.empty_like(out) if keep_pre else None
    if out.numel() == 0:
        return out, pre

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    linear_fwd_kernel[grid](
        x,
        x.stride(0),
        x.stride(1),
        weight,
        weight.stride(0),
        weight.stride(1),
        bias,
        residual,
        0 if residual is None else residual.stride(0),
        out,
        pre,
        M,
        N,
        K,
        triton.next_power_of_2(M),
        *dropout_args(dropout_p),
        seed,
        ACTIVATION=activation,
        HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None,
        HAS_DROPOUT=dropout_p > 0,
        KEEP_PRE=keep_pre,
        IEEE_FP32=x.dtype == torch.float32,
    )
    return out, pre


def linear_gelu_bwd(grad_out, pre, activation, dropout_p, seed, want_activation, inplace=False):
    """Same contract as reference.linear_gelu_bwd."""
    M, N = grad_out.shape
    want_activation = want_activation and activation != "none"
    # Each program reads its tile before it writes it, so grad_pre may be grad_out.
    grad_pre = grad_out if inplace else torch.empty((M, N), dtype=grad_out.dtype, device=grad_out.device)
    act = torch.empty_like(grad_pre) if want_activation else None
    # fp32 tiles half as tall, so that GELU's temporaries fit in registers without spilling.
    block_m, block_n = (16, 32) if interpreting() else (64 if grad_out.element_size() < 4 else 32, 128)
    partial = torch.zeros((triton.cdiv(M, block_m), N), dtype=torch.float32, device=grad_out.device)
    if grad_pre.numel() > 0:
        linear_gelu_bwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
            grad_out,
            grad_out.stride(0),
            pre,
            0 if pre is None else pre.stride(0),
            grad_pre,
            act,
            partial,
            M,
            N,
            *dropout_args(dropout_p),
            seed,
            ACTIVATION=activation,
            HAS_DROPOUT=dropout_p > 0,
            WANT_ACTIVATION=want_activation,
            BLOCK_M=block_m,
            BLOCK_N=block_n,
            num_warps=4,
        )
    return grad_pre, partial.sum(dim=0), act
