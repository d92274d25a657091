"""The backends of lmkern.scaled_dot_product_attention (see lmkern.backend). Its calls carry
head_dims (q's and v's), mask (4-D, broadcastable to (B, H, Lq, Lk), or None), mask_grad
(whether the gradient of an additive mask is wanted), dropout_p, relative_bias (whether
one is given), windowed (whether a sliding window bounds it) and backward (whether an
input requires grad, with grad mode on)."""

import torch

from lmkern.backend import Native, Op, Reference, Triton

# The largest head dim of the Triton kernels, whose tiles hold whole rows of q, k and v.
TRITON_MAX_HEAD_DIM = 256
# Above it, the float32 backward's exact tiles fit the registers only without a mask read
# per element, dropout or a window.
TRITON_FP32_FULL_BWD_MAX_HEAD_DIM = 128
# What the native CUDA kernels take (csrc/cuda/attention.cpp).
NATIVE_CUDA_DTYPES = (torch.float16, torch.bfloat16)
NATIVE_CUDA_HEAD_DIMS = (64, 128)


def depends_on_key_only(mask):
    """Whether a 4-D mask's values depend on the key only: (B, 1, 1, Lk), or broadcast from it."""
    return all(mask.shape[d] == 1 or mask.stride(d) == 0 for d in (1, 2))


def is_key_padding_mask(mask):
    """Whether a 4-D mask is a boolean (B, 1, 1, Lk) mask, or a view broadcast from one."""
    return mask.dtype == torch.bool and depends_on_key_only(mask)


def varies_by_query(mask):
    """Whether a 4-D mask's values depend on the query (the kernels then read it per element)."""
    return mask.shape[2] != 1 and mask.stride(2) != 0


def triton_limit(call):
    """Head dims up to 256; on CUDA, a float32 backward with a mask that varies by query (an
    element-wise attn_mask, or relative_bias), dropout or a window up to
    TRITON_FP32_FULL_BWD_MAX_HEAD_DIM. scripts/triton_check.py checks this against what the
    kernels' pruners keep."""
    head_dim = max(call.head_dims)
    if head_dim > TRITON_MAX_HEAD_DIM:
        return f"its kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {head_dim}"
    per_element = call.relative_bias or (call.mask is not None and varies_by_query(call.mask))
    extras = per_element or call.dropout_p > 0 or call.windowed
    if (call.device_type == "cuda" and call.backward and call.dtype == torch.float32 and extras
            and head_dim > TRITON_FP32_FULL_BWD_MAX_HEAD_DIM):
        return (f"its float32 backward at head dims over {TRITON_FP32_FULL_BWD_MAX_HEAD_DIM} takes no element-wise "
                f"attn_mask, relative_bias, dropout or window (no tile fits the registers beside them), got head "
                f"dim {head_dim}")
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
