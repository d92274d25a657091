"""Rotary position embeddings of queries (B, H, L, D): lmkern's backends against torch eager
of Hugging Face's rotate_half code, torch.compile of it, and Liger-Kernel's rope.

Memory-bound, reported as effective bandwidth over the minimal bytes of each pass, with s
the element size: forward reads x and writes the output (2 B H L D s); backward reads the
output's gradient and writes x's (2 B H L D s); forward+backward 4 B H L D s. The cos and
sin rows (L x D / 2 each, shared by every head) are negligible. Liger's kernel rotates
queries and keys together: it gets x as queries and one head of keys (1/H more work).
"""

import torch

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "apply_rotary"
METRIC = "GB/s"


def cases(device, quick):
    if quick:
        return [dict(batch=1, heads=4, seqlen=64, head_dim=64)]
    if device == "cuda":  # Llama 2 7B's queries at 4K (batch 4) and 8K tokens
        return [dict(batch=4, heads=32, seqlen=4096, head_dim=128), dict(batch=1, heads=32, seqlen=8192, head_dim=128)]
    return [dict(batch=2, heads=16, seqlen=512, head_dim=64), dict(batch=1, heads=32, seqlen=1024, head_dim=128)]


def label(case):
    return f"{case['batch']}x{case['heads']}x{case['seqlen']}x{case['head_dim']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    """x (B, H, L, D) requiring grad; the (L, D / 2) caches lmkern reads; the (L, D) ones
    Hugging Face's code reads (cos and sin repeated over the two halves)."""
    shape = (case["batch"], case["heads"], case["seqlen"], case["head_dim"])
    x = torch.randn(shape, device=device, dtype=dtype, requires_grad=True)
    cos, sin = lmkern.rotary_cache(case["head_dim"], case["seqlen"], device=device, dtype=dtype)
    return x, cos, sin, torch.cat((cos, cos), dim=-1), torch.cat((sin, sin), dim=-1)


def work(case, dtype, pass_name):
    elements = case["batch"] * case["heads"] * case["seqlen"] * case["head_dim"] * dtype.itemsize
    return {"fwd": 2 * elements, "bwd": 2 * elements, "fwd+bwd": 4 * elements}[pass_name]


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def eager(x, cos, sin, cos_full, sin_full):
    """Hugging Face Llama's apply_rotary_pos_emb for one tensor."""
    return x * cos_full + rotate_half(x) * sin_full


def fused(x, cos, sin, cos_full, sin_full, backend):
    return lmkern.apply_rotary(x, cos, sin, backend=backend)


def _liger():
    from liger_kernel.transformers.rope import liger_rotary_pos_emb

    def run(x, cos, sin, cos_full, sin_full):
        q, _ = liger_rotary_pos_emb(x, x[:, :1].detach(), cos_full[None], sin_full[None])
        return q

    return run


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
        optional_provider("liger_kernel", device, _liger),
    ]
