"""Attention in plain PyTorch: the oracle the kernels are tested against. It forms the full
(B, H, Lq, Lk) score matrix, which no kernel does.

It computes in the inputs' own dtype, as eager PyTorch code would; the tests run it in
fp64 (or fp32 for half inputs) to get the truth, and in the input dtype for the baseline
error that the kernels may not exceed by more than the tolerance rule allows.

Shapes (the contract of every backend, after lmkern.scaled_dot_product_attention has
broadcast its arguments): q (B, H, Lq, D), k (B, H_kv, Lk, D), v (B, H_kv, Lk, Dv) with
H a multiple of H_kv (query head h reads key/value head h // (H // H_kv)); mask None or
4-D, broadcastable to (B, H, Lq, Lk) (each dimension equal or 1), boolean (True takes part)
or additive float; with
is_causal, query i sees key j when j <= i + causal_shift (0: torch's top-left alignment,
Lk - Lq: bottom-right); with window_left >= 0 (a sliding window; -1: none), only when
j >= i + causal_shift - window_left too. A window's right bound reaches the backends as a
causal bound on a shifted diagonal (lmkern.scaled_dot_product_attention folds it in).
relative_bias None or (H | 1, Lq + Lk - 1) float adds relative_bias[h, j - i + Lq - 1] to
the score of query i and key j (a bias per distance, as T5's); the reference materialises
it as a (1, H | 1, Lq, Lk) mask, which the kernels never do.
"""

import torch

from lmkern import philox


def _repeat_kv(x, heads):
    """(B, H_kv, L, D) -> (B, heads, L, D): each key/value head serves heads // H_kv query heads."""
    return x if x.shape[1] == heads else x.repeat_interleave(heads // x.shape[1], dim=1)


def _sum_kv_groups(grad, kv_heads):
    """(B, H, L, D) -> (B, H_kv, L, D): the gradient of _repeat_kv."""
    batch, heads, length, dim = grad.shape
    if heads == kv_heads:
        return grad
    return grad.view(batch, kv_heads, heads // kv_heads, length, dim).sum(2)


def causal_mask(seqlen_q, seqlen_k, device, shift=0):
    """(Lq, Lk) boolean: query i sees key j when j <= i + shift (shift 0 is torch's top-left
    alignment; shift Lk - Lq aligns the last query with the last key)."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols <= rows + shift


def window_mask(seqlen_q, seqlen_k, device, shift, window_left):
    """(Lq, Lk) boolean: query i sees key j when j >= i + shift - window_left."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols >= rows + shift - window_left


def dropout_scale(dropout_p):
    """What kept elements are multiplied by: 1 / (1 - p), and 0 for p = 1 (nothing is kept)."""
    return 0.0 if dropout_p >= 1.0 else 1.0 / (1.0 - dropout_p)


def dropout_factor(seed, like, dropout_p):
    """Z, shaped and typed like the (B, H, Lq, Lk) probabilities `like`: keep / (1 - p),
    with element (b, h, i, j) at offset ((b H + h) Lq + i) Lk + j of lmkern.philox's
    stream, as in every backend."""
    offsets = torch.arange(like.numel(), device=like.device, dtype=torch.int64).view(like.shape)
    return philox.dropout_keep(seed, offsets, dropout_p).to(like.dtype) * dropout_scale(dropout_p)


def relative_distances(seqlen_q, seqlen_k, device):
    """(Lq, Lk) int64: j - i + Lq - 1, the column of relative_bias that query i and key j read."""
    rows = torch.arange(seqlen_q, device=device)[:, None]
    cols = torch.arange(seqlen_k, device=device)[None, :]
    return cols - rows + (seqlen_q - 1)


def relative_bias_mask(relative_bias, seqlen_q, seqlen_k):
    """relative_bias (H | 1, Lq + Lk - 1) materialised as the (1, H | 1, Lq, Lk) additive mask it stands for."""
    return relative_bias[:, relative_distances(seqlen_q, seqlen_k, relative_bias.device)][None]


def _scores(q, k, mask, is_causal, causal_shift, scale, window_left, relative_bias=None):
    """(B, H, Lq, Lk) scaled scores with masked entries at -inf."""
    scores = scale * (q @ _repeat_kv(k, q.shape[1]).transpose(-1, -2))
    if is_causal:
        scores = scores.masked_fill(~causal_mask(q.shape[2], k.shape[2], q.device, causal_shift), float("-inf"))
    if window_left >= 0:
        hidden = ~window_mask(q.shape[2], k.shape[2], q.device, causal_shift, window_left)
        scores = scores.masked_fill(hidden, float("-inf"))
    if mask is not None:
        is_bool = mask.dtype == torch.bool
        scores = scores.masked_fill(~mask, float("-inf")) if is_bool else scores + mask.to(scores.dtype)
    if relative_bias is not None:
        scores = scores + relative_bias_mask(relative_bias, q.shape[2], k.shape[2]).to(scores.dtype)
    return scores


def _probabilities(q, k, mask, is_causal, causal_shift, scale, window_left, relative_bias=None):
    """Softmax of the scores, with rows that see no key all zero (softmax would give NaN)."""
    scores = _scores(q, k, mask, is_causal, causal_shift, scale, window_left, relative_bias)
    sees_no_key = (scores == float("-inf")).all(dim=-1, keepdim=True)
    return scores, torch.softmax(scores, dim=-1).masked_fill(sees_no_key, 0.0), sees_no_key


def attention_fwd(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1, relative_bias=None):
    """softmax(scale q k^T + mask) v, with dropout on the probabilities.

    Returns out (B, H, Lq, Dv) in q's dtype (zeros for rows that see no key) and the
    logsumexp of each row's scores, lse (B, H, Lq) in fp32 (fp64 for fp64 inputs), +inf
    for rows that see no key (so that exp(score - lse) is 0 there in backward).
    """
    args = (is_causal, causal_shift, scale, window_left, relative_bias)
    scores, probs, sees_no_key = _probabilities(q, k, mask, *args)
    lse = torch.logsumexp(scores.to(torch.promote_types(scores.dtype, torch.float32)), dim=-1)
    lse = lse.masked_fill(sees_no_key.squeeze(-1), float("inf"))
    if dropout_p > 0:
        probs = probs * dropout_factor(seed, probs, dropout_p)
    return probs @ _repeat_kv(v, q.shape[1]), lse


def attention_bwd_with_bias_grads(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None, mask_grad=True, relative_bias_grad=True,
):
    """Gradients of attention_fwd's output: (dq, dk, dv, dmask, d relative_bias), dmask
    shaped like an additive mask and in its dtype (None for a boolean one or none, or
    without mask_grad), d relative_bias likewise (None without one or without
    relative_bias_grad): dS summed along the diagonals j - i. With P the
    probabilities, Z the dropout factor (keep / (1 - p), 1 without dropout) and
    delta_i = sum_d dO_id O_id:

        dV = (P Z)^T dO,   dP = (dO V^T) Z,   dS = P (dP - delta),
        dQ = scale dS K,   dK = scale dS^T Q,   dmask = dS summed over the dimensions
                                                        where the mask has size 1,
        d relative_bias[h, t] = dS summed over the batch (and the heads where it has
                                one) and over the (i, j) with j - i + Lq - 1 = t.
    """
    heads, kv_heads = q.shape[1], k.shape[1]
    _, probs, _ = _probabilities(q, k, mask, is_causal, causal_shift, scale, window_left, relative_bias)
    factor = dropout_factor(seed, probs, dropout_p) if dropout_p > 0 else 1.0
    grad_out = grad_out.to(q.dtype)
    grad_v = _sum_kv_groups((probs * factor).transpose(-1, -2) @ grad_out, kv_heads)
    grad_probs = (grad_out @ _repeat_kv(v, heads).transpose(-1, -2)) * factor
    delta = (grad_out * out).sum(dim=-1, keepdim=True)
    grad_scores = probs * (grad_probs - delta)
    grad_q = scale * (grad_scores @ _repeat_kv(k, heads))
    grad_k = _sum_kv_groups(scale * (grad_scores.transpose(-1, -2) @ q), kv_heads)
    additive = mask_grad and mask is not None and mask.dtype != torch.bool
    grad_mask = grad_scores.sum_to_size(mask.shape).to(mask.dtype) if additive else None
    grad_relative_bias = None
    if relative_bias_grad and relative_bias is not None:
        per_head = grad_scores.sum_to_size(1, relative_bias.shape[0], *grad_scores.shape[2:])[0]  # (H | 1, Lq, Lk)
        distances = relative_distances(q.shape[2], k.shape[2], q.device).flatten()
        grad_relative_bias = torch.zeros(relative_bias.shape, dtype=per_head.dtype, device=q.device)
        grad_relative_bias = grad_relative_bias.index_add(1, distances, per_head.flatten(1)).to(relative_bias.dtype)
    return grad_q, grad_k, grad_v, grad_mask, grad_relative_bias


def attention_bwd(
    grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed, window_left=-1,
    relative_bias=None,
):
    """(dq, dk, dv): the gradients of attention_fwd's output, in the inputs' dtypes."""
    args = (is_causal, causal_shift, scale, dropout_p, seed, window_left, relative_bias)
    return attention_bwd_with_bias_grads(grad_out, q, k, v, out, lse, mask, *args)[:3]
