"""Attention over a KV cache through the compiled extension:
torch.ops.lmkern.attention_with_kv_cache_fwd.

The schema lives in csrc/lmkern.cpp, the kernels in csrc/cpu/attention_with_kv_cache.cpp
and csrc/cuda/attention_with_kv_cache.cpp (on the attention kernels); here are its fake
implementation, which lets torch.compile trace the op, and the wrapper with the backend
contract.
"""

import torch

from lmkern import extension
from lmkern.ops.attention.native import rows_contiguous

extension.require()  # loads lmkern._C, which defines the op, before its fake is registered


@torch.library.register_fake("lmkern::attention_with_kv_cache_fwd")
def _(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos=None, rotary_sin=None,
      rotary_interleaved=False, window_left=-1):
    return q.new_empty(*q.shape[:3], v_cache.shape[3])


def attention_with_kv_cache_fwd(
    q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos=None, rotary_sin=None, rotary_interleaved=False,
    window_left=-1,
):
    """Same contract as reference.attention_with_kv_cache_fwd (the caches are contiguous in
    their last dimension: lmkern.attention_with_kv_cache checks it; rotary_cos and
    rotary_sin contiguous, of one dtype)."""
    q = rows_contiguous(q)
    if k_new is not None:
        k_new, v_new = rows_contiguous(k_new), rows_contiguous(v_new)
    return torch.ops.lmkern.attention_with_kv_cache_fwd(
        q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos, rotary_sin, rotary_interleaved, window_left
    )
