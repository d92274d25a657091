"""Linear + fused epilogue through the compiled extension: torch.ops.lmkern.linear_gelu_fwd
/ _bwd / _bwd_ (ATen's matmul, then lmkern's epilogue kernel).

The schemas live in csrc/lmkern.cpp, the kernels in csrc/cpu/linear_gelu.cpp and
csrc/cuda/linear_gelu_kernels.cu; here are the fake implementations that let
torch.compile trace the ops, and the wrappers with the backend contract (the ops return
empty tensors where the contract has None).
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::linear_gelu_fwd")
def _(x, weight, bias, activation, keep_preactivation, dropout_p, seed, residual):
    out = x.new_empty(x.shape[0], weight.shape[0])
    keep = keep_preactivation and activation != "none"
    return out, torch.empty_like(out) if keep else x.new_empty(0)


@torch.library.register_fake("lmkern::linear_gelu_bwd")
def _(grad_out, preactivation, activation, dropout_p, seed, want_activation):
    want = want_activation and activation != "none"
    act = grad_out.new_empty(grad_out.shape) if want else grad_out.new_empty(0)
    grad_bias = grad_out.new_empty(grad_out.shape[1], dtype=torch.float32)
    return grad_out.new_empty(grad_out.shape), grad_bias, act


@torch.library.register_fake("lmkern::linear_gelu_bwd_")
def _(grad_out, preactivation, activation, dropout_p, seed, want_activation):
    want = want_activation and activation != "none"
    act = grad_out.new_empty(grad_out.shape) if want else grad_out.new_empty(0)
    return grad_out.new_empty(grad_out.shape[1], dtype=torch.float32), act


def linear_gelu_fwd(x, weight, bias, activation, keep_preactivation, dropout_p=0.0, seed=0, residual=None):
    """Same contract as reference.linear_gelu_fwd (float32 bias)."""
    out, pre = torch.ops.lmkern.linear_gelu_fwd(
        x, weight, bias, activation, keep_preactivation, dropout_p, seed, residual
    )
    return out, pre if keep_preactivation and activation != "none" else None


def linear_gelu_bwd(grad_out, pre, activation, dropout_p, seed, want_activation, inplace=False):
    """Same contract as reference.linear_gelu_bwd."""
    if inplace:
        grad_pre = grad_out
        grad_bias, act = torch.ops.lmkern.linear_gelu_bwd_(grad_out, pre, activation, dropout_p, seed, want_activation)
    else:
        grad_pre, grad_bias, act = torch.ops.lmkern.linear_gelu_bwd(
            grad_out, pre, activation, dropout_p, seed, want_activation
        )
    return grad_pre, grad_bias, act if want_activation and activation != "none" else None
