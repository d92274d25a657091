"""LayerNorm: the autograd Function (which lmkern.add_layer_norm shares: residual add +
dropout + LayerNorm in one pass; and lmkern.rms_norm and add_rms_norm, with rms=True: the
same kernels, the row not centred and no bias) and lmkern.layer_norm.

Forward saves only what backward cannot cheaply get back: the normalised rows s (the
input itself for a plain LayerNorm, or the new residual stream) and the fp32 mean (none
for RMSNorm) and rstd per row. A dropout mask is never stored: backward draws it again
from the seed.
"""

import math

import torch

from lmkern.backend import Call
from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops import lazy_submodules
from lmkern.ops.autocast import without_autocast
from lmkern.ops.double_backward import reference_grads, refuse_create_graph
from lmkern.ops.layer_norm import reference
from lmkern.ops.layer_norm.backends import LAYER_NORM

__getattr__ = lazy_submodules(__name__)


class LayerNormFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, residual, weight, bias, eps, dropout_p, seed, prenorm, rms, backend):
        impl = LAYER_NORM.implementation(backend)
        adds = residual is not None or dropout_p > 0
        out, mean, rstd, summed = impl.layer_norm_fwd(
            x, weight, bias, eps, residual, dropout_p, seed, keep_sum=adds, rms=rms
        )
        if not adds:
            summed = x
        ctx.save_for_backward(summed, weight, bias, mean, rstd)
        ctx.set_materialize_grads(False)
        ctx.impl, ctx.eps, ctx.dropout_p, ctx.seed, ctx.prenorm, ctx.rms = impl, eps, dropout_p, seed, prenorm, rms
        ctx.adds, ctx.has_residual = adds, residual is not None
        return (out, summed) if prenorm else out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out, grad_sum=None):
        summed, weight, bias, mean, rstd = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True
            return (*_differentiable_grads(ctx, summed, weight, bias, grad_out, grad_sum), None, None, None, None, None,
                    None)
        if grad_out is None:  # only the returned residual was used
            grad_out = torch.zeros_like(summed)
        grad_x, grad_residual, grad_weight, grad_bias = ctx.impl.layer_norm_bwd(
            last_dim_contiguous(grad_out),
            None if grad_sum is None else last_dim_contiguous(grad_sum),
            summed,
            weight,
            mean,
            rstd,
            ctx.dropout_p,
            ctx.seed,
            bias is not None,
            ctx.rms,
        )
        grad_residual = grad_residual if ctx.has_residual else None
        return grad_x, grad_residual, grad_weight, grad_bias, None, None, None, None, None, None


def _differentiable_grads(ctx, x, weight, bias, grad_out, grad_sum):
    """(d x, d residual, d weight, d bias) that can be differentiated again: a plain
    LayerNorm's (or RMSNorm's) backward through the reference (x is then the saved input);
    a sum with a residual or dropout cannot (only the sum was kept)."""
    if ctx.adds:
        refuse_create_graph("add_rms_norm" if ctx.rms else "add_layer_norm")

    def forward(x, weight, bias):
        out = reference.layer_norm_fwd(x, weight, bias, ctx.eps, rms=ctx.rms)[0]
        return (out, x) if ctx.prenorm else out

    needs = ctx.needs_input_grad
    grad_x, grad_weight, grad_bias = reference_grads(
        forward, (x, weight, bias), (needs[0], needs[2], needs[3]), (grad_out, grad_sum)
    )
    return grad_x, None, grad_weight, grad_bias


def last_dim_contiguous(tensor):
    """tensor, or a contiguous copy if its last dimension is strided (the kernels' need)."""
    return tensor if tensor.stride(-1) == 1 else tensor.contiguous()


def as_rows(tensor, width):
    """tensor (..., width) as (N, width) rows with a contiguous last dimension (a view
    where possible)."""
    return last_dim_contiguous(tensor.reshape(math.prod(tensor.shape[:-1]), width))


def resolve_rows(op, x, width, backend):
    """The backend of op (LAYER_NORM, ADD_LAYER_NORM, RMS_NORM or ADD_RMS_NORM) for rows of
    `width` elements of x."""
    return op.resolve(Call.of(x, width=width), backend, empty=x.numel() == 0)


def check_float_tensor(tensor, name):
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if not tensor.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_param(param, name, shape, input):
    """weight or bias: None, or a float tensor of `shape` on input's device."""
    if param is None:
        return
    check_float_tensor(param, name)
    if tuple(param.shape) != tuple(shape) or param.device != input.device:
        raise ArgumentError(
            f"{name} must have shape {tuple(shape)} on {input.device}, got {tuple(param.shape)} on {param.device}"
        )


def as_stats_param(param, width, dtype, offset=0.0):
    """weight or bias flattened to (width,) in the statistics' dtype (fp32, fp64 for fp64
    input), which the kernels take, plus `offset` (RMSNorm's weight_offset: a new (width,)
    tensor when not 0); autograd carries the cast and the offset back."""
    if param is None:
        return None
    param = param.reshape(width).to(torch.promote_types(torch.float32, dtype))
    return param + offset if offset else param


def rms_eps(eps, dtype):
    """RMSNorm's eps: None means the machine epsilon of the statistics' dtype (fp32's for
    half inputs), which is what torch.nn.functional.rms_norm uses (its documentation says
    torch.finfo(input.dtype).eps; its code takes the eps of the dtype it computes in)."""
    return torch.finfo(torch.promote_types(dtype, torch.float32)).eps if eps is None else eps


def check_eps_dropout(eps, dropout_p):
    if not eps >= 0:
        raise ArgumentError(f"eps must be >= 0, got {eps}")
    if not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")


def check_normalized_shape(input, normalized_shape):
    """normalized_shape (an int or a sequence of ints) as a tuple: the last dimensions of input."""
    shape = (normalized_shape,) if isinstance(normalized_shape, int) else tuple(normalized_shape)
    if len(shape) == 0 or tuple(input.shape[input.dim() - len(shape):]) != shape or input.dim() < len(shape):
        raise ArgumentError(
            f"normalized_shape must be the last dimensions of input {tuple(input.shape)} (at least one), "
            f"got {normalized_shape}"
        )
    return shape


def normalize_rows(op, input, shape, weight, bias, eps, backend, rms=False, weight_offset=0.0):
    """LayerNormFunction (op LAYER_NORM, or RMS_NORM with rms) over the trailing `shape` of
    input, all arguments checked, as input's shape."""
    width = math.prod(shape)
    name = resolve_rows(op, input, width, backend)
    out = LayerNormFunction.apply(
        as_rows(input.reshape(*input.shape[: input.dim() - len(shape)], width), width),
        None,
        as_stats_param(weight, width, input.dtype, weight_offset),
        as_stats_param(bias, width, input.dtype),
        float(eps),
        0.0,
        0,
        False,
        rms,
        name,
    )
    return out.view(input.shape)


def layer_norm(input, normalized_shape, weight=None, bias=None, eps=1e-5, *, backend=None):
    """torch.nn.functional.layer_norm on lmkern's kernels.

    Args:
        input: (..., *normalized_shape), float32/float16/bfloat16 (float64 runs on the
            torch backend); any strides.
        normalized_shape: the trailing dimensions to normalise over (an int or a sequence
            of ints); they are normalised as one row of prod(normalized_shape) elements.
        weight, bias: normalized_shape, or None; any float dtype (the kernels use them in
            fp32, and their gradients are returned in their own dtype).
        eps: added to the variance.
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend. Rows wider
            than 64 KiB are refused by the GPU kernels (auto then runs the reference).

    Returns the normalised input, same shape and dtype: under torch.autocast too, which
    changes nothing here (torch's CPU autocast also keeps the input's dtype; its CUDA
    autocast returns fp32). Mean and variance are computed in fp32 (two passes); backward
    saves only the input and the fp32 mean and rstd per row.
    """
    check_float_tensor(input, "input")
    shape = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", shape, input)
    check_param(bias, "bias", shape, input)
    check_eps_dropout(eps, 0.0)
    return normalize_rows(LAYER_NORM, input, shape, weight, bias, eps, backend)
