"""Rotary position embeddings: the autograd Function, lmkern.apply_rotary, and
lmkern.rotary_cache, which builds the cos and sin caches it reads.

Forward saves nothing of x: backward is the rotation by minus the angles (a rotation's
transpose), read from the same caches at the same positions. In place (opt-in), x's own
memory takes the result.
"""

import torch

from lmkern.backend import KERNEL_DTYPES, Call
from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops import lazy_submodules
from lmkern.ops.apply_rotary import reference
from lmkern.ops.apply_rotary.backends import APPLY_ROTARY
from lmkern.ops.apply_rotary.cache import rotary_cache  # noqa: F401  (lmkern.rotary_cache)
from lmkern.ops.autocast import without_autocast

__getattr__ = lazy_submodules(__name__)


class ApplyRotaryFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, cos, sin, positions, interleaved, inplace, backend):
        impl = APPLY_ROTARY.implementation(backend)
        out = impl.apply_rotary_fwd(x, cos, sin, positions, interleaved, inplace)
        if inplace:
            ctx.mark_dirty(x)
        ctx.save_for_backward(cos, sin, positions)
        ctx.impl, ctx.interleaved = impl, interleaved
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        cos, sin, positions = ctx.saved_tensors
        # Under create_graph=True the reference's backward, linear in grad_out, is itself
        # differentiable.
        impl = reference if torch.is_grad_enabled() else ctx.impl
        grad_x = impl.apply_rotary_bwd(cos, sin, positions, ctx.interleaved, grad_out)
        return grad_x, None, None, None, None, None, None


def _check_tensor(tensor, name, dim, floating=True):
    if not isinstance(tensor, torch.Tensor):
        raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if floating and not tensor.is_floating_point():
        raise ArgumentTypeError(f"{name} must be a floating-point tensor, got {tensor.dtype}")
    if tensor.dim() != dim:
        raise ArgumentError(f"{name} must be {dim}-D, got shape {tuple(tensor.shape)}")


def check_cache(x, cos, sin, names=("x", "cos", "sin")):
    """cos and sin: (P, R / 2) float tensors of one dtype on x's device, R <= D, no gradient.
    names: what the caller calls x, cos and sin, for the errors (lmkern.attention_with_kv_cache
    checks its rotary_cos and rotary_sin here too)."""
    x_name, cos_name, sin_name = names
    for name, cache in ((cos_name, cos), (sin_name, sin)):
        _check_tensor(cache, name, 2)
        if cache.device != x.device:
            raise ArgumentError(f"{name} must be on {x_name}'s device {x.device}, got {cache.device}")
        if cache.requires_grad:
            raise ArgumentError(
                f"{name} must not require grad: lmkern's rotary kernels return no gradient for {cos_name} and "
                f"{sin_name} (detach them, or use the reference formula for learned frequencies)"
            )
    if cos.shape != sin.shape or cos.dtype != sin.dtype:
        raise ArgumentError(
            f"{cos_name} and {sin_name} must have one shape and dtype, got {tuple(cos.shape)} {cos.dtype} and "
            f"{tuple(sin.shape)} {sin.dtype}"
        )
    half, head_dim = cos.shape[1], x.shape[-1]
    if half < 1 or 2 * half > head_dim:
        raise ArgumentError(
            f"{cos_name} and {sin_name} must be (max_positions, rotary_dim / 2) with 2 <= rotary_dim <= head_dim "
            f"{head_dim}, got shape {tuple(cos.shape)} (rotary_dim {2 * half})"
        )


def kernel_cache(cos, sin, backend):
    """cos and sin as the kernels of `backend` read them: contiguous, in a dtype they load
    (fp32 unless already fp32/fp16/bf16); the reference takes any."""
    if backend != "torch" and cos.dtype not in KERNEL_DTYPES:
        cos, sin = cos.float(), sin.float()
    return cos.contiguous(), sin.contiguous()


def _positions(position_ids, x, max_positions):
    """The position of every token, (B, L) int64 (a broadcast view where possible), checked
    to lie in [0, max_positions) on CPU."""
    batch, _, seqlen, _ = x.shape
    tokens = torch.arange(seqlen, device=x.device)
    if position_ids is None:
        if seqlen > max_positions:
            raise ArgumentError(
                f"x has {seqlen} tokens (positions 0..{seqlen - 1}), more than the {max_positions} positions "
                f"cos and sin hold"
            )
        return tokens.expand(batch, seqlen)
    if not isinstance(position_ids, torch.Tensor) or position_ids.dtype not in (torch.int32, torch.int64):
        given = position_ids.dtype if isinstance(position_ids, torch.Tensor) else type(position_ids).__name__
        raise ArgumentTypeError(f"position_ids must be None or an int32 or int64 tensor, got {given}")
    if position_ids.device != x.device:
        raise ArgumentError(f"position_ids must be on x's device {x.device}, got {position_ids.device}")
    shape = tuple(position_ids.shape)
    if shape == (batch,):
        positions = position_ids.long()[:, None] + tokens  # per-sequence offsets
    elif shape in ((batch, seqlen), (1, seqlen)):
        positions = position_ids.long().expand(batch, seqlen)
    else:
        raise ArgumentError(
            f"position_ids must be None, per-sequence offsets ({batch},) or positions ({batch}, {seqlen}), "
            f"got shape {shape}"
        )
    # On CPU the check is cheap; on CUDA it would stall the stream (there an out-of-range
    # position gives NaN), and under torch.compile the native kernel checks instead.
    if x.device.type == "cpu" and positions.numel() and not torch.compiler.is_compiling():
        low, high = positions.min().item(), positions.max().item()
        if low < 0 or high >= max_positions:
            bad = low if low < 0 else high
            b, l = divmod(int((positions == bad).long().flatten().argmax()), seqlen)
            form = "offsets" if shape == (batch,) else "positions"
            raise ArgumentError(
                f"position_ids ({form}) must put every token in [0, {max_positions}) (the positions cos and sin "
                f"hold), got position {bad} for sequence {b}, token {l}"
            )
    return positions


def apply_rotary(x, cos, sin, *, position_ids=None, interleaved=False, inplace=False, backend=None):
    """Rotary position embeddings (RoPE) of queries or keys.

    Args:
        x: (B, H, L, D) queries or keys, float32/float16/bfloat16 (float64 runs on the
            torch backend); any strides (e.g. q sliced from a packed qkv).
        cos, sin: (max_positions, rotary_dim / 2) caches, as flash-attention's
            apply_rotary_emb takes them (and as lmkern.rotary_cache builds them): row p
            holds cos(p theta_i), sin(p theta_i). Any float dtype, one for both; read in
            fp32 by the kernels. rotary_dim <= D: the first rotary_dim elements of each head
            are rotated, the rest pass through unchanged. No gradient flows to cos and sin:
            ones that require grad are refused.
        position_ids: None (token l at position l), per-sequence offsets (B,) int32/int64
            (decoding: sequence b's tokens at offset[b] + 0..L-1), or positions (B, L) (or
            (1, L), shared by the batch). A position outside [0, max_positions) raises
            ArgumentError on CPU; on CUDA, where checking would stall the stream, the
            rotated part of that token is NaN. No cache row is ever read out of bounds.
        interleaved: False (default): pairs (x_i, x_{i + rotary_dim/2}), the half-split
            layout of Llama and Hugging Face's rotate_half; True: pairs (x_{2i}, x_{2i+1}),
            GPT-J's layout.
        inplace: rotate x in its own memory and return it (opt-in; x's values are lost).
            Refused for a leaf that requires grad; a non-leaf x is fine (backward needs
            only cos, sin and the positions).
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend.

    Returns (B, H, L, D) in x's dtype (contiguous, or x itself in place). Each pair turns by
    p theta_i: out_1 = x_1 cos - x_2 sin, out_2 = x_2 cos + x_1 sin, in fp32 (fp64 for fp64
    x), rounded once. Under torch.autocast nothing is cast (an elementwise op): the result
    is in x's dtype, cos and sin are read in their own. Backward rotates the gradient by
    minus the angles (x's gradient only).
    """
    _check_tensor(x, "x", 4)
    check_cache(x, cos, sin)
    if inplace and x.requires_grad and x.is_leaf and torch.is_grad_enabled():
        raise ArgumentError(
            "x must not be a leaf that requires grad when inplace=True (autograd cannot rotate it in place); "
            "pass inplace=False, or a non-leaf x"
        )
    if inplace and any(stride == 0 and size > 1 for stride, size in zip(x.stride(), x.shape)):
        raise ArgumentError(f"x must not overlap itself when inplace=True (an expanded tensor), got strides {x.stride()}")
    positions = _positions(position_ids, x, cos.shape[0])
    call = Call.of(x, head_dim=x.shape[-1], rotary_dim=2 * cos.shape[1])
    name = APPLY_ROTARY.resolve(call, backend, empty=x.numel() == 0)
    cos, sin = kernel_cache(cos, sin, name)
    return ApplyRotaryFunction.apply(x, cos, sin, positions, bool(interleaved), bool(inplace), name)
