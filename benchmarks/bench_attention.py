"""Attention (B, H, L, D), causal and not: lmkern's backends against each SDPA backend of
torch (flash, memory-efficient, cuDNN, math; each absent with its reason where it cannot
run), torch.compile of the math, and flash-attn.

Compute-bound, in TFLOP/s over the two matmuls of forward: 4 B H L^2 D, halved when
causal; backward 2.5x forward (five matmuls, one of them recomputing the scores);
forward+backward 3.5x.
"""

import math
import warnings

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "attention"
METRIC = "TFLOP/s"
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


def cases(device, quick):
    if quick:
        return [dict(batch=2, heads=4, seqlen=128, head_dim=64, causal=causal) for causal in (False, True)]
    if device == "cuda":  # 16k tokens per batch and model width 2048, as flash-attention's benchmarks
        return [
            dict(batch=16384 // seqlen, heads=2048 // head_dim, seqlen=seqlen, head_dim=head_dim, causal=causal)
            for head_dim in (64, 128)
            for seqlen in (512, 1024, 2048, 4096, 8192, 16384)
            for causal in (False, True)
        ]
    sizes = [(512, 64), (1024, 64), (2048, 64), (1024, 128)]
    return [
        dict(batch=2, heads=8, seqlen=seqlen, head_dim=head_dim, causal=causal)
        for seqlen, head_dim in sizes
        for causal in (False, True)
    ]


def label(case):
    causal = " causal" if case["causal"] else ""
    return f"{case['batch']}x{case['heads']}x{case['seqlen']}x{case['head_dim']}{causal}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    shape = (case["batch"], case["heads"], case["seqlen"], case["head_dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, case["causal"]


def work(case, dtype, pass_name):
    forward = 4 * case["batch"] * case["heads"] * case["seqlen"] ** 2 * case["head_dim"]
    if case["causal"]:
        forward //= 2
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[pass_name]


def math_attention(q, k, v, causal):
    """softmax(q k^T / sqrt(D)) v written out in torch ops, as eager code would."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal:
        seqlen = q.shape[-2]
        visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=q.device).tril()
        scores = scores.masked_fill(~visible, float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def lmkern_attention(q, k, v, causal, backend):
    return lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, backend=backend)


def sdpa_provider(name, device, dtype):
    """torch's SDPA restricted to one of its backends, absent if it cannot run a small
    forward and backward here (the reason is torch's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def run(q, k, v, causal):
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, is_causal=causal)

    probe = torch.randn(1, 1, 64, 64, device=device, dtype=dtype, requires_grad=True)
    try:
        with warnings.catch_warnings():  # torch warns why each backend it skips cannot run
            warnings.simplefilter("ignore")
            run(probe, probe, probe, True).sum().backward()
    except RuntimeError as error:
        return Provider(f"sdpa {name.lower()}", absent=f"cannot run here: {str(error).splitlines()[0]}")
    return Provider(f"sdpa {name.lower()}", run)


def _flash_attn():
    from flash_attn import flash_attn_func

    def run(q, k, v, causal):  # flash-attn's layout is (B, L, H, D)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal)
        return out.transpose(1, 2)

    return run


def providers(device, dtype):
    return [
        *(sdpa_provider(name, device, dtype) for name in SDPA_BACKENDS),
        compiled_provider(math_attention),
        *lmkern_providers(OP, device, dtype, lmkern_attention),
        optional_provider("flash_attn", device, _flash_attn),
    ]
