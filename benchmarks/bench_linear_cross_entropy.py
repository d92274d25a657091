"""Linear + cross-entropy (the LM head and its loss, tokens x hidden -> vocab): lmkern's
chunked linear_cross_entropy against the unfused matmul + cross-entropy in torch eager
and torch.compile, and Liger-Kernel's fused linear cross-entropy.

Compute-bound, reported in TFLOP/s: forward 2 N H V, backward 4 N H V, forward+backward
6 N H V. lmkern and Liger compute the gradients during forward, so compare them on
forward+backward; their peak memory is the point (no N x V logits).
"""

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "linear_cross_entropy"
METRIC = "TFLOP/s"


def cases(device, quick):
    if quick:
        return [dict(tokens=256, hidden=64, vocab=1000), dict(tokens=256, hidden=128, vocab=8192)]
    if device == "cuda":  # GPT-2 small, Llama 3 8B, Gemma 3 (vocabulary 262,144)
        return [
            dict(tokens=8192, hidden=768, vocab=50257),
            dict(tokens=8192, hidden=4096, vocab=128256),
            dict(tokens=4096, hidden=2560, vocab=262144),
        ]
    return [dict(tokens=1024, hidden=256, vocab=32000), dict(tokens=1024, hidden=768, vocab=50257)]


def label(case):
    return f"{case['tokens']}x{case['hidden']}->{case['vocab']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    hidden = torch.randn(case["tokens"], case["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(case["vocab"], case["hidden"], device=device, dtype=dtype) / case["hidden"] ** 0.5
    target = torch.randint(0, case["vocab"], (case["tokens"],), device=device)
    target[::10] = -100
    return hidden, weight.requires_grad_(), target


def work(case, dtype, pass_name):
    matmul = 2 * case["tokens"] * case["hidden"] * case["vocab"]
    return {"fwd": matmul, "bwd": 2 * matmul, "fwd+bwd": 3 * matmul}[pass_name]


def unfused(hidden, weight, target):
    return F.cross_entropy(hidden @ weight.T, target)


def _liger():
    from liger_kernel.transformers.functional import liger_fused_linear_cross_entropy

    return lambda hidden, weight, target: liger_fused_linear_cross_entropy(hidden, weight, target)


def providers(device, dtype):
    return [
        Provider("torch eager", unfused),
        compiled_provider(unfused),
        *lmkern_providers(OP, device, dtype, lmkern.linear_cross_entropy),
        optional_provider("liger_kernel", device, _liger),
    ]
