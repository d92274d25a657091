"""The dispatch point: which implementation of an op runs a given call.

Every op has three implementations with one contract (see lmkern/ops/<op>/):

    torch   the PyTorch reference (reference.py), runs anywhere
    triton  Triton kernels (triton_kernels.py): CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1 (slow, for tests)
    native  the compiled extension lmkern._C (native.py): C++ kernels for CPU tensors,
            CUDA kernels for CUDA tensors when built with CUDA

The backend asked for is, first that is set: the call's `backend=` argument, the innermost
`with lmkern.use_backend(...)`, the environment variable LMKERN_BACKEND, else "auto". An
explicit backend that cannot run the call raises BackendUnavailableError saying why and
what to do; "auto" takes the first backend in AUTO that can run it. Besides the op, device
and dtype, a call may name limits of its own: backends that cannot run that call (say, a
gradient that only the reference computes), with the reason.

Importing this module queries no device and does not import triton.
"""

import contextlib
import importlib
import os
import sys
import threading

import torch

BACKENDS = ("torch", "triton", "native")
CHOICES = (*BACKENDS, "auto")

# What "auto" tries, in order, per op and device type, each order citing the benchmark
# result behind it (files in benchmarks/results/intel-xeon-processor-2-threads/, CPU).
# On CPU native is the fastest lmkern backend wherever it runs, and the torch reference the
# slowest: cross_entropy.json (native faster than torch eager); layer_norm.json,
# add_layer_norm.json, linear_gelu.json and ffn.json (native forward+backward within a few
# per cent of torch eager, inside this shared 2-thread machine's run-to-run noise);
# attention.json (native forward+backward within 1.4x of torch's CPU flash SDPA, O(L D)
# memory; the reference forms the whole score matrix) and attention_with_kv_cache.json.
# On CUDA the orders are placeholders (triton first; every kernel backend is exact) until
# a GPU result is cited here: no lmkern kernel has run on a GPU yet. For attention the
# per-call limits in lmkern/ops/attention keep what the native CUDA kernels do not take
# away from native.
AUTO = {
    "cross_entropy": {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")},
    "layer_norm": {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")},
    "linear_gelu": {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")},
    "attention": {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")},
    "attention_with_kv_cache": {"cpu": ("native", "torch"), "cuda": ("triton", "native", "torch")},
}

# The kernels take these; float64 runs on the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)

_MODULES = {"torch": "reference", "triton": "triton_kernels", "native": "native"}


class BackendUnavailableError(RuntimeError):
    """An explicitly requested backend cannot run the call."""


class _Requested(threading.local):
    # A plain per-thread stack rather than a ContextVar, because torch.compile traces
    # (and guards on) attribute reads of a threading.local but not ContextVar.get.
    def __init__(self):
        self.stack = []


_requested = _Requested()


def _check_choice(name, source):
    if name not in CHOICES:
        raise ValueError(f"{source} must be one of {', '.join(map(repr, CHOICES))}, got {name!r}")


@contextlib.contextmanager
def use_backend(name):
    """Run lmkern ops inside the block on backend `name` ("torch", "triton", "native" or "auto")."""
    _check_choice(name, "use_backend(name)")
    _requested.stack.append(name)
    try:
        yield
    finally:
        _requested.stack.pop()


def requested_backend(backend=None):
    """The backend asked for: `backend`, else the innermost use_backend, else $LMKERN_BACKEND, else "auto"."""
    if backend is not None:
        _check_choice(backend, "backend")
        return backend
    if _requested.stack:
        return _requested.stack[-1]
    from_env = os.environ.get("LMKERN_BACKEND", "") or "auto"
    _check_choice(from_env, "the environment variable LMKERN_BACKEND")
    return from_env


def constant_under_compile(fn):
    """What torch.compiler.assume_constant_result does, without importing torch._dynamo
    (which takes seconds and imports triton): torch.compile calls fn while tracing and
    keeps its result. tests/test_backend.py checks that torch still marks functions so."""
    fn._dynamo_marked_constant = True
    return fn


_import_errors = {}


@constant_under_compile
def import_error(module):
    """None if `module` imports, else the ImportError's message; tried once per process."""
    if module not in _import_errors:
        try:
            importlib.import_module(module)
            _import_errors[module] = None
        except ImportError as error:
            _import_errors[module] = str(error)
    return _import_errors[module]


def triton_error():
    """None if triton imports, else why not and what to do."""
    error = import_error("triton")
    return error and f"triton is not installed ({error}); install it with `pip install triton`"


def native_error():
    """None if the extension lmkern._C loads (registering its ops), else why not and what to do."""
    error = import_error("lmkern._C")
    return error and (
        f"the extension lmkern._C is not built or does not load ({error}); build it from the "
        "repository root with `pip install --no-build-isolation -e .`"
    )


def triton_interpreting():
    """Whether Triton runs kernels in its CPU interpreter (TRITON_INTERPRET=1)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "on", "yes")


# What is installed and built does not change within a process.
@constant_under_compile
def unavailable_reason(name, op, device_type, dtype=None):
    """None if backend `name` can run `op` on tensors of this device type and dtype, else why not."""
    if name == "torch":
        return None
    if dtype is not None and dtype not in KERNEL_DTYPES:
        return f"its kernels take float32, float16 or bfloat16, got {dtype}; use backend='torch'"
    if name == "triton":
        if device_type not in ("cuda", "cpu"):
            return f"triton runs on CUDA tensors, not {device_type}"
        if triton_error():
            return triton_error()
        if device_type == "cpu" and not triton_interpreting():
            return (
                "triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before "
                "triton is imported (slow; meant for tests), or move the tensors to CUDA"
            )
        return None
    if native_error():
        return native_error()
    dispatch_key = {"cpu": "CPU", "cuda": "CUDA"}.get(device_type)
    if dispatch_key is None or not torch._C._dispatch_has_kernel_for_dispatch_key(
        f"lmkern::{op}_fwd", dispatch_key
    ):
        if device_type == "cuda":
            return (
                f"lmkern._C has no CUDA kernel for {op}: rebuild it with a CUDA toolkit and a "
                "CUDA build of torch (`LMKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .`)"
            )
        return f"lmkern._C has no {device_type} kernel for {op}"
    return None


def auto_backend(op, device_type, dtype=None, limits=None):
    """What "auto" picks for `op` on this device type and dtype, skipping the backends in `limits`."""
    for candidate in AUTO[op].get(device_type, ("torch",)):
        if candidate not in (limits or {}) and unavailable_reason(candidate, op, device_type, dtype) is None:
            return candidate
    return "torch"


def resolve(op, tensor, backend=None, limits=None, empty=False):
    """The backend that runs `op` on `tensor` (an input that fixes device and dtype).

    limits: {backend name: why it cannot run this call}, for what a backend lacks beyond
    the op, device and dtype; "torch" must not be limited (it is the fallback).
    empty: the call has nothing to compute (a zero-size dimension). It runs on the torch
    reference whatever backend is asked for (once that backend is known to exist): no
    kernel is launched for nothing, and a GPU launch of no blocks would be an error.
    """
    name = requested_backend(backend)
    device_type, dtype = tensor.device.type, tensor.dtype
    if name == "auto":
        name = auto_backend(op, device_type, dtype, limits)
    else:
        reason = (limits or {}).get(name) or unavailable_reason(name, op, device_type, dtype)
        if reason is not None:
            raise BackendUnavailableError(
                f"lmkern.{op}: backend {name!r} cannot run on a {device_type} {dtype} tensor: {reason}"
            )
    return "torch" if empty else name


def implementation(op_package, name):
    """The module of backend `name` in an op's package, e.g. lmkern.ops.cross_entropy.reference."""
    module = f"{op_package}.{_MODULES[name]}"
    error = import_error(module)
    if error is not None:
        raise ImportError(error)
    # sys.modules rather than importlib, which torch.compile does not trace.
    return sys.modules[module]
