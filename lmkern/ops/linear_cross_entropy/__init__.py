"""Linear + cross-entropy without logits: lmkern.linear_cross_entropy.

The LM head's matmul and the cross-entropy run chunk by chunk over the tokens. For each
chunk: logits = hidden @ weight.T + bias, the fused cross-entropy kernel writes the
gradient over those logits, and the chunk's part of d(hidden), d(weight) and d(bias) is
taken from it at once. Only one chunk's logits ever exist; d(weight) and d(bias)
accumulate in fp32. For "mean" and "sum" all of this happens in forward and backward
only scales the gradients; for "none" the per-row scale is known only in backward, so
backward runs the chunks again.
"""

import math

import torch

from lmkern.backend import Call
from lmkern.errors import ArgumentError
from lmkern.ops import cross_entropy as ce
from lmkern.ops.linear_cross_entropy.backends import LINEAR_CROSS_ENTROPY
from lmkern.ops.autocast import autocast_dtype, cast_for_autocast, without_autocast
from lmkern.ops.double_backward import refuse_create_graph


def default_chunk_size(n_rows, hidden_size, vocab):
    """Rows per chunk: one chunk's logits about as large as the hidden states, and at
    least 256 rows so that the matmuls stay efficient."""
    return max(1, min(n_rows, max(256, math.ceil(n_rows * hidden_size / vocab))))


def add_matmul_wide(acc, a, b):
    """acc += a @ b, accumulated and stored in acc's dtype (fp32, or fp64 for fp64 a and b)."""
    if a.dtype == acc.dtype:
        acc.addmm_(a, b)
    elif a.is_cuda:
        acc.add_(torch.mm(a, b, out_dtype=torch.float32))  # cuBLAS writes its fp32 accumulator
    else:
        acc.addmm_(a.float(), b.float())


def chunked_loss_and_grads(fwd, hidden, weight, bias, target, options, chunk_size, needs_grad, row_scale=None):
    """Per-row loss and the gradients of sum_i row_scale_i * loss_i (row_scale 1 if None).

    hidden (N, H), weight (V, H), bias (V,) or None, target (N,) int64, row_scale (N,).
    needs_grad: for (hidden, weight, bias), whether to compute that gradient.
    Returns loss (N,) and (grad_hidden in hidden's dtype or None, grad_weight or None,
    grad_bias or None), the loss and those two sums in fp32 (fp64 for fp64 inputs).
    """
    n_rows = hidden.shape[0]
    wide = torch.promote_types(hidden.dtype, torch.float32)
    row_loss = torch.empty(n_rows, dtype=wide, device=hidden.device)
    grad_hidden = torch.empty_like(hidden) if needs_grad[0] else None
    grad_weight = torch.zeros_like(weight, dtype=wide) if needs_grad[1] else None
    grad_bias = torch.zeros_like(bias, dtype=wide) if bias is not None and needs_grad[2] else None
    grads = (grad_hidden, grad_weight, grad_bias)
    for start in range(0, n_rows, chunk_size):
        rows = slice(start, min(start + chunk_size, n_rows))
        row_loss[rows] = _chunk(fwd, hidden[rows], weight, bias, target[rows], options, grads, row_scale, rows)
    return row_loss, grads


def _chunk(fwd, hidden, weight, bias, target, options, grads, row_scale, rows):
    """One chunk of chunked_loss_and_grads: returns its rows' loss and adds to `grads`.

    A function of its own so that the chunk's logits are freed before the next chunk's
    are made.
    """
    grad_hidden, grad_weight, grad_bias = grads
    logits = hidden @ weight.T if bias is None else torch.addmm(bias, hidden, weight.T)  # (C, V)
    loss, grad_logits = fwd(logits, target, None, *options, inplace_backward=True)
    if row_scale is not None:
        grad_logits.mul_(row_scale[rows, None])
    if grad_hidden is not None:
        torch.mm(grad_logits, weight, out=grad_hidden[rows])
    if grad_weight is not None:
        add_matmul_wide(grad_weight, grad_logits.T, hidden)
    if grad_bias is not None:
        grad_bias += grad_logits.sum(0, dtype=grad_bias.dtype)
    return loss


class LinearCrossEntropyFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(
        ctx, hidden, weight, bias, target, ignore_index, reduction, label_smoothing, z_loss, chunk_size, loss_dtype,
        backend,
    ):
        fwd = LINEAR_CROSS_ENTROPY.implementation(backend).cross_entropy_fwd
        options = (ignore_index, label_smoothing, z_loss)
        grads_now = reduction != "none"
        needs_grad = ctx.needs_input_grad[:3] if grads_now else (False, False, False)
        weight_in, bias_in = _in_dtype(hidden, weight, bias)
        row_loss, grads = chunked_loss_and_grads(fwd, hidden, weight_in, bias_in, target, options, chunk_size, needs_grad)
        del weight_in, bias_in
        loss, denominator = ce.reduce_rows(row_loss, target, None, ignore_index, reduction)
        if grads_now:
            ctx.save_for_backward(*grads, denominator)
        else:
            ctx.save_for_backward(hidden, weight, bias, target)
            ctx.fwd, ctx.options, ctx.chunk_size = fwd, options, chunk_size
        ctx.reduction = reduction
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return loss.to(loss_dtype)

    @staticmethod
    @without_autocast
    def backward(ctx, grad_loss):
        refuse_create_graph("linear_cross_entropy")
        if ctx.reduction == "none":
            hidden, weight, bias, target = ctx.saved_tensors
            needs_grad = ctx.needs_input_grad[:3]
            _, grads = chunked_loss_and_grads(
                ctx.fwd, hidden, *_in_dtype(hidden, weight, bias), target, ctx.options, ctx.chunk_size, needs_grad,
                row_scale=grad_loss,
            )
            scale = None
        else:
            *grads, denominator = ctx.saved_tensors
            scale = ce.grad_scale(grad_loss, denominator, ctx.reduction)
        return (*map(ce.scaled, grads, (scale,) * 3, ctx.dtypes), None, None, None, None, None, None, None, None)


def _in_dtype(hidden, weight, bias):
    """weight and bias in hidden's dtype, in which the matmuls run (copies only where they
    differ: fp32 parameters under autocast)."""
    return weight.to(hidden.dtype), None if bias is None else bias.to(hidden.dtype)


def linear_cross_entropy(
    hidden,
    weight,
    target,
    bias=None,
    *,
    ignore_index=-100,
    reduction="mean",
    label_smoothing=0.0,
    z_loss=0.0,
    chunk_size=None,
    backend=None,
):
    """Cross-entropy of the logits hidden @ weight.T + bias, without ever holding all of them.

    Same value and gradients as
    F.cross_entropy(hidden @ weight.T + bias, target, ignore_index=..., reduction=...,
    label_smoothing=...) (with classes in the last dimension, plus z_loss as in
    lmkern.cross_entropy), computed chunk_size tokens at a time: peak extra memory is one
    chunk's logits (chunk_size, V) plus the gradients being built.

    Args:
        hidden: (N, H) or (B, T, H) float32/float16/bfloat16; under torch.autocast cast to
            the autocast dtype first, as F.linear casts it.
        weight: (V, H), the LM head (often the tied embedding), hidden's dtype; under
            autocast any float dtype (the matmuls run in hidden's, and the gradients of
            weight and bias, accumulated in fp32, come back in their own dtypes).
        target: (N,) or (B, T) int64 (or int32) class indices, or ignore_index.
        bias: (V,) or None.
        chunk_size: tokens per chunk; None picks about N * H / V (at least 256), so that a
            chunk's logits are about as large as hidden.
        ignore_index, reduction, label_smoothing, z_loss, backend: as in lmkern.cross_entropy;
            backend picks the cross-entropy kernel (the matmuls are torch's).

    Returns the loss in hidden's dtype (fp32 under autocast): a scalar, or per token for
    reduction="none". Bad targets and create_graph=True are refused as in
    lmkern.cross_entropy.
    """
    hidden = cast_for_autocast(hidden)[0]
    ce.check_float_tensor(hidden, "hidden", (2, 3))
    ce.check_float_tensor(weight, "weight", (2,))
    ce.check_target(target, hidden, "hidden")
    ce.check_reduction_args(ignore_index, reduction, label_smoothing, z_loss)
    hidden_size = hidden.shape[-1]
    if weight.shape[1] != hidden_size or weight.shape[0] == 0:
        raise ArgumentError(
            f"weight must have shape (V, {hidden_size}) with V >= 1 to match hidden {tuple(hidden.shape)}, "
            f"got {tuple(weight.shape)}"
        )
    any_dtype = autocast_dtype(hidden.device.type) is not None
    for name, tensor in (("weight", weight), ("bias", bias)):
        if tensor is not None and (tensor.device != hidden.device or not (any_dtype or tensor.dtype == hidden.dtype)):
            raise ArgumentError(
                f"{name} must have hidden's dtype and device ({hidden.dtype}, {hidden.device}), "
                f"got {tensor.dtype} on {tensor.device}"
            )
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ArgumentError(f"bias must have shape ({weight.shape[0]},), got {tuple(bias.shape)}")
    if chunk_size is not None and (not isinstance(chunk_size, int) or chunk_size < 1):
        raise ArgumentError(f"chunk_size must be a positive int or None, got {chunk_size!r}")
    rows = hidden.reshape(-1, hidden_size)
    n_rows = rows.shape[0]
    name = LINEAR_CROSS_ENTROPY.resolve(Call.of(hidden), backend, empty=n_rows == 0)
    if chunk_size is None:
        chunk_size = default_chunk_size(n_rows, hidden_size, weight.shape[0])
    rows_target = ce.rows_target(target, weight.shape[0], ignore_index)
    loss = LinearCrossEntropyFunction.apply(
        rows, weight, bias, rows_target, ignore_index, reduction, float(label_smoothing), float(z_loss), chunk_size,
        ce.loss_dtype(hidden), name,
    )
    return loss.view(target.shape) if reduction == "none" else loss
