"""Softmax cross-entropy through the compiled extension: torch.ops.lmkern.cross_entropy_fwd[_].

The schemas live in csrc/lmkern.cpp, the kernels in csrc/cpu/cross_entropy.cpp and
csrc/cuda/cross_entropy_kernels.cu; here are the fake implementations that let
torch.compile trace the ops, and the wrapper with the backend contract.
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::cross_entropy_fwd")
def _(logits, target, weight, ignore_index, label_smoothing, z_loss):
    loss = logits.new_empty(logits.shape[0], dtype=torch.float32)
    return loss, torch.empty_like(logits, memory_format=torch.contiguous_format)


@torch.library.register_fake("lmkern::cross_entropy_fwd_")
def _(logits, target, weight, ignore_index, label_smoothing, z_loss):
    return logits.new_empty(logits.shape[0], dtype=torch.float32)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, inplace_backward):
    """Same contract as reference.cross_entropy_fwd; `weight` must be float32 here."""
    if inplace_backward:
        loss = torch.ops.lmkern.cross_entropy_fwd_(logits, target, weight, ignore_index, label_smoothing, z_loss)
        return loss, logits
    return torch.ops.lmkern.cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss)
