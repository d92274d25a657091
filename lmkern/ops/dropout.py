"""Dropout as lmkern's fused ops apply it, in torch: the oracle for the kernels' masks.

An element of a row-major (N, D) tensor is numbered by its index row * D + col, and kept
when lmkern.philox.uniform(seed, index) >= p; kept elements are scaled by 1 / (1 - p).
The Triton kernels (lmkern/ops/triton_dropout.py) and the C++/CUDA kernels
(csrc/dropout.h) draw the same numbers, so every backend drops the same elements.
"""

import torch

from lmkern import philox


def dropout(values, seed, p):
    """values (N, D) with every element dropped with probability p, the rest scaled by 1/(1-p).

    Same dtype as values; p = 0 returns values itself.
    """
    if p == 0:
        return values
    index = torch.arange(values.numel(), device=values.device).view(values.shape)
    keep = philox.dropout_keep(seed, index, p)
    return torch.where(keep, values / (1 - p), 0).to(values.dtype)
