"""Softmax cross-entropy in Triton: one program per row computes its loss and gradient.

For a row x with target t, smoothing e, class weights w (all 1 without weights),
W = sum_c w_c, lse = logsumexp(x) and z-loss coefficient z:

    loss       = (1 - e) w_t (lse - x_t) + e/V (W lse - sum_c w_c x_c) + z lse^2
    dloss/dx_c = softmax(x)_c ((1 - e) w_t + e W/V + 2 z lse) - e/V w_c - [c == t] (1 - e) w_t

Pass 1 runs an online softmax over BLOCK_V-wide chunks of the row (a running max and a
rescaled sum of exponentials) and the smoothing sums; pass 2 re-reads the row and writes
the gradient, so backward is only a scale of it. Ignored rows get loss 0 and a zero
gradient; a target outside [0, V) gets NaN loss and a NaN gradient row, and nothing is
read out of bounds (on CPU tensors, under the interpreter, it raises ValueError first).
"""

import torch
import triton
import triton.language as tl


# Start of the running max: -FLT_MAX rather than -inf, so that rescaling after a chunk of
# only -inf logits is exp(0) = 1 instead of exp(-inf + inf) = NaN. A tl.constexpr, since
# compiled kernels may read no other global (the interpreter reads any).
FLT_MAX = tl.constexpr(3.4028234663852886e38)
MAX_BLOCK_V = 8192


@triton.jit
def cross_entropy_fwd_kernel(
    logits_ptr,  # (N, V) rows logits_row_stride apart, last dim contiguous
    logits_row_stride,
    grad_ptr,  # (N, V) out, rows grad_row_stride apart; may alias logits_ptr
    grad_row_stride,
    target_ptr,  # (N,) int64
    weight_ptr,  # (V,) float32 class weights, read only if HAS_WEIGHT
    loss_ptr,  # (N,) float32 out
    vocab,
    ignore_index,
    label_smoothing,
    z_loss,
    HAS_WEIGHT: tl.constexpr,
    HAS_SMOOTHING: tl.constexpr,
    BLOCK_V: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    logits_ptr += row * logits_row_stride
    grad_ptr += row * grad_row_stride
    target = tl.load(target_ptr + row)
    cols = tl.arange(0, BLOCK_V)

    if (target == ignore_index) | (target < 0) | (target >= vocab):
        fill = tl.where(target == ignore_index, 0.0, float("nan"))
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            tl.store(grad_ptr + offs, tl.zeros([BLOCK_V], tl.float32) + fill, mask=offs < vocab)
        tl.store(loss_ptr + row, fill)
    else:
        # Read before pass 2, which may overwrite it in place.
        x_target = tl.load(logits_ptr + target).to(tl.float32)
        row_max = tl.full([], -FLT_MAX, tl.float32)
        sum_exp = tl.zeros([], tl.float32)
        sum_wx = tl.zeros([], tl.float32)  # sum_c w_c x_c, for smoothing
        sum_w = tl.zeros([], tl.float32) + vocab  # sum_c w_c; all ones without weights
        if HAS_WEIGHT:
            sum_w = tl.zeros([], tl.float32)
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            mask = offs < vocab
            x = tl.load(logits_ptr + offs, mask=mask, other=float("-inf")).to(tl.float32)
            new_max = tl.maximum(row_max, tl.max(x, axis=0))
            sum_exp = sum_exp * tl.exp(row_max - new_max) + tl.sum(tl.exp(x - new_max), axis=0)
            row_max = new_max
            if HAS_SMOOTHING:
                w = tl.where(mask, 1.0, 0.0)
                if HAS_WEIGHT:
                    w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
                    sum_w += tl.sum(w, axis=0)
                sum_wx += tl.sum(w * tl.where(mask, x, 0.0), axis=0)

        # lse - x_t as (max - x_t) + log(sum_exp), and softmax as exp(x - max) / sum_exp:
        # lse itself is rounded at its own (possibly large) magnitude.
        log_sum_exp = tl.log(sum_exp)
        lse = row_max + log_sum_exp
        w_target = 1.0
        if HAS_WEIGHT:
            w_target = tl.load(weight_ptr + target)
        loss = (1.0 - label_smoothing) * w_target * ((row_max - x_target) + log_sum_exp) + z_loss * lse * lse
        if HAS_SMOOTHING:
            loss += label_smoothing / vocab * (sum_w * lse - sum_wx)
        tl.store(loss_ptr + row, loss)

        p_scale = ((1.0 - label_smoothing) * w_target + label_smoothing * sum_w / vocab + 2.0 * z_loss * lse) / sum_exp
        smooth_per_weight = label_smoothing / vocab
        target_term = (1.0 - label_smoothing) * w_target
        for start in range(0, vocab, BLOCK_V):
            offs = start + cols
            mask = offs < vocab
            x = tl.load(logits_ptr + offs, mask=mask, other=0.0).to(tl.float32)
            w = tl.zeros([BLOCK_V], tl.float32) + 1.0
            if HAS_WEIGHT:
                w = tl.load(weight_ptr + offs, mask=mask, other=0.0)
            g = tl.exp(x - row_max) * p_scale - smooth_per_weight * w
            g = tl.where(offs == target, g - target_term, g)
            tl.store(grad_ptr + offs, g, mask=mask)


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, inplace_backward):
    """Same contract as reference.cross_entropy_fwd; `weight` must be float32 here."""
    n_rows, vocab = logits.shape
    grad = logits if inplace_backward else torch.empty_like(logits, memory_format=torch.contiguous_format)
    loss = torch.empty(n_rows, dtype=torch.float32, device=logits.device)
    if n_rows == 0:
        return loss, grad
    block_v = min(triton.next_power_of_2(vocab), MAX_BLOCK_V)
    num_warps = 16 if block_v >= 8192 else 8 if block_v >= 2048 else 4
    cross_entropy_fwd_kernel[(n_rows,)](
        logits,
        logits.stride(0),
        grad,
        grad.stride(0),
        target,
        weight,
        loss,
        vocab,
        ignore_index,
        label_smoothing,
        z_loss,
        HAS_WEIGHT=weight is not None,
        HAS_SMOOTHING=label_smoothing > 0,
        BLOCK_V=block_v,
        num_warps=num_warps,
    )
    return loss, grad
