"""Decoding one token over a KV cache (GQA: 32 query heads, 8 key/value heads): lmkern's
attention_with_kv_cache against torch's SDPA over the same cache (the new key and value
written at each sequence's position, then attention under a mask of each sequence's
length), and flash-attn's flash_attn_with_kvcache.

Memory-bound, in GB/s over reading each sequence's keys and values once: the cases fill
every cache to its last position, so B H_kv L_max (D + Dv) elements; the query, the new
key and value and the output are negligible. Timed as CUDA graphs on a GPU: a step is a
few kernels of microseconds, which launch overhead would otherwise swamp. Forward only:
decoding has no backward.

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


def cases(device, quick):
    if quick:
        return [dict(batch=2, heads=8, kv_heads=2, cache=256, head_dim=64, rotary=rotary) for rotary in (False, True)]
    if device == "cuda":
        plain = [(batch, cache, False) for batch in (1, 8, 64) for cache in (4096, 16384, 32768)]
        return [
            dict(batch=batch, heads=32, kv_heads=8, cache=cache, head_dim=128, rotary=rotary)
            for batch, cache, rotary in plain + [(1, 16384, True), (64, 16384, True)]
        ]
    plain = [(batch, cache, False) for batch in (1, 8) for cache in (1024, 4096)]
    return [
        dict(batch=batch, heads=8, kv_heads=2, cache=cache, head_dim=64, rotary=rotary)
        for batch, cache, rotary in plain + [(8, 4096, True)]
    ]


def label(case):
    return f"b{case['batch']} cache {case['cache']}" + (" rotary" if case["rotary"] else "")


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
    return q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin


def work(case, dtype, pass_name):
    return case["batch"] * case["kv_heads"] * case["cache"] * 2 * case["head_dim"] * dtype.itemsize


def sdpa_with_cache(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin):
    """The new token's key and value written at each sequence's length, then SDPA over the
    whole cache with a mask of the valid positions (q and the key rotated first by
    lmkern.apply_rotary's reference, in rotary cases)."""
    if cos is not None:
        q, k_new = (lmkern.apply_rotary(x, cos, sin, position_ids=seqlens, backend="torch") for x in (q, k_new))
    batch = torch.arange(q.shape[0], device=q.device)
    positions = seqlens.long()
    k_cache[batch, :, positions] = k_new[:, :, 0]
    v_cache[batch, :, positions] = v_new[:, :, 0]
    valid = torch.arange(k_cache.shape[2], device=q.device) <= positions[:, None]  # (B, L_max)
    return F.scaled_dot_product_attention(q, k_cache, v_cache, attn_mask=valid[:, None, None], enable_gqa=True)


def _flash_attn():
    from flash_attn import flash_attn_with_kvcache

    def run(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin):  # flash-attn's layout is (B, L, H, D)
        out = flash_attn_with_kvcache(
            q.transpose(1, 2), k_cache.transpose(1, 2), v_cache.transpose(1, 2), k_new.transpose(1, 2),
            v_new.transpose(1, 2), rotary_cos=cos, rotary_sin=sin, cache_seqlens=seqlens, causal=True,
        )
        return out.transpose(1, 2)

    return run


def lmkern_decoding(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, backend):
    return lmkern.attention_with_kv_cache(
        q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend, rotary_cos=cos, rotary_sin=sin
    )


def lmkern_unfused_rotary(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, backend):
    """What the fused rotary saves: q and the new key rotated by lmkern.apply_rotary (two
    launches and two tensors more), then the step without rotary."""
    q, k_new = (lmkern.apply_rotary(x, cos, sin, position_ids=seqlens, backend=backend) for x in (q, k_new))
    return lmkern.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend)


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
