"""One package per public op, each with its autograd Function and public function in
__init__.py, its backends in backends.py (lmkern.backend), and their implementations:
reference.py, triton_kernels.py and native.py (an op built on another's kernels, like
linear_cross_entropy on cross_entropy's or rms_norm on layer_norm's, loads those)."""

import importlib

# The public ops, by their stem: lmkern/ops/<stem>/, tests/test_<stem>.py,
# benchmarks/bench_<stem>.py.
OPS = ("cross_entropy", "linear_cross_entropy", "layer_norm", "add_layer_norm", "rms_norm", "add_rms_norm",
       "linear_gelu", "ffn", "swiglu", "attention", "attention_with_kv_cache", "apply_rotary")
IMPLEMENTATIONS = ("reference", "triton_kernels", "native")


def lazy_submodules(package):
    """A module __getattr__ for an op package that imports its implementation submodules
    when first read, so that importing the package imports neither triton (triton_kernels)
    nor the extension (native)."""

    def __getattr__(name):
        if name in IMPLEMENTATIONS:
            return importlib.import_module(f"{package}.{name}")
        raise AttributeError(f"module {package!r} has no attribute {name!r}")

    return __getattr__
