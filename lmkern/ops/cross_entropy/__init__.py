"""Fused softmax cross-entropy on logits: the autograd Function and lmkern.cross_entropy.

The forward kernel of the backend in use computes each row's loss and its gradient in one
pass over the logits, so backward is only a scale of that gradient (by the incoming
gradient, and by 1/denominator for "mean"). The scale is the same for every backend and
is done here with one torch multiply.
"""

import torch

from lmkern.backend import Call
from lmkern.errors import ArgumentError, ArgumentTypeError, TargetIndexError
from lmkern.ops import lazy_submodules
from lmkern.ops.autocast import autocast_dtype, without_autocast
from lmkern.ops.cross_entropy.backends import CROSS_ENTROPY
from lmkern.ops.double_backward import refuse_create_graph

__getattr__ = lazy_submodules(__name__)

REDUCTIONS = ("none", "mean", "sum")


def reduce_rows(row_loss, target, weight, ignore_index, reduction):
    """The reduced loss in fp32 and, for "mean", the denominator it was divided by.

    As in torch, "mean" divides by the number of non-ignored rows, or by the sum of their
    target classes' weights; with every row ignored that is 0/0 = NaN.
    """
    if reduction == "none":
        return row_loss, None
    if reduction == "sum":
        return row_loss.sum(), None
    counted = target != ignore_index
    if weight is None:
        denominator = counted.sum(dtype=torch.float32)
    else:
        target_weight = weight[target.clamp(0, weight.shape[0] - 1)]
        denominator = torch.where(counted, target_weight, 0.0).sum()
    return row_loss.sum() / denominator, denominator


def grad_scale(grad_loss, denominator, reduction):
    """What each row's saved gradient is multiplied by in backward (broadcasts over (N, V))."""
    if reduction == "none":
        return grad_loss[:, None]
    if reduction == "sum":
        return grad_loss
    # With every row ignored the saved gradient is all zeros: divide by 1, not 0, to keep it so.
    return grad_loss / torch.where(denominator > 0, denominator, 1.0)


class CrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(
        ctx, logits, target, weight, ignore_index, reduction, label_smoothing, z_loss, inplace_backward, loss_dtype,
        backend,
    ):
        fwd = CROSS_ENTROPY.implementation(backend).cross_entropy_fwd
        row_loss, grad = fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, inplace_backward)
        if inplace_backward:
            # Anything else that saved the logits must now fail loudly instead of reading gradients.
            torch.autograd.graph.increment_version(logits)
        loss, denominator = reduce_rows(row_loss, target, weight, ignore_index, reduction)
        ctx.save_for_backward(grad, denominator)
        ctx.reduction = reduction
        ctx.inplace_backward = inplace_backward
        return loss.to(loss_dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        refuse_create_graph("cross_entropy")
        grad, denominator = ctx.saved_tensors
        scale = grad_scale(grad_loss, denominator, ctx.reduction)
        # Out of place by default so that backward may run twice (retain_graph=True).
        grad_logits = grad.mul_(scale) if ctx.inplace_backward else scaled(grad, scale, grad.dtype)
        return grad_logits, None, None, None, None, None, None, None, None, None


def scaled(grad, scale, dtype):
    """grad * scale (grad itself if scale is None) in `dtype`, rounded once and without an
    fp32 temporary of grad's size (scale may be fp32 for half grad: an fp32 loss under
    autocast). Out of place, so that backward may run twice (retain_graph=True)."""
    if grad is None:
        return None
    if scale is None:
        return grad.to(dtype)
    return torch.mul(grad, scale, out=torch.empty_like(grad, dtype=dtype))


def loss_dtype(input):
    """The dtype of a loss of `input`: input's, or at least fp32 under torch.autocast, as
    torch's losses there."""
    if autocast_dtype(input.device.type) is None:
        return input.dtype
    return torch.promote_types(input.dtype, torch.float32)


def check_reduction_args(ignore_index, reduction, label_smoothing, z_loss):
    if reduction not in REDUCTIONS:
        raise ArgumentError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
    if not isinstance(ignore_index, int):
        raise ArgumentTypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    if not 0.0 <= label_smoothing <= 1.0:
        raise ArgumentError(f"label_smoothing must be in [0, 1], got {label_smoothing}")
    if not z_loss >= 0.0:
        raise ArgumentError(f"z_loss must be >= 0, got {z_loss}")


# Class indices: torch's int64 and uint8, and int32.
TARGET_DTYPES = (torch.int64, torch.int32, torch.uint8)


def check_target(target, input, input_name):
    """target must hold class indices with the shape of input without its last dimension."""
    if not isinstance(target, torch.Tensor):
        raise ArgumentTypeError(f"target must be a tensor, got {type(target).__name__}")
    if target.dtype not in TARGET_DTYPES:
        raise ArgumentTypeError(f"target must hold class indices as int64, int32 or uint8, got {target.dtype}")
    if target.shape != input.shape[:-1]:
        raise ArgumentError(
            f"target must have shape {tuple(input.shape[:-1])} ({input_name} {tuple(input.shape)} "
            f"without its last dimension), got {tuple(target.shape)}"
        )
    if target.device != input.device:
        raise ArgumentError(f"target must be on {input.device} like {input_name}, got {target.device}")


def rows_target(target, vocab, ignore_index):
    """target flattened to (N,) int64, after checking on CPU that every index is in
    [0, vocab) or ignore_index (TargetIndexError names the first that is not). Only on
    CPU, where the check costs no device synchronisation: on CUDA such a row's loss and
    gradient are NaN, and nothing is read out of bounds. torch.compile cannot trace a
    check that depends on values: there the native CPU kernel's own raises ValueError."""
    rows = target.reshape(-1).to(torch.int64).contiguous()
    if rows.device.type == "cpu" and not torch.compiler.is_compiling():
        bad = (rows != ignore_index) & ((rows < 0) | (rows >= vocab))
        if bad.any():
            row = int(bad.nonzero()[0, 0])
            raise TargetIndexError(
                f"target[{row}] = {int(rows[row])} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
            )
    return rows


def check_float_tensor(tensor, name, dims):
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() not in dims:
        expected = " or ".join(f"{d}-D" for d in dims)
        raise ArgumentError(f"{name} must be {expected}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def cross_entropy(
    input,
    target,
    weight=None,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    *,
    z_loss=0.0,
    inplace_backward=False,
    backend=None,
):
    """Softmax cross-entropy of logits against class indices, fused in one pass.

    Args:
        input: logits (N, V) or (B, T, V), float32/float16/bfloat16 (float64 runs on the
            torch backend). The classes are the last dimension: for 3-D input this is
            F.cross_entropy(input.flatten(0, 1), target.flatten()), whereas torch's own
            3-D layout puts classes in dim 1 (lmkern.functional.cross_entropy keeps that).
        target: (N,) or (B, T) int64 (or int32, uint8) class indices in [0, V), or ignore_index.
        weight: (V,) class weights, as in torch.
        ignore_index: target value whose rows add nothing to the loss or the gradient.
        reduction: "mean" (over non-ignored rows, weighted like torch), "sum" or "none"
            (per-row losses of shape (N,) or (B, T)).
        label_smoothing: in [0, 1], as in torch.
        z_loss: coefficient of logsumexp(row)^2, added to each non-ignored row's loss and
            reduced with it.
        inplace_backward: write the gradient over the logits' memory during forward instead
            of allocating a new (N, V) tensor. The logits' values are lost, and backward
            may run only once. Saves memory only when the rows are contiguous in the last
            dimension (a copy is overwritten otherwise).
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.

    Returns the loss in the input's dtype (fp32 under torch.autocast, as torch's; the
    logits are not cast, and the kernels reduce in fp32 either way): a scalar, or per row
    for reduction="none".
    A target outside [0, V) that is not ignore_index raises TargetIndexError (a ValueError
    and an IndexError, torch's class) naming it on CPU; on CUDA, where checking would stall
    the stream, that row's loss and gradient are NaN (so the reduced loss is NaN) and
    nothing is read out of bounds. With every target ignored, "mean" gives NaN (0/0) and
    zero gradients, like torch. Backward cannot run under create_graph=True (it raises).
    """
    check_float_tensor(input, "input", (2, 3))
    check_target(target, input, "input")
    check_reduction_args(ignore_index, reduction, label_smoothing, z_loss)
    vocab = input.shape[-1]
    if vocab == 0:
        raise ArgumentError(f"input must have at least one class in its last dimension, got shape {tuple(input.shape)}")
    if weight is not None:
        check_float_tensor(weight, "weight", (1,))
        if weight.shape[0] != vocab or weight.device != input.device:
            raise ArgumentError(
                f"weight must have shape ({vocab},) on {input.device}, got {tuple(weight.shape)} on {weight.device}"
            )
        # The kernels take float32 weights; float64 input runs on the torch backend in float64.
        weight = weight.to(torch.promote_types(torch.float32, input.dtype)).contiguous()
    name = CROSS_ENTROPY.resolve(Call.of(input), backend, empty=input.numel() == 0)
    logits = input.reshape(-1, vocab)
    if logits.stride(1) != 1:
        logits = logits.contiguous()
    loss = CrossEntropyFunction.apply(
        logits,
        rows_target(target, vocab, ignore_index),
        weight,
        ignore_index,
        reduction,
        float(label_smoothing),
        float(z_loss),
        inplace_backward,
        loss_dtype(input),
        name,
    )
    return loss.view(target.shape) if reduction == "none" else loss
