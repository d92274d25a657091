"""The dispatch point: which implementation of an op runs a call.

Every op has three backends with one contract (lmkern/ops/<op>/):

    torch   the PyTorch reference (reference.py), runs anywhere
    triton  Triton kernels (triton_kernels.py): CUDA tensors, or CPU tensors under
            TRITON_INTERPRET=1 (slow, for tests)
    native  the compiled extension lmkern._C (native.py): C++ kernels for CPU tensors,
            CUDA kernels for CUDA tensors when built with CUDA

Each op declares its backends in lmkern/ops/<op>/backends.py, as an Op: per backend, how
to load its implementation, and what it cannot run beyond what every backend of its kind
checks (a triton backend: triton installed, a CUDA tensor or the interpreter; a native one:
the extension built, with kernels for the device; both: fp32, fp16 or bf16). Those limits
are functions of a Call: the device type and dtype of the call's tensors and the op's own
details (head dims, mask kind, row width...).

The backend asked for is, first that is set: the call's `backend=` argument, the innermost
`with lmkern.use_backend(...)`, the environment variable LMKERN_BACKEND, else "auto". An
explicit backend that cannot run the call raises BackendUnavailableError saying why and
what to do; "auto" takes the first backend of AUTO[op][device type] that can run it. A call
with nothing to compute (a zero-size dimension) runs on the reference whichever backend is
asked for: no kernel is launched for nothing.

Importing this module queries no device, imports no triton and loads no extension: the
first question about a Triton or native backend imports lmkern.triton_support or
lmkern.extension, which do. The questions and the loading are plain imports, dict lookups
and attribute reads, which torch.compile traces.
"""

import contextlib
import os
import sys
import threading

import torch

from lmkern.errors import BackendUnavailableError  # noqa: F401  (lmkern.BackendUnavailableError)

BACKENDS = ("torch", "triton", "native")
CHOICES = (*BACKENDS, "auto")

# What "auto" tries, in order, per op and device type, each order citing the benchmark
# result behind it (files in benchmarks/results/intel-xeon-processor-2-threads/, CPU, unless
# named otherwise). On CPU native is the fastest lmkern backend wherever it runs, and the
# torch reference the slowest: cross_entropy.json and linear_cross_entropy.json (native
# faster than torch eager); layer_norm.json and add_layer_norm.json (native forward+backward
# within a few per cent of torch eager, inside this shared 2-thread machine's run-to-run
# noise); amd-epyc-2-threads/linear_gelu.json and ffn.json (native 0.88x-1.27x torch eager
# by case, far ahead of the reference; the README's "On CPU" section says where and why
# below 1); amd-epyc-2-threads/attention.json (native
# forward+backward faster than torch's CPU flash SDPA in every case: head dims 32 to 128,
# causal or not, key padding, GQA, windows; with a learned bias and its gradient ahead of
# SDPA's math; O(L D) memory; the reference forms the whole
# score matrix); amd-epyc-2-threads/rms_norm.json and
# apply_rotary.json (native faster than torch eager and torch.compile in every case;
# add_rms_norm runs rms_norm's kernels); amd-epyc-2-threads/swiglu.json (native forward+backward
# 1.04x torch eager, SiLU and tanh GELU; level with the torch reference, whose matmuls are the
# same, in less memory); amd-epyc-2-threads/attention_with_kv_cache.json (native decoding faster than SDPA
# over the cache in every case, with and without rotary or a window); and the models, whose
# kernels="auto" runs these: amd-epyc-2-threads/bert_infer.json, gpt_train.json,
# llama_train.json, t5_train.json, gpt_generate.json and llama_generate.json (native, the
# same as auto, against transformers with the same weights and against kernels="torch").
# On CUDA the orders
# are placeholders (triton first; every kernel backend is exact) until a GPU result is cited
# here: no lmkern kernel has run on a GPU yet.
_CPU = ("native", "torch")
_CUDA = ("triton", "native", "torch")
AUTO = {
    op: {"cpu": _CPU, "cuda": _CUDA}
    for op in ("cross_entropy", "linear_cross_entropy", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm",
               "linear_gelu", "ffn", "swiglu", "attention", "attention_with_kv_cache", "apply_rotary")
}

# The kernels take these; float64 runs on the torch reference.
KERNEL_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
KERNEL_DTYPES_LIMIT = "its kernels take float32, float16 or bfloat16, got {}; use backend='torch'"


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


class Call:
    """A call as the backends see it: device_type, dtype, and the op's own details as
    attributes (those its backends' limits read)."""

    def __init__(self, device_type, dtype, **details):
        self.device_type, self.dtype = device_type, dtype
        self.__dict__.update(details)

    @classmethod
    def of(cls, tensor, **details):
        """The call whose device and dtype are those of `tensor`."""
        return cls(tensor.device.type, tensor.dtype, **details)


class Backend:
    """One backend of one op: its implementation is the submodule `module` of the op
    package `package` (imported when first loaded: see lmkern.ops.lazy_submodules);
    limit(call) says why it cannot run a call, beyond what every backend of its kind
    checks, or None."""

    name = None
    module = None

    def __init__(self, package, limit=None):
        self.package, self.limit = package, limit

    def load(self):
        """The implementation module. A lookup in sys.modules and an attribute read (which
        imports it the first time), both of which torch.compile traces."""
        return getattr(sys.modules[self.package], self.module)

    def unavailable(self, call):
        """Why this backend cannot run the call (a sentence saying what to do), or None."""
        return self.kind_limit(call) or (self.limit(call) if self.limit else None)

    def kind_limit(self, call):
        return None


class Reference(Backend):
    """The PyTorch reference: every device and dtype."""

    name = "torch"
    module = "reference"


class Triton(Backend):
    """Triton kernels: CUDA tensors, or CPU ones in the interpreter."""

    name = "triton"
    module = "triton_kernels"

    def kind_limit(self, call):
        if call.dtype not in KERNEL_DTYPES:
            return KERNEL_DTYPES_LIMIT.format(call.dtype)
        if call.device_type not in ("cuda", "cpu"):
            return f"triton runs on CUDA tensors, not {call.device_type}"
        from lmkern import triton_support

        if triton_support.ERROR:
            return triton_support.ERROR
        if call.device_type == "cpu" and not triton_support.interpreting():
            return (
                "triton runs CPU tensors only in its interpreter: set TRITON_INTERPRET=1 before triton is imported "
                "(slow; meant for tests), or move the tensors to CUDA"
            )
        return None


class Native(Backend):
    """The compiled extension: C++ kernels for CPU tensors, CUDA ones in a CUDA build."""

    name = "native"
    module = "native"

    def kind_limit(self, call):
        if call.dtype not in KERNEL_DTYPES:
            return KERNEL_DTYPES_LIMIT.format(call.dtype)
        from lmkern import extension

        if extension.ERROR:
            return extension.ERROR
        if extension.has_kernels(call.device_type):
            return None
        if call.device_type == "cuda":
            return (
                "lmkern._C has no CUDA kernels: rebuild it with a CUDA toolkit and a CUDA build of torch "
                "(`LMKERN_BUILD_CUDA=1 pip install --no-build-isolation -e .`)"
            )
        return f"lmkern._C has no kernels for {call.device_type} tensors"


# Every Op by name, as the op packages declare them (importing lmkern imports them all).
OPS = {}


class Op:
    """An op's three backends and its entry in AUTO: resolve() picks the one that runs a
    call, implementation() loads it."""

    def __init__(self, name, reference, triton, native):
        self.name = name
        self.backends = {backend.name: backend for backend in (reference, triton, native)}
        assert list(self.backends) == list(BACKENDS), self.backends
        OPS[name] = self

    def unavailable(self, name, call):
        """Why backend `name` cannot run the call, or None."""
        return self.backends[name].unavailable(call)

    def auto(self, call):
        """What "auto" picks for the call: the first backend of AUTO that can run it."""
        for name in AUTO[self.name].get(call.device_type, ("torch",)):
            if self.unavailable(name, call) is None:
                return name
        return "torch"

    def resolve(self, call, backend=None, empty=False):
        """The name of the backend that runs the call. backend: the call's own request (see
        requested_backend). empty: the call has nothing to compute, and runs on the
        reference once the backend asked for is known to exist."""
        name = requested_backend(backend)
        if name == "auto":
            name = self.auto(call)
        else:
            reason = self.unavailable(name, call)
            if reason is not None:
                raise BackendUnavailableError(
                    f"lmkern.{self.name}: backend {name!r} cannot run on a {call.device_type} {call.dtype} tensor: "
                    f"{reason}"
                )
        return "torch" if empty else name

    def implementation(self, name):
        """Backend `name`'s implementation, loaded."""
        return self.backends[name].load()


def unavailable_reason(name, op, device_type, dtype=torch.float32):
    """Why backend `name` cannot run lmkern.<op> on tensors of this device type and dtype at
    all (its kind's checks, before any call's own limits), or None: for the command line,
    lmkern info, the benchmarks and the tests."""
    return OPS[op].backends[name].kind_limit(Call(device_type, dtype))
