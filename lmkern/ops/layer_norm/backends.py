"""The backends of lmkern.layer_norm and lmkern.add_layer_norm (see lmkern.backend). Their
calls carry `width`, the elements of a row (the product of normalized_shape)."""

from lmkern.backend import Native, Op, Reference, Triton

# The widest row, in bytes, that the GPU kernels (Triton's, anywhere, and the native CUDA
# ones) hold in registers; the C++ kernels take rows of any width.
MAX_GPU_ROW_BYTES = 65536


def row_limit(call):
    """Rows of up to 64 KiB (16,384 fp32 or 32,768 fp16/bf16 elements)."""
    row_bytes = call.width * call.dtype.itemsize
    if row_bytes > MAX_GPU_ROW_BYTES:
        return (f"its kernels hold rows of up to {MAX_GPU_ROW_BYTES} bytes, got {call.width} {call.dtype} "
                f"elements ({row_bytes} bytes)")
    return None


def cuda_row_limit(call):
    """On CUDA, rows of up to 64 KiB (16,384 fp32 or 32,768 fp16/bf16 elements)."""
    return row_limit(call) if call.device_type == "cuda" else None


PACKAGE = "lmkern.ops.layer_norm"
LAYER_NORM = Op("layer_norm", Reference(PACKAGE), Triton(PACKAGE, row_limit), Native(PACKAGE, cuda_row_limit))
ADD_LAYER_NORM = Op("add_layer_norm", Reference(PACKAGE), Triton(PACKAGE, row_limit),
                    Native(PACKAGE, cuda_row_limit))
