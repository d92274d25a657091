"""Decoding one token over a KV cache (GQA: 32 query heads, 8 key/value heads): lmkern's
attention_with_kv_cache against torch's SDPA over the same cache (the new key and value
written at each sequence's position, then attention under a mask of each sequence's
length), and flash-attn's flash_attn_with_kvcache.

Memory-bound, in GB/s over reading each sequence's keys and values once: the cases fill
every cache to its last position, so B H_kv L_max (D + Dv) elements; the query, the new
key and value and the output are negligible; with a sliding window of W keys, only
B H_kv min(L_max, W) (D + Dv), the keys it lets the token see: the window cases keep W fixed
over several cache lengths, so that a kernel which reads only the window shows a constant
time (a GB/s that grows with the cache is reading outside it). Timed as CUDA graphs on a
GPU: a step is a few kernels of microseconds, which launch overhead would otherwise swamp.
Forward only: decoding has no backward.

Rotary cases (Llama's half-split rotary embeddings over the whole head) time the step with
rotary_cos and rotary_sin fused into it against its unfused form on the same backend
(lmkern.apply_rotary of q and of the new key, then the step without rotary), SDPA after
the reference rotation, and flash-attn's own fused rotary.
"""

import dataclasses

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, lmkern_providers, optional_provider

OP = "attention_with_kv_cache"
METRIC = "GB/s"
PASSES = ("fwd",)
CUDA_GRAPH = True


def window_cases(heads, kv_heads, head_dim, caches, window):
    """A sliding window of `window` keys (window_size (window - 1, 0)) over caches of
    several lengths, one sequence: the time should stay constant."""
    return [
        dict(batch=1, heads=heads, kv_heads=kv_heads, cache=cache, head_dim=head_dim, rotary=False, window=window)
        for cache in caches
    ]


def cases(device, quick):
    if quick:
        plain = [dict(batch=2, heads=8, kv_heads=2, cache=256, head_dim=64, rotary=rotary) for rotary in (False, True)]
        return plain + window_cases(8, 2, 64, (256, 512), 64)
    if device == "cuda":
        plain = [(batch, cache, False) for batch in (1, 8, 64) for cache in (4096, 16384, 32768)]
        return [
            dict(batch=batch, heads=32, kv_heads=8, cache=cache, head_dim=128, rotary=rotary)
            for batch, cache, rotary in plain + [(1, 16384, True), (64, 16384, True)]
        ] + window_cases(32, 8, 128, (4096, 16384, 65536), 4096)
    plain = [(batch, cache, False) for batch in (1, 8) for cache in (1024, 4096)]
    return [
        dict(batch=batch, heads=8, kv_heads=2, cache=cache, head_dim=64, rotary=rotary)
        for batch, cache, rotary in plain + [(8, 4096, True)]
    ] + window_cases(8, 2, 64, (1024, 4096, 16384), 512)


def label(case):
    window = f" window {case['window']}" if "window" in case else ""
    return f"b{case['batch']} cache {case['cache']}" + (" rotary" if case["rotary"] else "") + window


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    """Caches with every sequence at length cache - 1, so that the new token fills it."""
    batch, kv_heads, head_dim = case["batch"], case["kv_heads"], case["head_dim"]
    q = torch.randn(batch, case["heads"], 1, head_dim, device=device, dtype=dtype)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, case["cache"], head_dim, device=device, dtype=dtype)
    k_new, v_new = torch.randn(2, batch, kv_heads, 1, head_dim, device=device, dtype=dtype)
    seqlens = torch.full((batch,), case["cache"] - 1, dtype=torch.int32, device=device)
    cos, sin = lmkern.rotary_cache(head_dim, case["cache"], device=device) if case["rotary"] else (None, None)
    window_size = (case["window"] - 1, 0) if "window" in case else (-1, -1)
    return q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, window_size


def work(case, dtype, pass_name):
    keys = min(case["cache"], case.get("window", case["cache"]))
    return case["batch"] * case["kv_heads"] * keys * 2 * case["head_dim"] * dtype.itemsize


def sdpa_with_cache(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, window_size):
    """The new token's key and value written at each sequence's length, then SDPA over the
    whole cache with a mask of the valid positions (those in the window; q and the key
    rotated first by lmkern.apply_rotary's reference, in rotary cases)."""
    if cos is not None:
        q, k_new = (lmkern.apply_rotary(x, cos, sin, position_ids=seqlens, backend="torch") for x in (q, k_new))
    batch = torch.arange(q.shape[0], device=q.device)
    positions = seqlens.long()
    k_cache[batch, :, positions] = k_new[:, :, 0]
    v_cache[batch, :, positions] = v_new[:, :, 0]
    cache_positions = torch.arange(k_cache.shape[2], device=q.device)
    valid = cache_positions <= positions[:, None]  # (B, L_max)
    if window_size[0] >= 0:
        valid &= cache_positions >= positions[:, None] - window_size[0]
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None, None], enable_gqa=True)


def _flash_attn():
    from flash_attn import flash_attn_with_kvcache

    def run(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, window_size):  # flash-attn's layout is (B, L, H, D)
        out = flash_attn_with_kvcache(
            q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), k_new.transpose(1, 2),
            v_new.transpose(1, 2), rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True,
            window_size=window_size,
        )
        return out.transpose(1, 2)

    return run


def lmkern_decoding(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, window_size, backend):
    return lmkern.attention_with_kv_cache(
        q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend, rotary_cos=cos, rotary_sin=sin,
        window_size=window_size,
    )


def lmkern_unfused_rotary(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, window_size, backend):
    """What the fused rotary saves: q and the new key rotated by lmkern.apply_rotary (two
    launches and two tensors more), then the step without rotary."""
    q, k_new = (lmkern.apply_rotary(x, cos, sin, position_ids=seqlens, backend=backend) for x in (q, k_new))
    return lmkern.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend,
                                          window_size=window_size)


def providers(device, dtype):
    unfused = [
        dataclasses.replace(provider, name=f"{provider.name} unfused",
                            only_for=(lambda case: case["rotary"], "a rotary-only comparison"))
        for provider in lmkern_providers(OP, device, dtype, lmkern_unfused_rotary)
    ]
    return [
        Provider("sdpa with cache", sdpa_with_cache),
        *lmkern_providers(OP, device, dtype, lmkern_decoding),
        *unfused,
        optional_provider("flash_attn", device, _flash_attn),
    ]
