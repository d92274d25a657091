"""Softmax cross-entropy in plain PyTorch: the oracle the kernels are tested against.

It computes in the logits' own dtype, as eager PyTorch code would; the tests run it in
fp64 (or fp32 for half inputs) to get the truth, and in the input dtype for the baseline
error that the kernels may not exceed by more than the tolerance rule allows.
"""

import torch


def check_targets_on_cpu(target, vocab, ignore_index):
    """Raises ValueError for a CPU target outside [0, vocab) that is not ignore_index.

    Only on CPU, where the check costs no device synchronisation; kernels on CUDA mark
    such rows with NaN instead.
    """
    if target.device.type != "cpu":
        return
    bad = (target != ignore_index) & ((target < 0) | (target >= vocab))
    if bad.any():
        row = int(bad.nonzero()[0, 0])
        raise ValueError(
            f"target[{row}] = {int(target[row])} is outside [0, {vocab}) and is not ignore_index ({ignore_index})"
        )


def cross_entropy_fwd(logits, target, weight, ignore_index, label_smoothing, z_loss, inplace_backward):
    """Per-row loss and its gradient with respect to the logits.

    logits: (N, V) float. target: (N,) int64. weight: (V,) float32 class weights or None.
    Returns loss (N,) in float32 (float64 for float64 logits) and grad (N, V) in the logits' dtype, the gradient of each
    row's loss (written over `logits` if inplace_backward). With smoothing e, weights w
    (all 1 when None) and lse = logsumexp(x):
        loss = (1 - e) w_t (lse - x_t) + e/V sum_c w_c (lse - x_c) + z_loss lse^2
    Ignored rows get loss 0 and a zero gradient. A target outside [0, V) raises ValueError
    on CPU and gets NaN loss and gradient elsewhere.
    """
    vocab = logits.shape[1]
    check_targets_on_cpu(target, vocab, ignore_index)
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
