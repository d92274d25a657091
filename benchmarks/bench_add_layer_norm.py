"""Residual add + dropout + LayerNorm, post-LN (BERT): LayerNorm(residual + dropout(x)).
lmkern's fused add_layer_norm against the same three ops in torch eager and under
torch.compile.

Memory-bound, reported as effective bandwidth over the minimal bytes of each pass, with s
the element size: forward reads x and the residual and writes the output (3 N D s);
backward reads the output's gradient and the normalised sum and writes the gradients of
x and of the residual (4 N D s); forward+backward 7 N D s. A fused kernel meets these;
eager code also writes and reads the sum and the dropout mask in between.
"""

import torch
import torch.nn.functional as F

import lmkern

from . import bench_layer_norm
from .harness import Provider, compiled_provider, lmkern_providers

# The same sizes and dtype as layer_norm.
cases, dtype, label = bench_layer_norm.cases, bench_layer_norm.dtype, bench_layer_norm.label

OP = "add_layer_norm"
METRIC = "GB/s"
DROPOUT = 0.1


def make_inputs(case, device, dtype):
    hidden = case["hidden"]
    x = torch.randn(case["tokens"], hidden, device=device, dtype=dtype, requires_grad=True)
    residual = torch.randn_like(x).requires_grad_()
    weight = torch.rand(hidden, device=device, dtype=dtype).add_(0.5).requires_grad_()
    bias = torch.randn(hidden, device=device, dtype=dtype, requires_grad=True)
    return x, residual, weight, bias


def work(case, dtype, pass_name):
    rows = case["tokens"] * case["hidden"] * dtype.itemsize
    return {"fwd": 3 * rows, "bwd": 4 * rows, "fwd+bwd": 7 * rows}[pass_name]


def eager(x, residual, weight, bias):
    summed = residual + F.dropout(x, DROPOUT)
    return F.layer_norm(summed, (summed.shape[-1],), weight, bias)


def fused(x, residual, weight, bias, backend):
    return lmkern.add_layer_norm(x, residual, weight, bias, dropout_p=DROPOUT, prenorm=False, backend=backend)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
    ]
