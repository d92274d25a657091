"""LayerNorm with an optional residual add and dropout, in plain PyTorch: the oracle the
kernels are tested against.

The sum (residual + dropout(x)) is formed in the input's dtype, as eager code would; the
statistics and the normalisation run in fp32 (fp64 for fp64 input), as torch's own
LayerNorm does for half inputs. The tests run it in fp64 (or fp32 for half inputs) for
the truth, and in the input dtype for the baseline error.

With s the row being normalised, D its length, w and b the weight and bias:
    mean = sum(s) / D,  rstd = 1 / sqrt(sum((s - mean)^2) / D + eps),  xhat = (s - mean) rstd
    out  = xhat w + b
and, for an incoming gradient dy and g = dy w,
    ds = rstd (g - mean(g) - xhat mean(g xhat)),  dw = sum_rows(dy xhat),  db = sum_rows(dy)
With rms (RMSNorm: lmkern.rms_norm, add_rms_norm) the row is not centred and has no bias:
    rstd = 1 / sqrt(sum(s^2) / D + eps),  xhat = s rstd,  out = xhat w
    ds = rstd (g - xhat mean(g xhat)),  dw = sum_rows(dy xhat)
"""

import torch

from lmkern.ops.dropout import dropout


def stats_dtype(dtype):
    """fp32 statistics, or fp64 for fp64 input."""
    return torch.promote_types(dtype, torch.float32)


def layer_norm_fwd(x, weight, bias, eps, residual=None, dropout_p=0.0, seed=0, keep_sum=False, rms=False):
    """LayerNorm (or, if rms, RMSNorm) of s = residual + dropout(x) over each row.

    x: (N, D), last dim contiguous. residual: (N, D) in x's dtype, or None (s = dropout(x)).
    weight, bias: (D,) in fp32 (fp64 for fp64 x), or None. dropout_p in [0, 1] with the
    int seed of lmkern.philox. rms: RMSNorm (bias must be None).
    Returns out (N, D) in x's dtype, mean (None if rms) and rstd (N,) in fp32 (fp64 for
    fp64 x), and, if keep_sum, s (N, D) in x's dtype (x itself when nothing was added),
    else None.
    """
    summed = dropout(x, seed, dropout_p)
    if residual is not None:
        summed = summed + residual
    rows = summed.to(stats_dtype(x.dtype))
    mean = None if rms else rows.mean(dim=1)
    centered = rows if rms else rows - mean[:, None]
    rstd = torch.rsqrt((centered * centered).mean(dim=1) + eps)
    out = centered * rstd[:, None]
    if weight is not None:
        out = out * weight
    if bias is not None:
        out = out + bias
    return out.to(x.dtype), mean, rstd, summed if keep_sum else None


def layer_norm_bwd(grad_out, grad_sum, summed, weight, mean, rstd, dropout_p, seed, has_bias, rms=False):
    """Gradients of layer_norm_fwd.

    grad_out: (N, D) gradient of out. grad_sum: (N, D) gradient that reached s from
    elsewhere (when s was returned), or None. summed: s (N, D), the rows that were
    normalised. weight: as in forward. mean, rstd: from forward. rms: as in forward.
    Returns grad_x (gradient of x, through the dropout; grad_s itself when dropout_p = 0),
    grad_s (N, D) (the gradient of the residual), both in s's dtype, and grad_weight and
    grad_bias (D,) in the statistics' dtype (None without weight, or has_bias False).
    """
    acc = stats_dtype(summed.dtype)
    xhat = (summed.to(acc) if rms else summed.to(acc) - mean[:, None]) * rstd[:, None]
    dy = grad_out.to(acc)
    g = dy * weight if weight is not None else dy
    centered_g = g if rms else g - g.mean(dim=1, keepdim=True)
    grad_s = rstd[:, None] * (centered_g - xhat * (g * xhat).mean(dim=1, keepdim=True))
    if grad_sum is not None:
        grad_s = grad_s + grad_sum
    grad_s = grad_s.to(summed.dtype)
    grad_weight = (dy * xhat).sum(dim=0) if weight is not None else None
    grad_bias = dy.sum(dim=0) if has_bias else None
    return dropout(grad_s, seed, dropout_p), grad_s, grad_weight, grad_bias
