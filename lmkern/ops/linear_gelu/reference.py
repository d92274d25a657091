"""A linear layer with a fused epilogue, in plain PyTorch: the oracle the kernels are
tested against.

    pre = x @ weight.T + bias
    out = residual + dropout(act(pre))      act: "gelu", "gelu_tanh" or "none" (identity)

lmkern.linear_gelu is act = GELU with no dropout and no residual; the FFN's second
linear layer is act = "none" with the block's dropout and residual. Backward of the
epilogue: d(pre) = act'(pre) * dropout(d(out)) and d(bias) = sum_rows d(pre); the two
matmuls d(x) = d(pre) @ weight and d(weight) = d(pre).T @ x follow in the autograd
Function. Everything runs in the input's dtype, as eager code would.
"""

import torch
import torch.nn.functional as F

from lmkern.ops.dropout import dropout

ACTIVATIONS = ("gelu", "gelu_tanh", "none")


def activate(pre, activation):
    if activation == "none":
        return pre
    return F.gelu(pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def linear_gelu_fwd(x, weight, bias, activation, keep_preactivation, dropout_p=0.0, seed=0, residual=None):
    """out = residual + dropout(act(x @ weight.T + bias)).

    x: (N, K), weight: (F, K), both in one dtype; bias: (F,) in fp32 (fp64 for fp64 x), or
    None. activation: one of ACTIVATIONS. residual: (N, F) in x's dtype, or None.
    Returns out (N, F) in x's dtype and, if keep_preactivation and activation is not
    "none", pre = x @ weight.T + bias (N, F) in x's dtype for backward; else None.
    """
    pre = F.linear(x, weight, None if bias is None else bias.to(x.dtype))
    out = dropout(activate(pre, activation), seed, dropout_p)
    if residual is not None:
        out = out + residual
    return out, pre if keep_preactivation and activation != "none" else None


def linear_gelu_bwd(grad_out, pre, activation, dropout_p, seed, want_activation, inplace=False):
    """Backward of the epilogue of linear_gelu_fwd.

    grad_out: (N, F) gradient of out, last dim contiguous (contiguous if inplace). pre:
    (N, F) the saved pre-activation (None for activation "none"). Returns grad_pre (N, F)
    in grad_out's dtype (written over grad_out if inplace), grad_bias (F,) in fp32 (fp64
    for fp64 input), and, if want_activation, act(pre) (N, F) (the input of a following
    linear layer, recomputed rather than saved), else None.
    """
    grad = dropout(grad_out, seed, dropout_p)
    if activation != "none":
        approximate = "tanh" if activation == "gelu_tanh" else "none"
        grad = torch.ops.aten.gelu_backward(grad, pre, approximate=approximate)
    grad_bias = grad.sum(dim=0, dtype=torch.promote_types(grad.dtype, torch.float32))
    if inplace:
        grad = grad_out.copy_(grad)
    return grad, grad_bias, activate(pre, activation) if want_activation else None
