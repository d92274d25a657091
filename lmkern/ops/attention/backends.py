"""The backends of lmkern.scaled_dot_product_attention (see lmkern.backend). Its calls carry
head_dims (q's and v's), mask (4-D, broadcastable to (B, H, Lq, Lk), or None), mask_grad
(whether the gradient of an additive mask is wanted), dropout_p and relative_bias (whether
one is given)."""

import torch

from lmkern.backend import Native, Op, Reference, Triton

# The largest head dim of the Triton kernels, whose tiles hold whole rows of q, k and v.
TRITON_MAX_HEAD_DIM = 256
# What the native CUDA kernels take (csrc/cuda/attention.cpp).
NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16)
NATIVE_CUDA_HEAD_DIMS = (64, 128)


def depends_on_key_only(mask):
    """Whether a 4-D mask's values depend on the key only: (B, 1, 1, Lk), or broadcast from it."""
    return all(mask.shape[d] == 1 or mask.stride(d) == 0 for d in (1, 2))


def is_key_padding_mask(mask):
    """Whether a 4-D mask is a boolean (B, 1, 1, Lk) mask, or a view broadcast from one."""
    return mask.dtype == torch.bool and depends_on_key_only(mask)


def triton_limit(call):
    """Head dims up to 256."""
    if max(call.head_dims) > TRITON_MAX_HEAD_DIM:
        return f"its kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {max(call.head_dims)}"
    return None


def native_cuda_limit(dtype, head_dims, mask=None, dropout_p=0.0):
    """Why the native CUDA kernels cannot run a call of these, or None."""
    if dtype not in NATIVE_CUDA_DTYPES:
        return f"its CUDA kernels take float16 or bfloat16, got {dtype}"
    if head_dims[0] != head_dims[1] or head_dims[0] not in NATIVE_CUDA_HEAD_DIMS:
        return f"its CUDA kernels take head dims {NATIVE_CUDA_HEAD_DIMS} (the same for v), got {tuple(head_dims)}"
    if mask is not None and not is_key_padding_mask(mask):
        return "its CUDA kernels take only boolean key-padding masks (B, 1, 1, Lk)"
    if dropout_p > 0:
        return "its CUDA kernels have no dropout"
    return None


def native_limit(call):
    """On CUDA, fp16/bf16 at head dims 64 and 128, no mask or a boolean key-padding one
    (and so no mask gradient), no dropout, no relative_bias (the other calls go to Triton
    under auto). On CPU, relative_bias beside no mask or one that depends on the key only
    (both are read element by element otherwise); any mask without it, with an additive
    one's gradient."""
    if call.device_type != "cuda":
        if call.relative_bias and call.mask is not None and not depends_on_key_only(call.mask):
            return "its CPU kernels take relative_bias beside no attn_mask or a key-padding one (B, 1, 1, Lk)"
        return None
    if call.relative_bias:
        return "its CUDA kernels take no relative_bias (backend=\"triton\" does)"
    if call.mask_grad:
        return "its CUDA kernels take no additive mask, and so compute no gradient of attn_mask"
    return native_cuda_limit(call.dtype, call.head_dims, call.mask, call.dropout_p)


PACKAGE = "lmkern.ops.attention"
ATTENTION = Op("attention", Reference(PACKAGE), Triton(PACKAGE, triton_limit), Native(PACKAGE, native_limit))
