"""Dropout inside Triton kernels, drawing what lmkern/ops/dropout.py draws in torch, and
the arguments the kernels take for it."""

import triton
import triton.language as tl


@triton.jit
def dropout(values, seed, index, p, scale):
    """values with the elements numbered `index` (int64, row * D + col) dropped where
    tl.rand(seed, index) < p and the rest multiplied by scale = 1 / (1 - p)."""
    return tl.where(tl.rand(seed, index) >= p, values * scale, 0.0)


def dropout_args(dropout_p):
    """(p, 1 / (1 - p)), the kernels' dropout arguments; the scale is unused when p is 0 or 1."""
    return dropout_p, 1.0 / (1.0 - dropout_p) if dropout_p < 1 else 0.0
