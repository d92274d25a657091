"""Flash attention: the autograd Function and lmkern.scaled_dot_product_attention.

Every backend computes softmax(scale q k^T + mask) v without ever holding the (Lq, Lk)
score matrix (except the torch reference, the oracle): an online softmax over key blocks
in forward, which saves only the output and each row's logsumexp, and a backward that
recomputes the probabilities block by block from them.
"""

import math

import torch

from lmkern import philox
from lmkern.backend import Call
from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops import lazy_submodules
from lmkern.ops.attention import reference
from lmkern.ops.attention.backends import ATTENTION
from lmkern.ops.autocast import cast_for_autocast, without_autocast
from lmkern.ops.double_backward import reference_grads

__getattr__ = lazy_submodules(__name__)


def check_float_tensor(tensor, name, shape_name, dims=(4,)):
    """tensor must be a floating-point tensor with a number of dimensions in `dims`, e.g.
    shape_name "(B, H, L, D)"."""
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if tensor.dim() not in dims:
        expected = f"{dims[0]}-D" if len(dims) == 1 else f"at least {dims[0]}-D"
        raise ArgumentError(f"{name} must be {expected} {shape_name}, got shape {tuple(tensor.shape)}")
    if not tensor.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")


def check_same_dtype_and_device(first_name, first, **others):
    for name, tensor in others.items():
        if tensor.dtype != first.dtype or tensor.device != first.device:
            raise ArgumentError(
                f"{name} must have {first_name}'s dtype and device ({first.dtype}, {first.device}), "
                f"got {tensor.dtype} on {tensor.device}"
            )


def check_kv_heads(heads, kv_heads, what):
    if (kv_heads == 0 and heads != 0) or (kv_heads != 0 and heads % kv_heads):
        raise ArgumentError(
            f"the number of query heads ({heads}) must be a multiple of the number of {what} heads ({kv_heads})"
        )


def _broadcast_size(sizes, what, hint=""):
    """The size that sizes broadcast to, as torch does (each equal or 1)."""
    size = max(sizes)
    if any(other != 1 and other != size for other in sizes):
        got = ", ".join(map(str, sizes))
        raise ArgumentError(f"query, key and value must have the same {what}, or 1, got {got}{hint}")
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


def _batch_shape(query, key, value):
    """The broadcast shape of the dimensions before (heads, L, D), as torch broadcasts them."""
    try:
        return torch.broadcast_shapes(*(tensor.shape[:-3] for tensor in (query, key, value)))
    except RuntimeError:
        shapes = ", ".join(str(tuple(tensor.shape)) for tensor in (query, key, value))
        raise ArgumentError(
            f"query, key and value must have batch dimensions (before the last three) that broadcast, got {shapes}"
        ) from None


def _as_4d(x, batch_shape):
    """x (..., H, L, D), (H, L, D) or (L, D) as 4-D (B, H, L, D): a view, with batch and
    heads of 1 where x has none; several batch dimensions are merged into one (a copy
    where x broadcasts over them)."""
    if len(batch_shape) <= 1:
        return x[(None,) * (4 - x.dim())] if x.dim() < 4 else x
    return x.expand(*batch_shape, *x.shape[-3:]).reshape(-1, *x.shape[-3:])


def check_window_size(window_size):
    """window_size as (left, right): a pair of ints >= -1 (-1: unbounded on that side)."""
    if not isinstance(window_size, (tuple, list)) or len(window_size) != 2 or not all(
        isinstance(side, int) and not isinstance(side, bool) for side in window_size
    ):
        raise ArgumentTypeError(f"window_size must be a pair of ints (left, right), got {window_size!r}")
    left, right = window_size
    if left < -1 or right < -1:
        raise ArgumentError(f"window_size must be ints >= -1 (-1: unbounded on that side), got {tuple(window_size)}")
    return left, right


def _window_as_band(left, right, is_causal, causal_shift, seqlen_q, seqlen_k):
    """(is_causal, causal_shift, window_left) of the kernels' contract for window_size
    (left, right) at alignment causal_shift: query i sees keys j with
    i + causal_shift - left <= j <= i + causal_shift + right. A right bound is a causal bound
    on a diagonal moved right by `right` (the kernels skip the key blocks past it), so it
    becomes one; under is_causal it is the causal bound itself (right counts as 0). A side
    wider than the sequences bounds nothing and is dropped."""
    reach = seqlen_q + seqlen_k + abs(causal_shift)
    left, right = (-1 if side >= reach else side for side in (left, right))
    if right < 0 or is_causal:
        return is_causal, causal_shift, left
    return True, causal_shift + right, -1 if left < 0 else left + right


def _is_causal_bias(attn_mask):
    """Whether attn_mask is a torch.nn.attention.bias.CausalBias (imported only for tensor
    subclasses: that module imports triton)."""
    if attn_mask is None or type(attn_mask) is torch.Tensor:
        return False
    from torch.nn.attention.bias import CausalBias

    return isinstance(attn_mask, CausalBias)


def _causal_shift(bias, is_causal, seqlen_q, seqlen_k):
    """The causal shift of a torch.nn.attention.bias.CausalBias: query i sees key j when
    j <= i + shift, 0 for its upper-left variant (torch's is_causal), Lk - Lq for lower-right."""
    if is_causal:
        raise ArgumentError("attn_mask is a CausalBias: is_causal must be False (as in torch)")
    if (bias.seq_len_q, bias.seq_len_kv) != (seqlen_q, seqlen_k):
        raise ArgumentError(
            f"attn_mask is a CausalBias for (Lq, Lk) = ({bias.seq_len_q}, {bias.seq_len_kv}), but query and key "
            f"give ({seqlen_q}, {seqlen_k})"
        )
    from torch.nn.attention.bias import CausalVariant

    return seqlen_k - seqlen_q if bias.variant == CausalVariant.LOWER_RIGHT else 0


def _is_plain_tensor(tensor):
    """Whether the tensor's memory holds its values: a torch.Tensor, or a subclass that does
    not redefine torch functions (Parameter, Buffer, the fake tensors of torch.compile);
    a subclass like CausalBias describes its values instead of storing them."""
    if type(tensor) is torch.Tensor:  # the common case, and what torch.compile's tracer sees
        return True
    handler = type(tensor).__torch_function__
    return handler is torch._C._disabled_torch_function_impl or (
        getattr(handler, "__func__", None) is torch.Tensor.__torch_function__.__func__
    )


def _check_mask(attn_mask, query, shape, is_causal):
    """attn_mask as 4-D (B | 1, H | 1, Lq | 1, Lk | 1), B = prod(batch_shape), or None:
    the mask as the caller holds it, so that its gradient needs no reduction outside the
    backends. A view, with leading dimensions of 1 where it has fewer; a copy where it
    broadcasts over some of several batch dimensions that merge. shape: (*batch_shape, H,
    Lq, Lk), what it must broadcast to."""
    if attn_mask is None:
        return None
    if is_causal:
        raise ArgumentError("attn_mask and is_causal=True cannot both be set (as in torch); fold the causal mask in")
    if not isinstance(attn_mask, torch.Tensor):
        raise ArgumentTypeError(f"attn_mask must be a tensor or None, got {type(attn_mask).__name__}")
    if not _is_plain_tensor(attn_mask):
        raise ArgumentTypeError(
            f"attn_mask must be a plain tensor or a torch.nn.attention.bias.CausalBias, got a "
            f"{type(attn_mask).__name__}, which lmkern cannot read"
        )
    if attn_mask.dtype not in (torch.bool, torch.float32, query.dtype):
        raise ArgumentTypeError(
            f"attn_mask must be bool (True takes part), or float32 or query's dtype ({query.dtype}) to add to the "
            f"scores, got {attn_mask.dtype}"
        )
    if attn_mask.device != query.device:
        raise ArgumentError(f"attn_mask must be on {query.device} like query, got {attn_mask.device}")
    trailing = shape[len(shape) - attn_mask.dim():] if attn_mask.dim() <= len(shape) else None
    if trailing is None or any(size != 1 and size != wanted for size, wanted in zip(attn_mask.shape, trailing)):
        dims = "(B, H, Lq, Lk)" if len(shape) == 4 else "(..., H, Lq, Lk)"
        raise ArgumentError(f"attn_mask must broadcast to {dims} = {tuple(shape)}, got shape {tuple(attn_mask.shape)}")
    mask = attn_mask[(None,) * (len(shape) - attn_mask.dim())]  # as many dimensions as shape
    if mask.dim() != 4:  # no batch dimension, or several: merged into one
        batch = shape[:-3] if any(size != 1 for size in mask.shape[:-3]) else mask.shape[:-3]
        mask = mask.expand(*batch, *mask.shape[-3:]).reshape(-1, *mask.shape[-3:])
    return mask


class AttentionFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, q, k, v, mask, relative_bias, is_causal, causal_shift, scale, dropout_p, seed, window_left, backend):
        impl = ATTENTION.implementation(backend)
        args = (is_causal, causal_shift, scale, dropout_p, seed, window_left)
        out, lse = impl.attention_fwd(q, k, v, mask, *args, relative_bias)
        ctx.save_for_backward(q, k, v, out, lse, mask, relative_bias)
        ctx.args, ctx.impl = args, impl
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        q, k, v, out, lse, mask, relative_bias = ctx.saved_tensors
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through the reference
            grads = reference_grads(
                lambda q, k, v, mask, bias: reference.attention_fwd(q, k, v, mask, *ctx.args, bias)[0],
                (q, k, v, mask, relative_bias), ctx.needs_input_grad[:5], (grad_out,),
            )
        elif ctx.needs_input_grad[3] or ctx.needs_input_grad[4]:  # a learned bias: see _check_mask
            grads = ctx.impl.attention_bwd_with_bias_grads(
                grad_out, q, k, v, out, lse, mask, *ctx.args, relative_bias, *ctx.needs_input_grad[3:5]
            )
        else:
            grads = (*ctx.impl.attention_bwd(grad_out, q, k, v, out, lse, mask, *ctx.args, relative_bias), None, None)
        return *grads, None, None, None, None, None, None, None


def _check_relative_bias(relative_bias, query, heads, seqlen_q, seqlen_k):
    """relative_bias (H | 1, Lq + Lk - 1), float32 or query's dtype, on query's device, or None."""
    if relative_bias is None:
        return None
    if not isinstance(relative_bias, torch.Tensor):
        raise ArgumentTypeError(f"relative_bias must be a tensor or None, got {type(relative_bias).__name__}")
    if relative_bias.dtype not in (torch.float32, query.dtype):
        raise ArgumentTypeError(
            f"relative_bias must be float32 or query's dtype ({query.dtype}), got {relative_bias.dtype}"
        )
    if relative_bias.device != query.device:
        raise ArgumentError(f"relative_bias must be on {query.device} like query, got {relative_bias.device}")
    distances = seqlen_q + seqlen_k - 1
    if relative_bias.dim() != 2 or relative_bias.shape[0] not in (1, heads) or relative_bias.shape[1] != distances:
        raise ArgumentError(
            f"relative_bias must have shape (H | 1, Lq + Lk - 1) = ({heads} | 1, {distances}), got "
            f"{tuple(relative_bias.shape)}"
        )
    return relative_bias


def scaled_dot_product_attention(
    query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, scale=None, enable_gqa=False, *,
    window_size=(-1, -1), relative_bias=None, backend=None,
):
    """torch.nn.functional.scaled_dot_product_attention, computed as flash attention.

    Args:
        query: (..., H, Lq, D) float32/float16/bfloat16 (float64 runs on the torch
            backend), usually (B, H, Lq, D); (H, Lq, D) and (Lq, D) too.
        key: (..., H_kv, Lk, D), value: (..., H_kv, Lk, Dv), query's dtype and device. The
            leading dimensions and the head counts broadcast as in torch (1 against any);
            with enable_gqa=True, H_kv may be any divisor of H: query head h reads
            key/value head h // (H // H_kv).
        attn_mask: broadcastable to (..., H, Lq, Lk): boolean, True where the query takes
            the key into account, or float (float32 or query's dtype) added to the scores;
            or a torch.nn.attention.bias.CausalBias (causal_upper_left, causal_lower_right),
            run as causal attention aligned top-left or bottom-right. A key-padding mask
            (B, 1, 1, Lk) is read once per key block by the kernels; other masks are read
            element by element. A float mask that requires grad (a learned bias, as T5's
            relative position bias (1, H, Lq, Lk)) gets its gradient, summed over the
            dimensions it broadcasts over, from every backend but native on CUDA, whose
            kernels take boolean key-padding masks only ("auto" then picks Triton): the
            native CPU and Triton kernels sum it in a pass of their own, deterministically
            and without a (B, H, Lq, Lk) buffer.
        dropout_p: dropout on the attention probabilities; the mask is drawn from a seed
            taken from torch's default generator (torch.manual_seed makes it reproducible)
            and regenerated in backward, never stored. Apply it only in training, as with torch.
        is_causal: query i sees keys j <= i (torch's top-left alignment when Lq != Lk);
            cannot be combined with attn_mask.
        scale: of the scores; 1 / sqrt(D) by default.
        window_size: (left, right), sliding-window (local) attention as in flash-attn:
            query i sees only keys j with i + s - left <= j <= i + s + right, -1 leaving
            that side unbounded; (-1, -1), the default, is no window. s is the causal
            alignment: 0 (top-left, as is_causal, also when Lq != Lk and not causal), or
            Lk - Lq with a causal_lower_right CausalBias. Under is_causal (or a CausalBias)
            right counts as 0. Combines with attn_mask, dropout, GQA and is_causal; the
            kernels skip the key blocks outside the window, so that a fixed window costs
            linear time in the length. Mistral's sliding window W is
            window_size=(W - 1, 0) with is_causal=True.
        relative_bias: (H | 1, Lq + Lk - 1) float32 or query's dtype, a bias per distance
            (T5's relative position bias, gathered by the caller from its table of
            buckets): query i and key j of this call get relative_bias[h, j - i + Lq - 1]
            added to their score. Combines with attn_mask (as T5's encoder needs, a boolean
            key-padding mask (B, 1, 1, Lk)), is_causal, windows, GQA and dropout; gets its
            gradient when it requires grad. The native CPU and Triton kernels read it in
            place, a mask whose query stride is -1, and sum its gradient along the
            diagonals of dS in a deterministic pass of their own: unlike the same bias
            materialised as a (1, H, Lq, Lk) attn_mask, no (H, Lq, Lk) bias and no
            (B, H, Lq, Lk) copy of it merged with the padding mask ever exist. Beside a
            mask that depends on the key only, both read it in place; the native CPU
            kernels take no other mask beside it, Triton's materialise it with an
            element-wise one (its gradient is still summed in-kernel); native CUDA takes
            none ("auto" then picks Triton).
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.

    Under torch.autocast, query, key, value and a float mask are cast to the autocast dtype
    first, as torch's own attention is. Returns (..., H, Lq, Dv) in query's dtype, the
    leading dimensions broadcast. A query row
    that sees no key at all (every key masked) gives zeros and zero gradients on every
    backend; torch gives zeros or NaN depending on its backend. Gradients can be
    differentiated again (create_graph=True): that backward runs through the reference.
    """
    query, key, value = cast_for_autocast(query, key, value)
    if isinstance(attn_mask, torch.Tensor) and _is_plain_tensor(attn_mask):
        attn_mask = cast_for_autocast(query, attn_mask)[1]
    if isinstance(relative_bias, torch.Tensor):
        relative_bias = cast_for_autocast(query, relative_bias)[1]
    check_float_tensor(query, "query", "(..., H, Lq, D)", dims=range(2, 64))
    check_float_tensor(key, "key", "(..., H_kv, Lk, D)", dims=range(2, 64))
    check_float_tensor(value, "value", "(..., H_kv, Lk, Dv)", dims=range(2, 64))
    check_same_dtype_and_device("query", query, key=key, value=value)
    if key.shape[-1] != query.shape[-1]:
        raise ArgumentError(f"key must have query's head dim {query.shape[-1]}, got shape {tuple(key.shape)}")
    if value.shape[-2] != key.shape[-2]:
        raise ArgumentError(f"value must have key's length {key.shape[-2]}, got shape {tuple(value.shape)}")
    rank = max(query.dim(), key.dim(), value.dim())
    batch_shape = _batch_shape(query, key, value)
    query, key, value = (_as_4d(tensor, batch_shape) for tensor in (query, key, value))
    batch = math.prod(batch_shape)
    heads, kv_heads = _head_counts(query.shape[1], key.shape[1], value.shape[1], enable_gqa)
    if not 0.0 <= dropout_p <= 1.0:
        raise ArgumentError(f"dropout_p must be in [0, 1], got {dropout_p}")
    seqlen_q, seqlen_k = query.shape[2], key.shape[2]
    causal_shift = 0
    if _is_causal_bias(attn_mask):
        causal_shift = _causal_shift(attn_mask, is_causal, seqlen_q, seqlen_k)
        attn_mask, is_causal = None, True
    mask_shape = torch.Size([*batch_shape, heads, seqlen_q, seqlen_k])
    mask = _check_mask(attn_mask, query, mask_shape, is_causal)
    is_causal, causal_shift, window_left = _window_as_band(
        *check_window_size(window_size), is_causal, causal_shift, seqlen_q, seqlen_k
    )
    scale = 1.0 / math.sqrt(query.shape[3]) if scale is None else float(scale)
    relative_bias = _check_relative_bias(relative_bias, query, heads, seqlen_q, seqlen_k)
    mask_grad = mask is not None and mask.requires_grad and torch.is_grad_enabled()
    backward = torch.is_grad_enabled() and any(
        tensor is not None and tensor.requires_grad for tensor in (query, key, value, mask, relative_bias)
    )
    call = Call.of(query, head_dims=(query.shape[3], value.shape[3]), mask=mask, mask_grad=mask_grad,
                   dropout_p=dropout_p, relative_bias=relative_bias is not None, windowed=window_left >= 0,
                   backward=backward)
    name = ATTENTION.resolve(call, backend, empty=0 in (batch, heads, seqlen_q, seqlen_k))
    q = _as_heads(query, batch, heads)
    k, v = _as_heads(key, batch, kv_heads), _as_heads(value, batch, kv_heads)
    seed = philox.draw_seed() if dropout_p > 0 else 0
    out = AttentionFunction.apply(
        q, k, v, mask, relative_bias, bool(is_causal), causal_shift, scale, float(dropout_p), seed, window_left, name
    )
    out_shape = (*batch_shape, heads, seqlen_q, value.shape[3])  # 2-D inputs: without the (one) head
    return out.reshape(out_shape[len(out_shape) - rank:])
