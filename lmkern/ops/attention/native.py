"""Attention through the compiled extension: torch.ops.lmkern.attention_fwd, attention_bwd,
attention_mask_bwd (an additive mask's gradient) and attention_relative_bias_bwd
(relative_bias's gradient), the last two CPU only.

The schemas live in csrc/lmkern.cpp, the ops in csrc/cpu/attention.cpp (on the kernel of
csrc/cpu/attention_kernel.h) and csrc/cuda/attention.cpp; here are the fake
implementations that let torch.compile trace the ops, and the wrappers with the backend
contract (the kernels read rows contiguous in the last dimension, and attention_fwd and
attention_bwd a mask broadcast to (B, H, Lq, Lk)).
"""

import torch

from lmkern import extension

extension.require()  # loads lmkern._C, which defines the ops, before their fakes are registered


@torch.library.register_fake("lmkern::attention_fwd")
def _(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1, relative_bias=None):
    batch, heads, seqlen_q, _ = q.shape
    out = q.new_empty(batch, heads, seqlen_q, v.shape[3])
    return out, q.new_empty(batch, heads, seqlen_q, dtype=torch.float32)


@torch.library.register_fake("lmkern::attention_bwd")
def _(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None,
):
    return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)


@torch.library.register_fake("lmkern::attention_mask_bwd")
def _(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None,
):
    return mask.new_empty(mask.shape)


@torch.library.register_fake("lmkern::attention_relative_bias_bwd")
def _(
    grad_out, q, k, v, out, lse, mask, relative_bias, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1
):
    return relative_bias.new_empty(relative_bias.shape)


def rows_contiguous(x):
    """x, or a copy contiguous in its last dimension, which the kernels read rows of."""
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def broadcast_mask(mask, q, k):
    """A 4-D mask (or None) as the (B, H, Lq, Lk) view that attention_fwd and attention_bwd read."""
    return None if mask is None else mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])


def attention_fwd(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1, relative_bias=None):
    """Same contract as reference.attention_fwd."""
    q, k, v = map(rows_contiguous, (q, k, v))
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias)
    return torch.ops.lmkern.attention_fwd(q, k, v, broadcast_mask(mask, q, k), *args)


def attention_bwd(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None,
):
    """Same contract as reference.attention_bwd."""
    grad_out, q, k, v, out = map(rows_contiguous, (grad_out, q, k, v, out))
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias)
    return torch.ops.lmkern.attention_bwd(grad_out, q, k, v, out, lse, broadcast_mask(mask, q, k), *args)


def attention_bwd_with_bias_grads(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias,
    mask_grad, relative_bias_grad,
):
    """Same contract as reference.attention_bwd_with_bias_grads: an additive mask's gradient
    comes from attention_mask_bwd and relative_bias's from attention_relative_bias_bwd,
    passes of their own after attention_bwd (csrc/cpu/attention_kernel_body.h says why and
    how they sum)."""
    grad_out, q, k, v, out = map(rows_contiguous, (grad_out, q, k, v, out))
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left)
    full_mask = broadcast_mask(mask, q, k)
    grads = torch.ops.lmkern.attention_bwd(grad_out, q, k, v, out, lse, full_mask, *args, relative_bias)
    saved = (grad_out, q, k, v, out, lse)
    grad_mask = torch.ops.lmkern.attention_mask_bwd(*saved, mask, *args, relative_bias) if mask_grad else None
    grad_relative_bias = (
        torch.ops.lmkern.attention_relative_bias_bwd(*saved, full_mask, relative_bias, *args)
        if relative_bias_grad else None
    )
    return *grads, grad_mask, grad_relative_bias
