"""Linear + GELU with the bias and the activation fused into the matmul's epilogue: the
autograd Function and lmkern.linear_gelu.

Forward: out = gelu(x @ weight.T + bias), one matmul whose epilogue adds the bias and
applies GELU (on Triton inside the matmul kernel; natively an ATen matmul followed by one
epilogue kernel). It saves the pre-activation, or with recompute=True nothing but its
inputs. Backward: one kernel computes d(pre) = gelu'(pre) * d(out) and the bias gradient
(its column sums, deterministic), then the two matmuls d(x) = d(pre) @ weight and
d(weight) = d(pre).T @ x run in torch (cuBLAS, or ATen's CPU BLAS).

The backends' contract (linear_gelu_fwd / linear_gelu_bwd) is more general than the public
op: a linear layer's epilogue of bias, activation ("gelu", "gelu_tanh" or "none"), dropout
and residual add, which lmkern.ffn also runs for its second matmul (activation "none").
lmkern.linear_gelu is its public face for a Linear followed by GELU.
"""

import math

import torch

from lmkern.backend import Call
from lmkern.errors import ArgumentError
from lmkern.ops.autocast import cast_for_autocast, without_autocast
from lmkern.ops.double_backward import reference_grads
from lmkern.ops.layer_norm import as_stats_param, check_float_tensor
from lmkern.ops import lazy_submodules
from lmkern.ops.linear_gelu import reference
from lmkern.ops.linear_gelu.backends import LINEAR_GELU

__getattr__ = lazy_submodules(__name__)

# GELU's `approximate` argument (as in torch) -> the kernels' activation name.
ACTIVATION = {"none": "gelu", "tanh": "gelu_tanh"}


class LinearGeluFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, weight, bias, activation, recompute, backend):
        impl = LINEAR_GELU.implementation(backend)
        out, pre = impl.linear_gelu_fwd(x, weight, bias, activation, keep_preactivation=not recompute)
        ctx.save_for_backward(x, weight, bias, pre)
        ctx.impl, ctx.activation = impl, activation
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        x, weight, bias, pre = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through the reference

            def forward(x, weight, bias):
                return reference.linear_gelu_fwd(x, weight, bias, ctx.activation, False)[0]

            grads = reference_grads(forward, (x, weight, bias), ctx.needs_input_grad[:3], (grad_out,))
            return *grads, None, None, None
        if pre is None:  # recompute=True
            pre, _ = ctx.impl.linear_gelu_fwd(x, weight, bias, "none", keep_preactivation=False)
        grad_pre, grad_bias, _ = epilogue_bwd(ctx.impl, grad_out, pre, ctx.activation)
        grad_x, grad_weight = matmul_grads(grad_pre, x, weight, ctx.needs_input_grad[:2])
        grad_bias = grad_bias if ctx.needs_input_grad[2] else None
        return grad_x, grad_weight, grad_bias, None, None, None


def epilogue_bwd(impl, grad_out, pre, activation, dropout_p=0.0, seed=0, want_activation=False):
    """impl.linear_gelu_bwd: (grad_pre, grad_bias in fp32, act(pre) or None), without a
    kernel launch when the epilogue was the identity (no activation, no dropout)."""
    grad_out = grad_out if grad_out.stride(-1) == 1 else grad_out.contiguous()
    if activation == "none" and dropout_p == 0:
        return grad_out, grad_out.sum(dim=0, dtype=torch.promote_types(grad_out.dtype, torch.float32)), None
    return impl.linear_gelu_bwd(grad_out, pre, activation, dropout_p, seed, want_activation)


def matmul_grads(grad_pre, x, weight, needs_grad):
    """d(x) = grad_pre @ weight and d(weight) = grad_pre.T @ x for pre = x @ weight.T,
    each only where needs_grad (a pair of bools) asks; None otherwise."""
    grad_x = grad_pre @ weight if needs_grad[0] else None
    grad_weight = grad_pre.T @ x if needs_grad[1] else None
    return grad_x, grad_weight


def check_linear(weight, bias, input, in_features, weight_name="weight", bias_name="bias", dtype=None):
    """weight (F, in_features) in `dtype` (default input's) and on input's device, and bias
    (F,) or None."""
    check_float_tensor(weight, weight_name)
    if weight.dim() != 2 or weight.shape[1] != in_features:
        raise ArgumentError(
            f"{weight_name} must have shape (out_features, {in_features}), got {tuple(weight.shape)}"
        )
    dtype = dtype or input.dtype
    if weight.dtype != dtype or weight.device != input.device:
        raise ArgumentError(
            f"{weight_name} must have the dtype {dtype} and the input's device {input.device}, "
            f"got {weight.dtype} on {weight.device}"
        )
    if bias is not None:
        check_float_tensor(bias, bias_name)
        if tuple(bias.shape) != (weight.shape[0],) or bias.device != input.device:
            raise ArgumentError(
                f"{bias_name} must have shape ({weight.shape[0]},) on {input.device}, "
                f"got {tuple(bias.shape)} on {bias.device}"
            )


def check_approximate(approximate):
    if approximate not in ACTIVATION:
        raise ArgumentError(f"approximate must be one of {tuple(ACTIVATION)}, got {approximate!r}")


def linear_gelu(input, weight, bias=None, approximate="none", *, recompute=False, backend=None):
    """gelu(input @ weight.T + bias, approximate), with bias and GELU fused into the matmul.

    Args:
        input: (..., K) float32/float16/bfloat16 (float64 runs on the torch backend).
        weight: (F, K) in input's dtype, as torch.nn.Linear's weight. Under torch.autocast
            both are cast to the autocast dtype first, as F.linear casts them.
        bias: (F,) or None, any float dtype; the kernels add it in fp32.
        approximate: "none" (exact erf GELU) or "tanh", as torch.nn.functional.gelu.
        recompute: save no (N, F) pre-activation for backward but recompute it there with
            one more matmul (N * F elements less memory, 2 N K F more FLOPs).
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.

    Returns (..., F) in input's dtype. The bias gradient is a deterministic column sum.
    Gradients can be differentiated again (create_graph=True): that backward runs through
    the reference.
    """
    input, weight = cast_for_autocast(input, weight)
    check_float_tensor(input, "input")
    if input.dim() == 0:
        raise ArgumentError("input must have at least one dimension, got a scalar")
    check_linear(weight, bias, input, input.shape[-1])
    check_approximate(approximate)
    rows = input.reshape(math.prod(input.shape[:-1]), input.shape[-1])
    name = LINEAR_GELU.resolve(Call.of(input), backend, empty=0 in (*rows.shape, weight.shape[0]))
    out = LinearGeluFunction.apply(
        rows, weight, as_stats_param(bias, weight.shape[0], input.dtype), ACTIVATION[approximate], recompute, name
    )
    return out.view(*input.shape[:-1], weight.shape[0])
