"""Rotary position embeddings through the compiled extension: torch.ops.lmkern.apply_rotary
(a new output) and torch.ops.lmkern.apply_rotary_ (in place).

The schemas live in csrc/lmkern.cpp, the kernels in csrc/cpu/apply_rotary.cpp and
csrc/cuda/apply_rotary_kernels.cu; here are the fake implementations that let
torch.compile trace the ops, and the wrappers with the backend contract.
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::apply_rotary")
def _(x, cos, sin, positions, interleaved, conjugate):
    return x.new_empty(x.shape)


@torch.library.register_fake("lmkern::apply_rotary_")
def _(x, cos, sin, positions, interleaved, conjugate):
    return None


def apply_rotary_fwd(x, cos, sin, positions, interleaved, inplace):
    """Same contract as reference.apply_rotary_fwd (cos and sin contiguous, of one dtype)."""
    if inplace:
        torch.ops.lmkern.apply_rotary_(x, cos, sin, positions, interleaved, False)
        return x
    return torch.ops.lmkern.apply_rotary(x, cos, sin, positions, interleaved, False)


def apply_rotary_bwd(cos, sin, positions, interleaved, grad_out):
    """Same contract as reference.apply_rotary_bwd."""
    return torch.ops.lmkern.apply_rotary(grad_out, cos, sin, positions, interleaved, True)
