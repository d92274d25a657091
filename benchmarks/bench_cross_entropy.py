"""Softmax cross-entropy on logits (tokens x vocab): lmkern's backends against torch eager,
torch.compile, Liger-Kernel and flash-attn's Triton cross-entropy.

Memory-bound, reported as effective bandwidth over the minimal bytes of each pass, with
s the logits' element size: forward reads the logits (N V s); backward and
forward+backward read the logits and write their gradient (2 N V s). Targets and the
per-row loss are negligible.
"""

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "cross_entropy"
METRIC = "GB/s"
# Vocabularies of Llama 2, GPT-2, Llama 3 and Gemma 3.
VOCABS = (32000, 50257, 128256, 262144)


def cases(device, quick):
    if quick:
        return [dict(tokens=256, vocab=vocab) for vocab in (1000, 32000)]
    tokens = 8192 if device == "cuda" else 1024
    return [dict(tokens=tokens, vocab=vocab) for vocab in VOCABS]


def label(case):
    return f"{case['tokens']}x{case['vocab']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    logits = torch.randn(case["tokens"], case["vocab"], device=device, dtype=dtype, requires_grad=True)
    target = torch.randint(0, case["vocab"], (case["tokens"],), device=device)
    target[::10] = -100  # some padding
    return logits, target


def work(case, dtype, pass_name):
    logits_bytes = case["tokens"] * case["vocab"] * dtype.itemsize
    return logits_bytes if pass_name == "fwd" else 2 * logits_bytes


def _liger():
    from liger_kernel.transformers.functional import liger_cross_entropy

    return lambda logits, target: liger_cross_entropy(logits, target)


def _flash_attn():
    from flash_attn.ops.triton.cross_entropy import cross_entropy_loss

    def run(logits, target):
        losses, _ = cross_entropy_loss(logits, target)  # per row, 0 where ignored
        return losses.sum() / (target != -100).sum()

    return run


def providers(device, dtype):
    return [
        Provider("torch eager", F.cross_entropy),
        compiled_provider(F.cross_entropy),
        *lmkern_providers(OP, device, dtype, lmkern.cross_entropy),
        optional_provider("liger_kernel", device, _liger),
        optional_provider("flash_attn", device, _flash_attn),
    ]
