"""Softmax cross-entropy in plain PyTorch: the oracle the kernels are tested against.

It computes in the logits' own dtype, as eager PyTorch code would; the tests run it in
fp64 (or fp32 for half inputs) to get the truth, and in the input dtype for the baseline
error that the kernels may not exceed by more than the tolerance rule allows.
"""

import torch


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, inplace_backward):
    """Per-row loss and its gradient with respect to the logits.

    logits: (N, V) float. target: (N,) int64. weight: (V,) float32 class weights or None.
    Returns loss (N,) in float32 (float64 for float64 logits) and grad (N, V) in the logits' dtype, the gradient of each
    row's loss (written over `logits` if inplace_backward). With smoothing e, weights w
    (all 1 when None) and lse = logsumexp(x):
        loss = (1 - e) w_t (lse - x_t) + e/V sum_c w_c (lse - x_c) + z_loss lse^2
    Ignored rows get loss 0 and a zero gradient; a target outside [0, V) gets NaN loss and
    gradient (lmkern.cross_entropy refuses such CPU targets before any backend runs).
    """
    vocab = logits.shape[1]
    e = label_smoothing
    ignored = target == ignore_index
    in_range = (target >= 0) & (target < vocab)
    safe_target = torch.where(in_range, target, 0)  # no out-of-bounds gather for bad targets
    w = logits.new_ones(vocab) if weight is None else weight.to(logits.dtype)

    lse = torch.logsumexp(logits, dim=1)  # (N,)
    w_target = w[safe_target]  # (N,)
    x_target = logits.gather(1, safe_target[:, None]).squeeze(1)  # (N,)
    loss = (1 - e) * w_target * (lse - x_target) + z_loss * lse * lse
    if e > 0:
        # Means over V, not sums, so that half precision does not overflow for large V.
        loss = loss + e * (w * (lse[:, None] - logits)).mean(dim=1)

    p_scale = (1 - e) * w_target + e * w.mean() + 2 * z_loss * lse  # (N,)
    grad = torch.softmax(logits, dim=1) * p_scale[:, None] - e / vocab * w  # (N, V)
    grad.scatter_add_(1, safe_target[:, None], -((1 - e) * w_target)[:, None])

    nan = torch.tensor(float("nan"), dtype=logits.dtype, device=logits.device)
    loss = torch.where(ignored, 0, torch.where(in_range, loss, nan))
    grad = torch.where(ignored[:, None], 0, torch.where(in_range[:, None], grad, nan))
    if inplace_backward:
        grad = logits.copy_(grad)
    return loss.to(torch.promote_types(loss.dtype, torch.float32)), grad
