"""Attention over a preallocated KV cache, for generation: lmkern.attention_with_kv_cache."""

import math

import torch

from lmkern.backend import Call
from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops import lazy_submodules
from lmkern.ops.apply_rotary import check_cache, kernel_cache
from lmkern.ops.attention import check_float_tensor, check_kv_heads, check_same_dtype_and_device, check_window_size
from lmkern.ops.attention_with_kv_cache.backends import ATTENTION_WITH_KV_CACHE
from lmkern.ops.autocast import autocast_dtype, autocast_off

__getattr__ = lazy_submodules(__name__)


def _check_cache_lengths(cache_seqlens, batch, device):
    if not isinstance(cache_seqlens, torch.Tensor):
        raise ArgumentTypeError(f"cache_seqlens must be a tensor, got {type(cache_seqlens).__name__}")
    if cache_seqlens.dtype not in (torch.int32, torch.int64):
        raise ArgumentTypeError(f"cache_seqlens must be int32 or int64, got {cache_seqlens.dtype}")
    if tuple(cache_seqlens.shape) != (batch,) or cache_seqlens.device != device:
        raise ArgumentError(
            f"cache_seqlens must have shape ({batch},) on {device}, got {tuple(cache_seqlens.shape)} on "
            f"{cache_seqlens.device}"
        )


def _rows_aligned(cache):
    """Whether a cache's rows start at multiples of 8 elements (16 bytes in half precision)."""
    return all(cache.shape[d] == 1 or cache.stride(d) % 8 == 0 for d in range(3))


def _check_new(new, name, cache, cache_name):
    """new must be (B, H_kv, L_new, cache's head dim) with the cache's dtype and device."""
    check_float_tensor(new, name, f"(B, H_kv, L_new, {cache.shape[3]})")
    check_same_dtype_and_device(cache_name, cache, **{name: new})
    expected = (cache.shape[0], cache.shape[1], new.shape[2], cache.shape[3])
    if tuple(new.shape) != expected:
        raise ArgumentError(
            f"{name} must have shape (B, H_kv, L_new, D) = {expected} like {cache_name}, got {tuple(new.shape)}"
        )


def _check_rotary(q, rotary_cos, rotary_sin, rotary_interleaved):
    """rotary_cos and rotary_sin: both or neither, checked as lmkern.apply_rotary checks its cos and sin."""
    if (rotary_cos is None) != (rotary_sin is None):
        raise ArgumentError("rotary_cos and rotary_sin must be given together, or neither")
    if not isinstance(rotary_interleaved, bool):
        raise ArgumentTypeError(f"rotary_interleaved must be a bool, got {type(rotary_interleaved).__name__}")
    if rotary_cos is not None:
        check_cache(q, rotary_cos, rotary_sin, names=("q", "rotary_cos", "rotary_sin"))


def attention_with_kv_cache(
    q, k_cache, v_cache, cache_seqlens, k_new=None, v_new=None, *, scale=None, backend=None,
    rotary_cos=None, rotary_sin=None, rotary_interleaved=False, window_size=(-1, -1),
):
    """Attention of new queries over a KV cache, appending the new keys and values first.

    For generation with a static cache: each step writes k_new and v_new into the caches
    in place, at each sequence's own position, and attends over each sequence's valid
    keys with bottom-right causal alignment. For long caches at small batch the keys are
    split across GPU programs and the parts combined (flash-decoding).

    Args:
        q: (B, H, Lq, D) float32/float16/bfloat16, the new tokens' queries (Lq = 1 for one
            token per step; more for a prompt or speculative tokens).
        k_cache: (B, H_kv, L_max, D), v_cache: (B, H_kv, L_max, Dv), q's dtype and device,
            contiguous in the last dim; H_kv divides H (GQA/MQA). Written in place.
        cache_seqlens: (B,) int32 or int64, each sequence's cached length before this call.
            Not changed here: the caller adds L_new after the step.
        k_new: (B, H_kv, L_new, D) and v_new: (B, H_kv, L_new, Dv), written to positions
            cache_seqlens[b] .. cache_seqlens[b] + L_new - 1; or both None.
        scale: of the scores; 1 / sqrt(D) by default.
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.
        rotary_cos, rotary_sin: None, or rotary embeddings fused into the step (as
            flash-attention's flash_attn_with_kvcache): (max_positions, rotary_dim / 2)
            caches as lmkern.apply_rotary and lmkern.rotary_cache take them, rotary_dim <= D
            (the first rotary_dim elements of each head rotated, the rest passed through),
            any float dtype, no gradient. k_new is rotated at its positions
            cache_seqlens[b] + j before it is written (the cache holds rotated keys), and q
            at its positions total_b - Lq + i (below) as it is read; q itself is not
            changed, v never rotated. Without k_new only q is rotated (the cache already
            holds rotated keys). A position past max_positions raises ValueError on CPU;
            on CUDA the rotated values there are NaN (no row of the caches is read out of
            bounds). Unlike flash-attention, q is rotated at the positions it attends
            from, so with k_new None and Lq tokens q sits at cache_seqlens[b] - Lq + i.
        rotary_interleaved: False: the half-split layout (Llama, pairs (x_i, x_{i+R/2}));
            True: GPT-J's pairs (x_{2i}, x_{2i+1}).
        window_size: (left, right), a sliding window as in flash-attn: query i (at
            position p, below) sees only the positions p - left .. p; -1 leaves the left
            side unbounded, (-1, -1) (the default) is no window. The attention is causal,
            so right counts as 0 (it is checked, not used). The kernels read only the
            window's keys; Mistral's sliding window W is window_size=(W - 1, 0).

    With total_b = cache_seqlens[b] + L_new, query i of sequence b sits at position
    total_b - Lq + i and sees the cache's keys at positions up to it; a query at a negative
    position sees nothing and gets zeros. Returns (B, H, Lq, Dv) in q's dtype. A sequence
    that would not fit (total_b > L_max, or a negative length) raises ValueError on CPU; on
    CUDA, where checking would stall the stream, its output is NaN and nothing is written
    for it. Under torch.autocast, q, k_new and v_new are cast to the caches' dtype (the
    caller allocates the caches in the dtype to compute in); rotary_cos and rotary_sin are
    read in their own dtype, as lmkern.apply_rotary reads them (the rotation in fp32). For
    inference: there is no backward (it raises under autograd).
    """
    check_float_tensor(k_cache, "k_cache", "(B, H_kv, L_max, D)")
    if autocast_dtype(k_cache.device.type) is not None:  # the caches' dtype is the computation's
        q, k_new, v_new = (t.to(k_cache.dtype) if isinstance(t, torch.Tensor) else t for t in (q, k_new, v_new))
    check_float_tensor(q, "q", "(B, H, Lq, D)")
    check_float_tensor(v_cache, "v_cache", "(B, H_kv, L_max, Dv)")
    check_same_dtype_and_device("q", q, k_cache=k_cache, v_cache=v_cache)
    batch, heads, _, head_dim = q.shape
    if k_cache.shape[0] != batch or k_cache.shape[3] != head_dim:
        raise ArgumentError(
            f"k_cache must have shape (B, H_kv, L_max, D) with q's B = {batch} and D = {head_dim}, "
            f"got {tuple(k_cache.shape)}"
        )
    if v_cache.shape[:3] != k_cache.shape[:3]:
        raise ArgumentError(
            f"v_cache must have shape (B, H_kv, L_max, Dv) = ({', '.join(map(str, k_cache.shape[:3]))}, Dv) like "
            f"k_cache, got {tuple(v_cache.shape)}"
        )
    check_kv_heads(heads, k_cache.shape[1], "cache")
    for name, cache in (("k_cache", k_cache), ("v_cache", v_cache)):
        if cache.stride(3) != 1:
            raise ArgumentError(f"{name} must be contiguous in its last dimension, got strides {cache.stride()}")
    _check_cache_lengths(cache_seqlens, batch, q.device)
    _check_rotary(q, rotary_cos, rotary_sin, rotary_interleaved)
    if (k_new is None) != (v_new is None):
        raise ArgumentError("k_new and v_new must be given together, or neither")
    if k_new is not None:
        _check_new(k_new, "k_new", k_cache, "k_cache")
        _check_new(v_new, "v_new", v_cache, "v_cache")
        if k_new.shape[2] != v_new.shape[2]:
            raise ArgumentError(f"k_new and v_new must have the same length, got {k_new.shape[2]} and {v_new.shape[2]}")
    if torch.is_grad_enabled() and any(t is not None and t.requires_grad for t in (q, k_cache, v_cache, k_new, v_new)):
        raise RuntimeError(
            "attention_with_kv_cache is for inference and has no backward: call it under torch.no_grad() "
            "(or torch.inference_mode())"
        )
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)
    window_left = check_window_size(window_size)[0]
    if window_left >= k_cache.shape[2]:  # wider than the cache: bounds nothing
        window_left = -1
    aligned = _rows_aligned(k_cache) and _rows_aligned(v_cache)
    call = Call.of(q, head_dims=(head_dim, v_cache.shape[3]), caches_aligned=aligned)
    name = ATTENTION_WITH_KV_CACHE.resolve(call, backend, empty=q.numel() == 0)
    fwd = ATTENTION_WITH_KV_CACHE.implementation(name).attention_with_kv_cache_fwd
    if rotary_cos is not None:
        rotary_cos, rotary_sin = kernel_cache(rotary_cos, rotary_sin, name)
    with autocast_off(q.device.type):
        return fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale, rotary_cos, rotary_sin, rotary_interleaved,
                   window_left)
