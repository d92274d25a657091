"""Flash attention: the autograd Function and lmkern.scaled_dot_product_attention.

Every backend computes softmax(scale q k^T + mask) v without ever holding the (Lq, Lk)
score matrix (except the torch reference, the oracle): an online softmax over key blocks
in forward, which saves only the output and each row's logsumexp, and a backward that
recomputes the probabilities block by block from them.
"""

import math

import torch

from lmkern import random
from lmkern.backend import implementation, resolve


def check_float_tensor(tensor, name, shape_name):
    """tensor must be a 4-D floating-point tensor, e.g. shape_name "(B, H, L, D)"."""
    if not isinstance(tensor, torch.Tensor):
        raise TypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() != 4:
        raise ValueError(f"{name} must be 4-D {shape_name}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise TypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_same_dtype_and_device(first_name, first, **others):
    for name, tensor in others.items():
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ValueError(
                f"{name} must have {first_name}'s dtype and device ({first.dtype}, {first.device}), "
                f"got {tensor.dtype} on {tensor.device}"
            )


def check_kv_heads(heads, kv_heads, what):
    if kv_heads == 0 or heads % kv_heads:
        raise ValueError(
            f"the number of query heads ({heads}) must be a multiple of the number of {what} heads ({kv_heads})"
        )


def _broadcast_size(sizes, what, hint=""):
    """The size that sizes broadcast to, as torch does (each equal or 1)."""
    size = max(sizes)
    if any(other != 1 and other != size for other in sizes):
        got = ", ".join(map(str, sizes))
        raise ValueError(f"query, key and value must have the same {what}, or 1, got {got}{hint}")
    return size


def _head_counts(query_heads, key_heads, value_heads, enable_gqa):
    """(H, H_kv): the heads of the output and of the key/value tensors the kernels read."""
    if enable_gqa:
        check_kv_heads(query_heads, key_heads, "key")
        check_kv_heads(query_heads, value_heads, "value")
        heads = query_heads
    else:
        hint = "; pass enable_gqa=True for grouped-query attention"
        heads = _broadcast_size((query_heads, key_heads, value_heads), "number of heads", hint)
    # Keys and values with one head count that divides H are read in groups; else both are made H heads.
    return heads, key_heads if key_heads == value_heads else heads


def _as_heads(x, batch, heads):
    """x (B or 1, heads or 1 or a divisor of heads, L, D) as (batch, heads, L, D): a view
    where it broadcasts, a copy where each head serves several (repeat_interleave)."""
    if x.shape[1] != 1 and x.shape[1] != heads:
        x = x.repeat_interleave(heads // x.shape[1], dim=1)
    if x.shape[0] != batch or x.shape[1] != heads:
        x = x.expand(batch, heads, *x.shape[2:])
    return x


def _check_mask(attn_mask, query, shape, is_causal):
    """attn_mask as a (B, H, Lq, Lk) view, or None."""
    if attn_mask is None:
        return None
    if is_causal:
        raise ValueError("attn_mask and is_causal=True cannot both be set (as in torch); fold the causal mask in")
    if not isinstance(attn_mask, torch.Tensor):
        raise TypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise TypeError(
            f"attn_mask must be bool (True takes part), or float32 or query's dtype ({query.dtype}) to add to the "
            f"scores, got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise ValueError(f"attn_mask must be on {query.device} like query, got {attn_mask.device}")
    trailing = shape[4 - attn_mask.dim():] if attn_mask.dim() <= 4 else None
    if trailing is None or any(size != 1 and size != wanted for size, wanted in zip(attn_mask.shape, trailing)):
        raise ValueError(
            f"attn_mask must broadcast to (B, H, Lq, Lk) = {tuple(shape)}, got shape {tuple(attn_mask.shape)}"
        )
    return attn_mask.expand(shape)


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, v, mask, is_causal, scale, dropout_p, seed, backend):
        impl = implementation(__name__, backend)
        out, lse = impl.attention_fwd(q, k, v, mask, is_causal, scale, dropout_p, seed)
        ctx.save_for_backward(q, k, v, out, lse, mask)
        ctx.args = (is_causal, scale, dropout_p, seed)
        ctx.impl = impl
        return out

    @staticmethod
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask = ctx.saved_tensors
        if ctx.needs_input_grad[3]:  # an additive mask's gradient: only the reference (see the limits)
            grads = ctx.impl.attention_bwd_with_mask_grad(grad_out, q, k, v, out, lse, mask, *ctx.args)
        else:
            grads = (*ctx.impl.attention_bwd(grad_out, q, k, v, out, lse, mask, *ctx.args), None)
        return *grads, None, None, None, None, None


# The largest head dim of the Triton kernels, whose tiles hold whole rows of q, k and v.
TRITON_MAX_HEAD_DIM = 256
# What the native CUDA kernels take (csrc/cuda/attention.cpp); "auto" sends the rest to Triton.
NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16)
NATIVE_CUDA_HEAD_DIMS = (64, 128)


def is_key_padding_mask(mask):
    """Whether a (B, H, Lq, Lk) mask view is a boolean (B, 1, 1, Lk) mask broadcast."""
    return mask.dtype == torch.bool and all(mask.shape[d] == 1 or mask.stride(d) == 0 for d in (1, 2))


def native_cuda_limit(dtype, head_dims, mask=None, dropout_p=0.0):
    """Why the native CUDA kernels cannot run this call, or None."""
    if dtype not in NATIVE_CUDA_DTYPES:
        return f"its CUDA kernels take float16 or bfloat16, got {dtype}"
    if head_dims[0] != head_dims[1] or head_dims[0] not in NATIVE_CUDA_HEAD_DIMS:
        return f"its CUDA kernels take head dims {NATIVE_CUDA_HEAD_DIMS} (the same for v), got {tuple(head_dims)}"
    if mask is not None and not is_key_padding_mask(mask):
        return "its CUDA kernels take only boolean key-padding masks (B, 1, 1, Lk)"
    if dropout_p > 0:
        return "its CUDA kernels have no dropout"
    return None


def backend_limits(query, mask, head_dims, dropout_p=0.0):
    """What the kernel backends cannot do for this call (see lmkern.backend.resolve); mask
    is the (B, H, Lq, Lk) view or None, head_dims those of q and v."""
    limits = {}
    if max(head_dims) > TRITON_MAX_HEAD_DIM:
        limits["triton"] = f"its kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {max(head_dims)}"
    if query.device.type == "cuda":
        native = native_cuda_limit(query.dtype, head_dims, mask, dropout_p)
        if native is not None:
            limits["native"] = native
    if mask is not None and mask.requires_grad and torch.is_grad_enabled():
        why = "the gradient of attn_mask is computed by the torch backend only"
        limits.update(triton=why, native=why)
    return limits


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *, backend=None
):
    """torch.nn.functional.scaled_dot_product_attention, computed as flash attention.

    Args:
        query: (B, H, Lq, D) float32/float16/bfloat16 (float64 runs on the torch backend).
        key: (B, H_kv, Lk, D), value: (B, H_kv, Lk, Dv), query's dtype and device. B and the
            head counts broadcast as in torch (1 against any); with enable_gqa=True, H_kv
            may be any divisor of H: query head h reads key/value head h // (H // H_kv).
        attn_mask: broadcastable to (B, H, Lq, Lk): boolean, True where the query takes the
            key into account, or float (float32 or query's dtype) added to the scores. A
            key-padding mask (B, 1, 1, Lk) is read once per key block by the kernels; other
            masks are read element by element. Only the torch backend computes a float
            mask's gradient ("auto" picks it when the mask requires grad).
        dropout_p: dropout on the attention probabilities; the mask is drawn from a seed
            taken from torch's default generator (torch.manual_seed makes it reproducible)
            and regenerated in backward, never stored. Apply it only in training, as with torch.
        is_causal: query i sees keys j <= i (torch's top-left alignment when Lq != Lk);
            cannot be combined with attn_mask.
        scale: of the scores; 1 / sqrt(D) by default.
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.

    Returns (B, H, Lq, Dv) in query's dtype. Differs from torch in that only 4-D inputs are
    taken, and that a query row that sees no key at all (every key masked) gives zeros and
    zero gradients on every backend; torch gives zeros or NaN depending on its backend.
    """
    check_float_tensor(query, "query", "(B, H, Lq, D)")
    check_float_tensor(key, "key", "(B, H_kv, Lk, D)")
    check_float_tensor(value, "value", "(B, H_kv, Lk, Dv)")
    check_same_dtype_and_device("query", query, key=key, value=value)
    if key.shape[3] != query.shape[3]:
        raise ValueError(f"key must have query's head dim {query.shape[3]}, got shape {tuple(key.shape)}")
    if value.shape[2] != key.shape[2]:
        raise ValueError(f"value must have key's length {key.shape[2]}, got shape {tuple(value.shape)}")
    batch = _broadcast_size((query.shape[0], key.shape[0], value.shape[0]), "batch size")
    heads, kv_heads = _head_counts(query.shape[1], key.shape[1], value.shape[1], enable_gqa)
    if not 0.0 <= dropout_p <= 1.0:
        raise ValueError(f"dropout_p must be in [0, 1], got {dropout_p}")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    mask = _check_mask(attn_mask, query, torch.Size([batch, heads, seqlen_q, seqlen_k]), is_causal)
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else float(scale)
    limits = backend_limits(query, mask, (query.shape[3], value.shape[3]), dropout_p)
    name = resolve("attention", query, backend, limits)
    q = _as_heads(query, batch, heads)
    k, v = _as_heads(key, batch, kv_heads), _as_heads(value, batch, kv_heads)
    seed = random.draw_seed() if dropout_p > 0 else 0
    return AttentionFunction.apply(q, k, v, mask, bool(is_causal), scale, float(dropout_p), seed, name)
