"""Whether Triton is here: importing this module imports triton, which the Triton backend
does when it is first asked about a call (importing lmkern does not)."""

import os

try:
    import triton
except ImportError as error:
    triton = None
    ERROR = f"triton is not installed ({error}); install it with `pip install triton`"
else:
    ERROR = None


def interpreting():
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")
