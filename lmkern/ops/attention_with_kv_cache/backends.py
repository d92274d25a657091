"""The backends of lmkern.attention_with_kv_cache (see lmkern.backend). Its calls carry
head_dims (q's and the value cache's) and caches_aligned (whether both caches' strides are
multiples of 8 elements)."""

from lmkern.backend import Native, Op, Reference, Triton
from lmkern.ops.attention.backends import TRITON_MAX_HEAD_DIM, native_cuda_limit


def triton_limit(call):
    """Head dims up to 256."""
    if max(call.head_dims) > TRITON_MAX_HEAD_DIM:
        return f"its kernels take head dims up to {TRITON_MAX_HEAD_DIM}, got {max(call.head_dims)}"
    return None


def native_limit(call):
    """On CUDA, fp16/bf16 at head dims 64 and 128, and caches whose rows are 16-byte
    aligned (they are written in place, so they cannot be copied into alignment)."""
    if call.device_type != "cuda":
        return None
    if not call.caches_aligned:
        return "its CUDA kernels need the caches' strides to be multiples of 8 elements"
    return native_cuda_limit(call.dtype, call.head_dims)


PACKAGE = "lmkern.ops.attention_with_kv_cache"
ATTENTION_WITH_KV_CACHE = Op(
    "attention_with_kv_cache", Reference(PACKAGE), Triton(PACKAGE, triton_limit), Native(PACKAGE, native_limit)
)
