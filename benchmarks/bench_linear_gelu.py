"""Linear + GELU (tanh, as GPT-2), tokens x hidden -> ffn width: lmkern's linear_gelu
(bias and GELU in the matmul's epilogue) against torch eager F.gelu(F.linear(...)) and
torch.compile of it.

Compute-bound, reported in TFLOP/s over the matmuls: forward 2 N K F, backward 4 N K F
(d(x) and d(weight)), forward+backward 6 N K F. Liger-Kernel has no fused Linear + GELU
(its GeGLU computes gelu(a) * b, another op), so it is not a provider here.
"""

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers

OP = "linear_gelu"
METRIC = "TFLOP/s"


def cases(device, quick):
    if quick:
        return [dict(tokens=256, hidden=64, ffn=256), dict(tokens=256, hidden=96, ffn=300)]
    if device == "cuda":  # GPT-2 small and BERT-large
        return [dict(tokens=8192, hidden=768, ffn=3072), dict(tokens=8192, hidden=1024, ffn=4096)]
    return [dict(tokens=1024, hidden=768, ffn=3072), dict(tokens=512, hidden=1024, ffn=4096)]


def label(case):
    return f"{case['tokens']}x{case['hidden']}->{case['ffn']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    x = torch.randn(case["tokens"], case["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(case["ffn"], case["hidden"], device=device, dtype=dtype) / case["hidden"] ** 0.5
    bias = torch.randn(case["ffn"], device=device, dtype=dtype, requires_grad=True)
    return x, weight.requires_grad_(), bias


def work(case, dtype, pass_name):
    matmul = 2 * case["tokens"] * case["hidden"] * case["ffn"]
    return {"fwd": matmul, "bwd": 2 * matmul, "fwd+bwd": 3 * matmul}[pass_name]


def eager(x, weight, bias):
    return F.gelu(F.linear(x, weight, bias), approximate="tanh")


def fused(x, weight, bias, backend):
    return lmkern.linear_gelu(x, weight, bias, "tanh", backend=backend)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
    ]
