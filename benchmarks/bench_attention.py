"""Attention (B, H, L, D), causal and not, and with a sliding window: lmkern's backends
against each SDPA backend of torch (flash, memory-efficient, cuDNN, math; each absent with
its reason where it cannot run), torch.compile of the math, and flash-attn.

Compute-bound, in TFLOP/s over the two matmuls of forward: 4 B H L^2 D, halved when
causal; backward 2.5x forward (five matmuls, one of them recomputing the scores);
forward+backward 3.5x. With a sliding window the work is 4 B H D times the (query, key)
pairs inside it; its cases keep the window fixed over several L, so that kernels which
skip the key blocks outside it show a time linear in L (a constant TFLOP/s), where torch's,
given the window as a dense mask, stay quadratic.
"""

import functools
import math
import warnings

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "attention"
METRIC = "TFLOP/s"
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


NO_WINDOW = (-1, -1)


def window_cases(heads, head_dim, seqlens, left):
    """Mistral-style sliding windows (causal, `left` keys before each query) of one fixed
    size at lengths `seqlens`, one sequence each: the time should grow linearly in L."""
    return [
        dict(batch=1, heads=heads, seqlen=seqlen, head_dim=head_dim, causal=True, window=(left, 0))
        for seqlen in seqlens
    ]


def cases(device, quick):
    if quick:
        return [dict(batch=2, heads=4, seqlen=128, head_dim=64, causal=causal) for causal in (False, True)] + (
            window_cases(4, 64, (128, 256), 31)
        )
    if device == "cuda":  # 16k tokens per batch and model width 2048, as flash-attention's benchmarks
        return [
            dict(batch=16384 // seqlen, heads=2048 // head_dim, seqlen=seqlen, head_dim=head_dim, causal=causal)
            for head_dim in (64, 128)
            for seqlen in (512, 1024, 2048, 4096, 8192, 16384)
            for causal in (False, True)
        ] + window_cases(16, 128, (4096, 8192, 16384, 32768), 1023)
    sizes = [(512, 64), (1024, 64), (2048, 64), (1024, 128)]
    return [
        dict(batch=2, heads=8, seqlen=seqlen, head_dim=head_dim, causal=causal)
        for seqlen, head_dim in sizes
        for causal in (False, True)
    ] + window_cases(8, 64, (1024, 2048, 4096), 127)


def label(case):
    causal = " causal" if case["causal"] else ""
    window = case.get("window", NO_WINDOW)
    windowed = f" window {window}" if window != NO_WINDOW else ""
    return f"{case['batch']}x{case['heads']}x{case['seqlen']}x{case['head_dim']}{causal}{windowed}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    shape = (case["batch"], case["heads"], case["seqlen"], case["head_dim"])
    q, k, v = (torch.randn(shape, device=device, dtype=dtype, requires_grad=True) for _ in range(3))
    return q, k, v, case["causal"], case.get("window", NO_WINDOW)


def window_pairs(seqlen, causal, window):
    """The (query, key) pairs that a sliding window (left, right) lets attend."""
    left, right = window
    right = 0 if causal else right
    return sum(
        min(seqlen - 1, i + right if right >= 0 else seqlen) - max(0, i - left if left >= 0 else 0) + 1
        for i in range(seqlen)
    )


def work(case, dtype, pass_name):
    window = case.get("window", NO_WINDOW)
    if window != NO_WINDOW:
        pairs = window_pairs(case["seqlen"], case["causal"], window)
        forward = 4 * case["batch"] * case["heads"] * pairs * case["head_dim"]
    else:
        forward = 4 * case["batch"] * case["heads"] * case["seqlen"] ** 2 * case["head_dim"]
        if case["causal"]:
            forward //= 2
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[pass_name]


@functools.lru_cache(maxsize=4)
def visible_mask(seqlen, causal, window, device):
    """(L, L) boolean: which keys each query sees, causal and within the window."""
    left, right = window
    offset = torch.arange(seqlen, device=device)[None, :] - torch.arange(seqlen, device=device)[:, None]  # j - i
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    if causal:
        visible &= offset <= 0
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    return visible


def math_attention(q, k, v, causal, window):
    """softmax(q k^T / sqrt(D)) v written out in torch ops, as eager code would."""
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal or window != NO_WINDOW:
        scores = scores.masked_fill(~visible_mask(q.shape[-2], causal, window, q.device), float("-inf"))
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def lmkern_attention(q, k, v, causal, window, backend):
    return lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, window_size=window, backend=backend)


def sdpa_provider(name, device, dtype):
    """torch's SDPA restricted to one of its backends, absent if it cannot run a small
    forward and backward here (the reason is torch's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def run(q, k, v, causal, window=NO_WINDOW):
        with sdpa_kernel(backend):  # a window as a dense mask: torch's SDPA has no window of its own
            if window != NO_WINDOW:
                return F.scaled_dot_product_attention(q, k, v, attn_mask=visible_mask(q.shape[-2], causal, window, q.device))
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

    def run(q, k, v, causal, window):  # flash-attn's layout is (B, L, H, D)
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, window_size=window)
        return out.transpose(1, 2)

    return run


def providers(device, dtype):
    return [
        *(sdpa_provider(name, device, dtype) for name in SDPA_BACKENDS),
        compiled_provider(math_attention),
        *lmkern_providers(OP, device, dtype, lmkern_attention),
        optional_provider("flash_attn", device, _flash_attn),
    ]
