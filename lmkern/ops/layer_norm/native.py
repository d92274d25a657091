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
def _(x, residual, weight, bias, eps, dropout_p, seed, keep_sum):
    stats = x.new_empty(x.shape[0], dtype=torch.float32)
    summed = x.new_empty(x.shape) if keep_sum else x.new_empty(0)
    return x.new_empty(x.shape), stats, torch.empty_like(stats), summed


@torch.library.register_fake("lmkern::layer_norm_bwd")
def _(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias):
    width = summed.shape[1]
    grad_x = summed.new_empty(summed.shape) if dropout_p > 0 else summed.new_empty(0)
    grad_weight = summed.new_empty(width if weight is not None else 0, dtype=torch.float32)
    grad_bias = summed.new_empty(width if has_bias else 0, dtype=torch.float32)
    return summed.new_empty(summed.shape), grad_x, grad_weight, grad_bias


def layer_norm_fwd(x, weight, bias, eps, residual=None, dropout_p=0.0, seed=0, keep_sum=False):
    """Same contract as reference.layer_norm_fwd (float32 weight and bias)."""
    out, mean, rstd, summed = torch.ops.lmkern.layer_norm_fwd(x, residual, weight, bias, eps, dropout_p, seed, keep_sum)
    return out, mean, rstd, summed if keep_sum else None


def layer_norm_bwd(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias):
    """Same contract as reference.layer_norm_bwd."""
    grad_summed, grad_x, grad_weight, grad_bias = torch.ops.lmkern.layer_norm_bwd(
        grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias
    )
    return (
        grad_x if dropout_p > 0 else grad_summed,
        grad_summed,
        grad_weight if weight is not None else None,
        grad_bias if has_bias else None,
    )
