"""The harness every benchmarks/bench_<op>.py uses: providers, the three passes, timing
and memory, throughput against the device's peak, and the result record.

An op's benchmark module defines:

    OP          the op's name, e.g. "cross_entropy"
    METRIC      "GB/s" for a memory-bound op, "TFLOP/s" for a compute-bound one
    cases(device, quick)              the sizes: a list of dicts
    label(case)                       a short name for a case, e.g. "8192x50257"
    dtype(device)                     the dtype it runs in there
    make_inputs(case, device, dtype)  a tuple of tensors (requires_grad where trained)
    providers(device, dtype)          a list of Provider
    work(case, dtype, pass_name)      bytes moved (GB/s) or FLOPs (TFLOP/s) in that pass

and optionally:

    PASSES      the passes it is timed in, if not all three: ("fwd",) for a forward-only op
    CUDA_GRAPH  True to time it on CUDA as one CUDA graph (launch overhead not counted)
    ITEMS, items(case, pass_name)     what a pass processes ("tokens", "sequences") and how
                                      many, reported as a rate (tokens/s) beside the throughput
    pass_functions(case, provider, device, dtype)
                {pass name: a callable running that pass once}, for an op that is not one
                function of its inputs (a whole model, which the module builds per provider;
                benchmarks/bench_models.py); make_inputs is then not needed
"""

import dataclasses
import datetime
import os
import platform
import re
import subprocess
import traceback

import torch
import torch._functorch.config

import lmkern
from lmkern import backend
from lmkern.measure import peak_memory_bytes, time_ms

HERE = os.path.dirname(os.path.abspath(__file__))

PASSES = ("fwd", "bwd", "fwd+bwd")


def op_passes(module):
    """The passes an op is timed in; the last is its headline (plot, README, memory)."""
    return getattr(module, "PASSES", PASSES)

# Peaks of known devices (DESIGN.md): dense bf16 TFLOP/s and memory TB/s, by the name
# torch.cuda.get_device_name gives. Unknown devices get no "% of peak".
DEVICE_PEAKS = {
    "NVIDIA H100 80GB HBM3": {"TFLOP/s": 989.0, "GB/s": 3350.0},  # H100 SXM
    "NVIDIA H200": {"TFLOP/s": 989.0, "GB/s": 4800.0},
    "NVIDIA A100-SXM4-80GB": {"TFLOP/s": 312.0, "GB/s": 2000.0},
}


@dataclasses.dataclass
class Provider:
    """One implementation to time: run(*inputs) returns the output whose backward is timed
    (for an op with its own pass_functions, run is what that takes: bench_models.py's
    builds the model)."""

    name: str
    run: object = None
    absent: str = None  # why it cannot run here; run is None then
    slow: str = None  # why --quick leaves it out (too slow for a smoke test)
    # For a provider that only some cases concern (e.g. an unfused composition beside a
    # fused option), or that cannot run some: (predicate on the case, why the other cases
    # leave it out: a string, or a function of the case giving it).
    only_for: tuple = None


def absent_reason(provider, quick, case=None):
    """Why a provider is not measured in this run (on this case), or None."""
    if provider.run is None:
        return provider.absent
    if quick and provider.slow:
        return f"left out of --quick runs: {provider.slow}"
    if provider.only_for is not None and case is not None and not provider.only_for[0](case):
        reason = provider.only_for[1]
        return reason(case) if callable(reason) else reason
    return None


def compiled_provider(function):
    """torch.compile of the same eager code. Its backward keeps its buffers (no donation,
    set for the whole benchmark process) so that backward can be timed alone with
    retain_graph; its peak memory may read a little high for it."""
    torch._functorch.config.donated_buffer = False
    return Provider("torch.compile", torch.compile(function))


def backend_unavailable(name, ops, device, dtype):
    """Why lmkern backend `name` ("auto" included) cannot be timed running the kernels of
    `ops` (lmkern op names) on this device and dtype, or None."""
    if name == "auto":
        return None
    if name == "triton" and device == "cpu":
        return "Triton runs CPU tensors only in its interpreter, whose timings mean nothing"
    return next(filter(None, (backend.unavailable_reason(name, op, device, dtype) for op in ops)), None)


def lmkern_providers(op, device, dtype, function):
    """A provider per lmkern backend: function(*inputs, backend=name); op names the
    op whose availability decides."""
    providers = []
    for name in backend.BACKENDS:
        reason = backend_unavailable(name, (op,), device, dtype)
        run = None if reason else (lambda *inputs, name=name: function(*inputs, backend=name))
        providers.append(Provider(f"lmkern {name}", run, reason))
    return providers


def optional_provider(name, device, load):
    """A provider from another library: load() returns its run function and may raise ImportError."""
    if device != "cuda":
        return Provider(name, absent="runs on CUDA only")
    try:
        return Provider(name, load())
    except ImportError as error:
        return Provider(name, absent=f"not importable ({error})")


def device_name(device):
    if device == "cuda":
        return torch.cuda.get_device_name()
    with open("/proc/cpuinfo") as cpuinfo:
        model = next((line.split(":", 1)[1].strip() for line in cpuinfo if line.startswith("model name")), "")
    return f"{model or platform.machine()} ({torch.get_num_threads()} threads)"


def device_slug(name):
    """A folder name for a device: lowercase words joined by '-'."""
    words = re.sub(r"\(r\)|\(tm\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", words).strip("-")


def stamp(device):
    """When, what code and what machine a result comes from (the commit of the checkout the
    suite runs from, whatever the working directory)."""
    try:
        git = dict(capture_output=True, text=True, cwd=HERE)
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], **git).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], **git)
        commit += "+changes" if dirty.stdout.strip() else ""
    except OSError:
        commit = "unknown"
    from lmkern import triton_support

    triton_version = "not installed" if triton_support.ERROR else triton_support.triton.__version__
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": commit or "unknown",
        "device": device_name(device),
        "versions": {
            "python": platform.python_version(),
            "torch": torch.__version__,
            "cuda": torch.version.cuda,
            "triton": triton_version,
            "lmkern": lmkern.__version__,
        },
    }


def throughput(module, case, dtype, pass_name, median_ms, device):
    """(value in module.METRIC, % of the device's peak or None)."""
    per_second = module.work(case, dtype, pass_name) / (median_ms * 1e-3)
    value = per_second / (1e9 if module.METRIC == "GB/s" else 1e12)
    peaks = DEVICE_PEAKS.get(device_name(device)) if device == "cuda" else None
    # The TFLOP/s peak is for bf16/fp16 tensor cores; fp32 work has another.
    if peaks is None or (module.METRIC == "TFLOP/s" and dtype == torch.float32):
        return value, None
    return value, 100.0 * value / peaks[module.METRIC]


def pass_functions(module, case, provider, device, dtype):
    """{pass name: a callable running that pass once} for one provider on one case."""
    if hasattr(module, "pass_functions"):
        return module.pass_functions(case, provider, device, dtype)
    inputs = module.make_inputs(case, device, dtype)
    if op_passes(module) == ("fwd",):
        return {"fwd": lambda: provider.run(*inputs)}
    leaves = [t for t in inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    output = provider.run(*inputs)
    grad_output = torch.randn_like(output)

    def clear_grads():
        for leaf in leaves:
            leaf.grad = None

    def backward():
        clear_grads()
        output.backward(grad_output, retain_graph=True)

    def forward_backward():
        clear_grads()
        provider.run(*inputs).backward(grad_output)

    return {"fwd": lambda: provider.run(*inputs), "bwd": backward, "fwd+bwd": forward_backward}


def measure_provider(module, case, provider, device, dtype, min_run_time):
    """Rows (one per pass) for one provider on one case; the peak memory is that of the
    headline pass (forward+backward, or forward for a forward-only op)."""
    functions = pass_functions(module, case, provider, device, dtype)
    passes = op_passes(module)
    cuda_graph = getattr(module, "CUDA_GRAPH", False)
    rows = []
    for pass_name in passes:
        timing = time_ms(functions[pass_name], device, min_run_time=min_run_time, cuda_graph=cuda_graph)
        value, percent = throughput(module, case, dtype, pass_name, timing.median_ms, device)
        rows.append(
            dict(pass_name=pass_name, median_ms=timing.median_ms, p20_ms=timing.p20_ms, p80_ms=timing.p80_ms,
                 throughput=value, percent_of_peak=percent)
        )
        if hasattr(module, "items"):
            rows[-1]["rate"] = module.items(case, pass_name) / (timing.median_ms * 1e-3)
    memory = peak_memory_bytes(functions[passes[-1]], device) / 2**20
    for row in rows:
        row["fwd_bwd_peak_mib"] = memory
    return rows


def run_op(module, device, quick, log=print, cases=None):
    """Measures every provider on every case of an op (or on `cases`, a selection of them);
    returns the result record."""
    dtype = module.dtype(device)
    min_run_time = 0.05 if quick else 0.5
    providers = module.providers(device, dtype)
    rows = []
    for case in module.cases(device, quick) if cases is None else cases:
        for provider in providers:
            base = dict(case=case, label=module.label(case), provider=provider.name)
            absent = absent_reason(provider, quick, case)
            if absent:
                rows.append(dict(base, absent=absent))
                continue
            try:
                measured = measure_provider(module, case, provider, device, dtype, min_run_time)
            except torch.OutOfMemoryError:  # a measurement: this size does not fit this provider
                log(f"{module.OP} {base['label']} {provider.name}: out of memory")
                rows.append(dict(base, absent="out of memory"))
                torch.cuda.empty_cache()
                continue
            except Exception as error:  # recorded, and the run fails at its end (benchmarks/run.py)
                log(f"{module.OP} {base['label']} {provider.name}: {type(error).__name__}: {error}")
                log(traceback.format_exc(limit=3))
                rows.append(dict(base, error=f"{type(error).__name__}: {str(error)[:300]}"))
                continue
            rows.extend(dict(base, **row) for row in measured)
            headline = measured[-1]
            rate = f"{headline['rate']:11.1f} {module.ITEMS}/s  " if "rate" in headline else ""
            log(f"{module.OP:<22} {base['label']:<22} {provider.name:<16} {headline['pass_name']} "
                f"{headline['median_ms']:9.3f} ms {headline['throughput']:9.1f} {module.METRIC}  {rate}"
                f"peak {headline['fwd_bwd_peak_mib']:.0f} MiB")
    rate_unit = {"rate_unit": f"{module.ITEMS}/s"} if hasattr(module, "items") else {}
    return dict(op=module.OP, metric=module.METRIC, **rate_unit, dtype=str(dtype).removeprefix("torch."),
                quick=quick, passes=list(op_passes(module)), device_slug=device_slug(device_name(device)),
                **stamp(device), rows=rows)


def best_by_provider(result, pass_name="fwd+bwd"):
    """{case label: {provider: throughput}} for one pass."""
    table = {}
    for row in result["rows"]:
        if row.get("pass_name") == pass_name:
            table.setdefault(row["label"], {})[row["provider"]] = row["throughput"]
    return table

