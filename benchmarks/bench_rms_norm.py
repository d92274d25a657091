"""RMSNorm over the hidden dimension (tokens x hidden): lmkern's backends against torch
eager (F.rms_norm), torch.compile and Liger-Kernel's RMSNorm.

Memory-bound, reported as effective bandwidth over the minimal bytes of each pass, with s
the element size: forward reads x and writes the output (2 N D s); backward reads x and
the output's gradient and writes x's gradient (3 N D s); forward+backward 5 N D s. The
weight, the per-row rstd and the weight's gradient are negligible.
"""

import torch
import torch.nn.functional as F

import lmkern

from . import bench_layer_norm
from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

# The same sizes, dtype and bytes as layer_norm.
cases, dtype, label, work = bench_layer_norm.cases, bench_layer_norm.dtype, bench_layer_norm.label, bench_layer_norm.work

OP = "rms_norm"
METRIC = "GB/s"
EPS = 1e-6


def make_inputs(case, device, dtype):
    hidden = case["hidden"]
    x = torch.randn(case["tokens"], hidden, device=device, dtype=dtype, requires_grad=True)
    weight = torch.rand(hidden, device=device, dtype=dtype).add_(0.5).requires_grad_()
    return x, weight


def eager(x, weight):
    return F.rms_norm(x, (x.shape[-1],), weight, EPS)


def fused(x, weight, backend):
    return lmkern.rms_norm(x, (x.shape[-1],), weight, EPS, backend=backend)


def _liger():
    from liger_kernel.transformers.functional import liger_rms_norm

    # in_place=False: its default writes dx into the upstream gradient, which the timing
    # loop passes again on every backward.
    return lambda x, weight: liger_rms_norm(x, weight, EPS, in_place=False)


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
        optional_provider("liger_kernel", device, _liger),
    ]
