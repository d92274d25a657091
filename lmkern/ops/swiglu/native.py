"""The gated epilogue through the compiled extension: torch.ops.lmkern.swiglu_fwd (ATen's
gate and up matmuls into one (2, N, F) buffer, then lmkern's epilogue kernel) and
swiglu_bwd_ (its backward, in place).

The schemas live in csrc/lmkern.cpp, the kernels in csrc/cpu/swiglu.cpp and
csrc/cuda/swiglu_kernels.cu; here are the fake implementations that let torch.compile
trace the ops, and the wrappers with the backend contract (see reference.py).
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::swiglu_fwd")
def _(x, w_gate, w_up, activation):
    return x.new_empty(x.shape[0], w_gate.shape[0]), x.new_empty(2, x.shape[0], w_gate.shape[0])


@torch.library.register_fake("lmkern::swiglu_bwd_")
def _(grad_gate, grad_up, gate, up, activation, want_activation):
    return grad_gate.new_empty(grad_gate.shape if want_activation else (0,))


def swiglu_fwd(x, w_gate, w_up, activation, keep_preactivation):
    """Same contract as reference.swiglu_fwd."""
    h, gate_up = torch.ops.lmkern.swiglu_fwd(x, w_gate, w_up, activation)
    return h, gate_up if keep_preactivation else None


def swiglu_bwd(grad_gate, grad_up, gate, up, activation, want_activation):
    """Same contract as reference.swiglu_bwd."""
    h = torch.ops.lmkern.swiglu_bwd_(grad_gate, grad_up, gate, up, activation, want_activation)
    return h if want_activation else None
