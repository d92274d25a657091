"""The backends of lmkern.apply_rotary (see lmkern.backend). Their calls carry `head_dim`,
the last dimension of x (D), and `rotary_dim`, the part of it that is rotated."""

from lmkern.backend import Native, Op, Reference, Triton

# The widest head the Triton kernel holds in one block of registers, in elements; the C++
# and CUDA kernels take heads of any width.
MAX_TRITON_HEAD_DIM = 4096


def triton_head_limit(call):
    """Heads of up to 4096 elements."""
    if call.head_dim > MAX_TRITON_HEAD_DIM:
        return f"its kernel holds heads of up to {MAX_TRITON_HEAD_DIM} elements, got head_dim {call.head_dim}"
    return None


PACKAGE = "lmkern.ops.apply_rotary"
APPLY_ROTARY = Op("apply_rotary", Reference(PACKAGE), Triton(PACKAGE, triton_head_limit), Native(PACKAGE))
