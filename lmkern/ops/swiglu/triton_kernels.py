"""The gated feed-forward's first half and the backward of its epilogue, in Triton.

Forward, one program per (BLOCK_M, BLOCK_N) tile of gate = x @ w_gate.T and up =
x @ w_up.T together: each K step loads one x block and a block of each weight into two
fp32 accumulators, and the epilogue computes in registers
    h = act(gate) * up        act: SiLU, exact GELU or tanh GELU (linear_gelu's kernels)
storing gate and up into the (2, M, N) buffer only when they are kept for backward. Tiles
visited in groups of GROUP_M rows of tiles (linear_gelu's grouped_tile) for L2 reuse;
fp32 inputs multiply in IEEE fp32 (no TF32).

Backward of the epilogue, one program per (BLOCK_M, BLOCK_N) tile, in place over d(h):
    d(gate) = d(h) up act'(gate),  d(up) = d(h) act(gate),  h = act(gate) up (for d(w_down))
"""

import torch
import triton
import triton.language as tl

from lmkern.ops.linear_gelu.triton_kernels import activation_and_grad, grouped_tile, matmul_configs
from lmkern.ops.triton_tuning import autotune
from lmkern.triton_support import interpreting


def gated_configs():
    """linear_gelu's matmul candidates, its two-warp 32 x 64 tile given four warps and a K
    step of 64: with two accumulators the two-warp tile spills on sm_90, and in half
    precision the four-warp one is picked before the 32 x 32 tile, which spills on sm_80
    (triton-check)."""
    return [
        triton.Config({**config.kwargs, "BLOCK_K": 64}, num_stages=4, num_warps=4) if config.num_warps == 2 else config
        for config in matmul_configs()
    ]


def gated_resources(config, args, target):
    """Shared memory: `stages` buffers of an x block and two weight blocks. Registers: two
    fp32 accumulators and as much again for the epilogue's temporaries; a K step of the
    three blocks where they are register operands (fp32's exact FMA dots; mma.sync
    without wgmma)."""
    size = args["x_ptr"].element_size()
    m, n, k = (config.kwargs[name] for name in ("BLOCK_M", "BLOCK_N", "BLOCK_K"))
    registers = 4 * m * n
    if size == 4:  # FMA dots: each thread's rows and columns of a K step, in three layouts
        registers += 3 * (m + 2 * n) * k
    elif not target.wgmma:
        registers += (m + 2 * n) * k * size / 4
    return size * config.num_stages * k * (m + 2 * n), registers / (32 * config.num_warps)


# Tuned per power-of-two bucket of M (tokens), which is only a bound: varying batch
# sizes neither re-tune nor recompile at every call.
@autotune(gated_configs(), ["m_bucket", "N", "K", "ACTIVATION", "KEEP_PRE"], gated_resources, ["M", "m_bucket"])
def gated_fwd_kernel(
    x_ptr,  # (M, K), any strides
    stride_xm,
    stride_xk,
    w_gate_ptr,  # (N, K), any strides
    stride_gn,
    stride_gk,
    w_up_ptr,  # (N, K), any strides
    stride_un,
    stride_uk,
    h_ptr,  # (M, N) contiguous, out: act(gate) * up
    gate_up_ptr,  # (2, M, N) contiguous, out: gate and up, written if KEEP_PRE
    M,
    N,
    K,
    m_bucket,  # autotuning key only
    ACTIVATION: tl.constexpr,  # "silu", "gelu" or "gelu_tanh"
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
    gate_ptrs = w_gate_ptr + offs_k[:, None] * stride_gk + cols[None, :] * stride_gn
    up_ptrs = w_up_ptr + offs_k[:, None] * stride_uk + cols[None, :] * stride_un
    gate = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    up = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k in range(0, tl.cdiv(K, BLOCK_K)):
        k_left = K - k * BLOCK_K
        a = tl.load(x_ptrs, mask=offs_k[None, :] < k_left, other=0.0)
        b_gate = tl.load(gate_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        b_up = tl.load(up_ptrs, mask=offs_k[:, None] < k_left, other=0.0)
        if IEEE_FP32:
            gate = tl.dot(a, b_gate, gate, input_precision="ieee")
            up = tl.dot(a, b_up, up, input_precision="ieee")
        else:
            gate = tl.dot(a, b_gate, gate)
            up = tl.dot(a, b_up, up)
        x_ptrs += BLOCK_K * stride_xk
        gate_ptrs += BLOCK_K * stride_gk
        up_ptrs += BLOCK_K * stride_uk

    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    index = offs_m.to(tl.int64)[:, None] * N + offs_n[None, :]
    if KEEP_PRE:
        tl.store(gate_up_ptr + index, gate, mask=mask)  # [0]
        tl.store(gate_up_ptr + (offs_m.to(tl.int64) + M)[:, None] * N + offs_n[None, :], up, mask=mask)  # [1]
    act, _ = activation_and_grad(gate, ACTIVATION)
    tl.store(h_ptr + index, act * up, mask=mask)


@triton.jit(do_not_specialize=["M"])
def gated_bwd_kernel(
    grad_gate_ptr,  # (M, N), rows stride_dgm apart, last dim contiguous: d(h) in, d(gate) out
    stride_dgm,
    grad_up_ptr,  # (M, N), rows stride_dum apart, last dim contiguous, out: d(up)
    stride_dum,
    gate_ptr,  # (M, N), rows stride_gm apart, last dim contiguous
    stride_gm,
    up_ptr,  # (M, N), rows stride_um apart, last dim contiguous
    stride_um,
    h_ptr,  # (M, N) contiguous out: act(gate) * up, written if WANT_H
    M,
    N,
    ACTIVATION: tl.constexpr,
    WANT_H: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    offs_m = (tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)).to(tl.int64)
    offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (offs_m[:, None] < M) & (offs_n[None, :] < N)
    grad_gate_ptrs = grad_gate_ptr + offs_m[:, None] * stride_dgm + offs_n[None, :]
    grad = tl.load(grad_gate_ptrs, mask=mask, other=0.0).to(tl.float32)
    gate = tl.load(gate_ptr + offs_m[:, None] * stride_gm + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs_m[:, None] * stride_um + offs_n[None, :], mask=mask, other=0.0).to(tl.float32)
    act, slope = activation_and_grad(gate, ACTIVATION)
    # Each program reads its tile before it writes it: d(gate) may go over d(h).
    tl.store(grad_gate_ptrs, grad * up * slope, mask=mask)
    tl.store(grad_up_ptr + offs_m[:, None] * stride_dum + offs_n[None, :], grad * act, mask=mask)
    if WANT_H:
        tl.store(h_ptr + offs_m[:, None] * N + offs_n[None, :], act * up, mask=mask)


def swiglu_fwd(x, w_gate, w_up, activation, keep_preactivation):
    """Same contract as reference.swiglu_fwd."""
    (M, K), N = x.shape, w_gate.shape[0]
    h = torch.empty((M, N), dtype=x.dtype, device=x.device)
    gate_up = torch.empty((2, M, N), dtype=x.dtype, device=x.device) if keep_preactivation else None
    if h.numel() == 0:
        return h, gate_up

    def grid(meta):
        return (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]),)

    gated_fwd_kernel[grid](
        x,
        x.stride(0),
        x.stride(1),
        w_gate,
        w_gate.stride(0),
        w_gate.stride(1),
        w_up,
        w_up.stride(0),
        w_up.stride(1),
        h,
        gate_up,
        M,
        N,
        K,
        triton.next_power_of_2(M),
        ACTIVATION=activation,
        KEEP_PRE=keep_preactivation,
        IEEE_FP32=x.dtype == torch.float32,
    )
    return h, gate_up


def swiglu_bwd(grad_gate, grad_up, gate, up, activation, want_activation):
    """Same contract as reference.swiglu_bwd."""
    M, N = gate.shape
    h = torch.empty((M, N), dtype=gate.dtype, device=gate.device) if want_activation else None
    if gate.numel() == 0:
        return h
    # 16 elements of each of the five tiles a thread holds (the three read, the two
    # written) and the activation's temporaries: no spills (triton-check).
    block_m, block_n, warps = (16, 32, 4) if interpreting() else (32, 128, 8)
    gated_bwd_kernel[(triton.cdiv(M, block_m), triton.cdiv(N, block_n))](
        grad_gate,
        grad_gate.stride(0),
        grad_up,
        grad_up.stride(0),
        gate,
        gate.stride(0),
        up,
        up.stride(0),
        h,
        M,
        N,
        ACTIVATION=activation,
        WANT_H=want_activation,
        BLOCK_M=block_m,
        BLOCK_N=block_n,
        num_warps=warps,
    )
    return h
