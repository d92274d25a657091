"""Attention through the compiled extension: torch.ops.lmkern.attention_fwd, attention_bwd
and attention_with_kv_cache_fwd.

The schemas live in csrc/lmkern.cpp, the CPU kernels in csrc/cpu/attention.cpp; here are
the fake implementations that let torch.compile trace the ops, and the wrappers with the
backend contract (the kernels read rows contiguous in the last dimension).
"""

import torch

from lmkern import backend

if backend.native_error() is None:  # loads lmkern._C, which defines the ops

    @torch.library.register_fake("lmkern::attention_fwd")
    def _(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed):
        batch, heads, seqlen_q, _ = q.shape
        out = q.new_empty(batch, heads, seqlen_q, v.shape[3])
        return out, q.new_empty(batch, heads, seqlen_q, dtype=torch.float32)

    @torch.library.register_fake("lmkern::attention_bwd")
    def _(grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed):
        return q.new_empty(q.shape), k.new_empty(k.shape), v.new_empty(v.shape)

    @torch.library.register_fake("lmkern::attention_with_kv_cache_fwd")
    def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
        return q.new_empty(*q.shape[:3], v_cache.shape[3])


def _rows_contiguous(x):
    return x if x.stride(-1) == 1 or x.shape[-1] <= 1 else x.contiguous()


def attention_fwd(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed):
    """Same contract as reference.attention_fwd."""
    q, k, v = map(_rows_contiguous, (q, k, v))
    return torch.ops.lmkern.attention_fwd(q, k, v, mask, is_causal, causal_shift, scale, dropout_p, seed)


def attention_bwd(grad_out, q, k, v, out, lse, mask, is_causal, causal_shift, scale, dropout_p, seed):
    """Same contract as reference.attention_bwd."""
    grad_out, q, k, v, out = map(_rows_contiguous, (grad_out, q, k, v, out))
    args = (is_causal, causal_shift, scale, dropout_p, seed)
    return torch.ops.lmkern.attention_bwd(grad_out, q, k, v, out, lse, mask, *args)


def attention_with_kv_cache_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale):
    """Same contract as reference.attention_with_kv_cache_fwd (the caches are contiguous in
    their last dimension: lmkern.attention_with_kv_cache checks it)."""
    q = _rows_contiguous(q)
    if k_new is not None:
        k_new, v_new = _rows_contiguous(k_new), _rows_contiguous(v_new)
    return torch.ops.lmkern.attention_with_kv_cache_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
