"""Attention over a KV cache in plain PyTorch: the oracle the decoding kernels are tested
against, on the attention reference (lmkern/ops/attention/reference.py)."""

import torch

from lmkern.errors import ArgumentError
from lmkern.ops.apply_rotary.reference import rotate
from lmkern.ops.attention.reference import attention_fwd


def check_cache_lengths_on_cpu(cache_seqlens, new_len, capacity, rotary_positions=None):
    """Raises ValueError for a CPU sequence whose length is negative or whose new keys would
    not fit in the cache, or, with rotary caches of rotary_positions rows, whose last
    position (cache_seqlens[b] + new_len - 1) lies past them. Only on CPU, where the check
    costs no device synchronisation; kernels on CUDA give a sequence that does not fit NaN
    output and write nothing for it, and NaN for a position past the rotary caches."""
    if cache_seqlens.device.type != "cpu":
        return
    lengths = cache_seqlens.to(torch.int64)
    totals = lengths + new_len
    checks = [((lengths < 0) | (totals > capacity), f"must fit in the cache's {capacity} positions, and its length "
               "must be >= 0")]
    if rotary_positions is not None:
        checks.append((totals > rotary_positions, "reaches position {last}, past the "
                       f"{rotary_positions} positions rotary_cos and rotary_sin hold"))
    for bad, problem in checks:
        if bad.any():
            b = int(bad.nonzero()[0, 0])
            problem = problem.format(last=int(totals[b]) - 1)
            raise ArgumentError(f"cache_seqlens[{b}] = {int(lengths[b])}: with {new_len} new keys the sequence {problem}")


def token_positions(lengths, new_len, seqlen_q):
    """The positions of the new keys, lengths[:, None] + j (B, L_new), and of the queries,
    total - Lq + i (B, Lq) with total = lengths + L_new (bottom-right alignment; negative
    for a query before the cache). lengths: (B,) int64."""
    key_positions = lengths[:, None] + torch.arange(new_len, device=lengths.device)
    query_positions = (lengths + new_len)[:, None] - seqlen_q + torch.arange(seqlen_q, device=lengths.device)
    return key_positions, query_positions


def _write_at_lengths(cache, new, lengths, fits):
    """cache[b, :, lengths[b] + n] = new[b, :, n] for the sequences that fit. The others
    write back their cache's own values (at clamped positions), so that nothing waits on
    the host and CUDA graphs can capture the step."""
    batch = torch.arange(cache.shape[0], device=cache.device)[:, None]  # (B, 1)
    positions = lengths[:, None] + torch.arange(new.shape[2], device=cache.device)  # (B, L_new)
    positions = positions.clamp(0, cache.shape[2] - 1)
    current = cache[batch, :, positions]  # indexed as (B, L_new, H_kv, D)
    cache[batch, :, positions] = torch.where(fits[:, None, None, None], new.transpose(1, 2), current)


def attention_with_kv_cache_fwd(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
    window_left=-1,
):
    """Writes k_new, v_new into the caches at each sequence's length, then attends.

    q (B, H, Lq, D); k_cache (B, H_kv, L_max, D) and v_cache (B, H_kv, L_max, Dv), written
    in place; cache_seqlens (B,) int32/int64, each sequence's cached length before the new
    keys; k_new (B, H_kv, L_new, D) and v_new (B, H_kv, L_new, Dv), or both None. With
    total_b = cache_seqlens[b] + L_new, query i sits at position total_b - Lq + i and sees
    the keys up to it (bottom-right causal alignment), and with window_left >= 0 (a sliding
    window; -1: none) only those from position total_b - Lq + i - window_left on. With
    rotary_cos and rotary_sin (P, R / 2), k_new is rotated at its positions before it is
    written and q at its positions (lmkern.apply_rotary's reference, rotate), q itself
    unchanged. Returns out (B, H, Lq, Dv) in q's dtype. A sequence whose new keys would not
    fit, or with a negative length, or past the rotary caches, raises ValueError on CPU; on
    CUDA it gets NaN output and nothing is written for it (NaN rotated values past the
    rotary caches).
    """
    capacity = k_cache.shape[2]
    new_len = 0 if k_new is None else k_new.shape[2]
    rotary = rotary_cos is not None
    check_cache_lengths_on_cpu(cache_seqlens, new_len, capacity, rotary_cos.shape[0] if rotary else None)
    lengths = cache_seqlens.to(torch.int64)
    key_positions, query_positions = token_positions(lengths, new_len, q.shape[2])
    if rotary:
        # A query before the cache sees no key: any position in range serves it.
        q = rotate(q, rotary_cos, rotary_sin, query_positions.clamp(min=0), rotary_interleaved, False)
        if new_len > 0:
            k_new = rotate(k_new, rotary_cos, rotary_sin, key_positions, rotary_interleaved, False)
    fits = (lengths >= 0) & (lengths + new_len <= capacity)
    if new_len > 0:
        _write_at_lengths(k_cache, k_new, lengths, fits)
        _write_at_lengths(v_cache, v_new, lengths, fits)
    positions = torch.arange(capacity, device=q.device)
    visible = positions <= query_positions[:, :, None]  # (B, Lq, L_max)
    if window_left >= 0:
        visible &= positions >= query_positions[:, :, None] - window_left
    mask = visible[:, None].expand(-1, q.shape[1], -1, -1)
    out, _ = attention_fwd(q, k_cache, v_cache, mask, False, 0, scale, 0.0, None)
    return out.masked_fill(~fits[:, None, None, None], float("nan"))
