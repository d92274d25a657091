"""The compiled extension lmkern._C, loaded when this module is imported: importing it
registers the ops' schemas and their CPU (and, in a CUDA build, CUDA) kernels with torch.
The native backend imports this module when it is first asked about a call, and each
op's native.py imports it before registering its ops' fake implementations."""

try:
    from lmkern import _C
except ImportError as error:
    _C = None
    ERROR = (
        f"the extension lmkern._C is not built or does not load ({error}); build it from the repository root "
        "with `pip install --no-build-isolation -e .`"
    )
else:
    ERROR = None


def has_kernels(device_type):
    """Whether the extension holds kernels for tensors of this device type (CUDA: when it
    was built with CUDA)."""
    if _C is None:
        return False
    return device_type == "cpu" or (device_type == "cuda" and bool(_C.with_cuda))


def require():
    """Raises ImportError, saying how to build it, when the extension does not load."""
    if ERROR is not None:
        raise ImportError(ERROR)
