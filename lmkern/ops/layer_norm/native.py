"""LayerNorm through the compiled extension: torch.ops.lmkern.layer_norm_fwd / _bwd.

The schemas live in csrc/lmkern.cpp, the kernels in csrc/cpu/layer_norm.cpp and
csrc/cuda/layer_norm_kernels.cu; here are the fake implementations that let
torch.compile trace the ops, and the wrappers with the backend contract (the ops return
empty tensors where the contract has None).
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::layer_norm_fwd")
def _(x, residual, weight, bias, eps, dropout_p, seed, keep_sum, rms=False):
    rstd = x.new_empty(x.shape[0], dtype=torch.float32)
    mean = rstd.new_empty(0 if rms else x.shape[0])
    summed = x.new_empty(x.shape) if keep_sum else x.new_empty(0)
    return x.new_empty(x.shape), mean, rstd, summed


@torch.library.register_fake("lmkern::layer_norm_bwd")
def _(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias, rms=False):
    width = summed.shape[1]
    grad_x = summed.new_empty(summed.shape) if dropout_p > 0 else summed.new_empty(0)
    grad_weight = summed.new_empty(width if weight is not None else 0, dtype=torch.float32)
    grad_bias = summed.new_empty(width if has_bias else 0, dtype=torch.float32)
    return summed.new_empty(summed.shape), grad_x, grad_weight, grad_bias


def layer_norm_fwd(x, weight, bias, eps, residual=None, dropout_p=0.0, seed=0, keep_sum=False, rms=False):
    """Same contract as reference.layer_norm_fwd (float32 weight and bias)."""
    out, mean, rstd, summed = torch.ops.lmkern.layer_norm_fwd(
        x, residual, weight, bias, eps, dropout_p, seed, keep_sum, rms
    )
    return out, None if rms else mean, rstd, summed if keep_sum else None


def layer_norm_bwd(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias, rms=False):
    """Same contract as reference.layer_norm_bwd."""
    if mean is None:  # rms: not read
        mean = rstd.new_empty(0)
    grad_summed, grad_x, grad_weight, grad_bias = torch.ops.lmkern.layer_norm_bwd(
        grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias, rms
    )
    return (
        grad_x if dropout_p > 0 else grad_summed,
        grad_summed,
        grad_weight if weight is not None else None,
        grad_bias if has_bias else None,
    )
