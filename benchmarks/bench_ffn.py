"""The feed-forward sub-block, pre-LN as nn.Sequential(LayerNorm, Linear, GELU, Linear,
Dropout) computes it (dropout 0.1; linear_gelu's cases: GELU tanh or exact, fp32 or bf16):
lmkern.ffn against that block in torch eager and under torch.compile.

Compute-bound, reported in TFLOP/s over the two matmuls of width D and F: forward
4 N D F, backward 8 N D F, forward+backward 12 N D F. The peak memory of forward+backward
is the other point: lmkern.ffn saves only the LayerNorm statistics and the GELU
pre-activation. With bf16 weights on CPU its backward is slower than eager's: it sums d(w2)
over row chunks in fp32, and torch has no bf16 x bf16 -> fp32 matmul on CPU, so those run as
fp32 matmuls of upcast operands (the README's "On CPU" section).
"""

import torch
import torch.nn.functional as F

import lmkern

from . import bench_linear_gelu
from .harness import Provider, compiled_provider, lmkern_providers

# The same sizes, GELUs and dtypes as linear_gelu.
cases, dtype, label = bench_linear_gelu.cases, bench_linear_gelu.dtype, bench_linear_gelu.label

OP = "ffn"
METRIC = "TFLOP/s"
DROPOUT = 0.1


def make_inputs(case, device, dtype):
    hidden, ffn = case["hidden"], case["ffn"]
    dtype = torch.bfloat16 if case["precision"] == "bf16" else dtype

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    x = param(case["tokens"], hidden)
    return x, param(hidden), param(hidden), param(ffn, hidden, scale=hidden**-0.5), param(ffn), \
        param(hidden, ffn, scale=ffn**-0.5), param(hidden), case["approximate"]


def work(case, dtype, pass_name):
    matmuls = 4 * case["tokens"] * case["hidden"] * case["ffn"]
    return {"fwd": matmuls, "bwd": 2 * matmuls, "fwd+bwd": 3 * matmuls}[pass_name]


def eager(x, norm_weight, norm_bias, w1, b1, w2, b2, approximate):
    """What nn.Sequential(LayerNorm, Linear, GELU(approximate), Linear, Dropout) computes."""
    h = F.layer_norm(x, (x.shape[-1],), norm_weight, norm_bias)
    return F.dropout(F.linear(F.gelu(F.linear(h, w1, b1), approximate=approximate), w2, b2), DROPOUT)


def fused(x, norm_weight, norm_bias, w1, b1, w2, b2, approximate, backend):
    return lmkern.ffn(x, norm_weight, norm_bias, w1, b1, w2, b2, approximate=approximate, dropout_p=DROPOUT,
                      residual=False, backend=backend)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
    ]
