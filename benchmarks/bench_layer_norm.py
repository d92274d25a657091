"""LayerNorm over the hidden dimension (tokens x hidden): lmkern's backends against torch
eager, torch.compile and Liger-Kernel's LayerNorm.

Memory-bound, reported as effective bandwidth over the minimal bytes of each pass, with s
the element size: forward reads x and writes the output (2 N D s); backward reads x and
the output's gradient and writes x's gradient (3 N D s); forward+backward 5 N D s. The
weight, bias, per-row statistics and their gradients are negligible.
"""

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "layer_norm"
METRIC = "GB/s"


def cases(device, quick):
    if quick:
        return [dict(tokens=256, hidden=768), dict(tokens=256, hidden=1000)]
    if device == "cuda":  # GPT-2, BERT-large, the 32768 x 4096, a wide row
        return [dict(tokens=32768, hidden=h) for h in (768, 1024, 4096)] + [dict(tokens=8192, hidden=16384)]
    return [dict(tokens=4096, hidden=768), dict(tokens=4096, hidden=1024), dict(tokens=1024, hidden=4096)]


def label(case):
    return f"{case['tokens']}x{case['hidden']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    hidden = case["hidden"]
    x = torch.randn(case["tokens"], hidden, device=device, dtype=dtype, requires_grad=True)
    weight = torch.rand(hidden, device=device, dtype=dtype).add_(0.5).requires_grad_()
    bias = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
    return x, weight, bias


def work(case, dtype, pass_name):
    rows = case["tokens"] * case["hidden"] * dtype.itemsize
    return {"fwd": 2 * rows, "bwd": 3 * rows, "fwd+bwd": 5 * rows}[pass_name]


def eager(x, weight, bias):
    return F.layer_norm(x, (x.shape[-1],), weight, bias)


def fused(x, weight, bias, backend):
    return lmkern.layer_norm(x, (x.shape[-1],), weight, bias, backend=backend)


def _liger():
    from liger_kernel.transformers.functional import liger_layer_norm

    return lambda x, weight, bias: liger_layer_norm(x, weight, bias, 1e-5)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
        optional_provider("liger_kernel", device, _liger),
    ]
