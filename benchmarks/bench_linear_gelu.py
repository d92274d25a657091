"""Linear + GELU, tokens x hidden -> ffn width: lmkern's linear_gelu (bias and GELU in the
matmul's epilogue) against torch eager F.gelu(F.linear(...)) (the bias in addmm, then
aten::gelu) and torch.compile of it. GELU tanh (GPT-2) and exact (BERT); on CPU also bf16
inputs (the case's last word; the op's dtype column stays the default's), where the
epilogue's conversions matter as much as its arithmetic. The exact GELU's epilogue, an erfc
accurate in the tail, costs more than aten::gelu's vectorised erf: below eager on CPU (the
README's "On CPU" section).

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
        return [dict(tokens=256, hidden=64, ffn=256, approximate="tanh", precision="fp32"),
                dict(tokens=256, hidden=96, ffn=300, approximate="none", precision="fp32")]
    if device == "cuda":  # GPT-2 small and BERT-large
        return [dict(tokens=8192, hidden=768, ffn=3072, approximate="tanh", precision="bf16"),
                dict(tokens=8192, hidden=1024, ffn=4096, approximate="none", precision="bf16")]
    # GPT-2 small, and a MiniLM-shaped BERT's batch of 32 x 128 tokens
    return [dict(tokens=1024, hidden=768, ffn=3072, approximate="tanh", precision=precision)
            for precision in ("fp32", "bf16")] + [
            dict(tokens=4096, hidden=384, ffn=1536, approximate="none", precision=precision)
            for precision in ("fp32", "bf16")]


def label(case):
    gelu = "tanh" if case["approximate"] == "tanh" else "exact"
    return f"{case['tokens']}x{case['hidden']}->{case['ffn']} {gelu} {case['precision']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    dtype = torch.bfloat16 if case["precision"] == "bf16" else dtype
    x = torch.randn(case["tokens"], case["hidden"], device=device, dtype=dtype, requires_grad=True)
    weight = torch.randn(case["ffn"], case["hidden"], device=device, dtype=dtype) / case["hidden"] ** 0.5
    bias = torch.randn(case["ffn"], device=device, dtype=dtype, requires_grad=True)
    return x, weight.requires_grad_(), bias, case["approximate"]


def work(case, dtype, pass_name):
    matmul = 2 * case["tokens"] * case["hidden"] * case["ffn"]
    return {"fwd": matmul, "bwd": 2 * matmul, "fwd+bwd": 3 * matmul}[pass_name]


def eager(x, weight, bias, approximate):
    return F.gelu(F.linear(x, weight, bias), approximate=approximate)


def fused(x, weight, bias, approximate, backend):
    return lmkern.linear_gelu(x, weight, bias, approximate, backend=backend)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
    ]
