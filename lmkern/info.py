"""What lmkern sees on this machine: versions, devices, and which backend can run each op
where, with the reason for each one that cannot. Run `python -m lmkern.info` first when
something is off."""

import os
import platform

import torch

import lmkern
from lmkern import backend


def _triton_version():
    from lmkern import triton_support

    return triton_support.ERROR or triton_support.triton.__version__


def _devices():
    lines = [f"  cpu: {platform.machine()}, {torch.get_num_threads()} threads"]
    if not torch.cuda.is_available():
        lines.append("  cuda: none visible (torch.cuda.is_available() is False)")
    for index in range(torch.cuda.device_count()):
        props = torch.cuda.get_device_properties(index)
        lines.append(
            f"  cuda:{index}: {props.name}, compute capability {props.major}.{props.minor}, "
            f"{props.total_memory / 2**30:.0f} GiB"
        )
    return lines


def _backends():
    """Per op and device type: what auto picks for float32 tensors, and per backend whether
    it runs there (and why not) and the limits it declares for particular calls."""
    lines = []
    for op in backend.OPS.values():
        for device_type in ("cpu", "cuda"):
            call = backend.Call(device_type, torch.float32)
            order = backend.AUTO[op.name][device_type]
            usable = [name for name in order if op.backends[name].kind_limit(call) is None]
            auto = f"auto -> {usable[0]} (order: {', '.join(order)})"
            where = "no CUDA device; once there is one" if device_type == "cuda" and not torch.cuda.is_available() else ""
            lines.append(f"  {op.name} on {device_type}: {where + ': ' if where else ''}{auto}")
            for name, declared in op.backends.items():
                reason = declared.kind_limit(call)
                limit = f"; limits: {' '.join(declared.limit.__doc__.split())}" if declared.limit and reason is None else ""
                lines.append(f"    {name:<7} {'yes' + limit if reason is None else 'no: ' + reason}")
    return lines


def report():
    from lmkern import extension

    native = extension.ERROR
    lines = [
        f"lmkern  {lmkern.__version__}",
        f"python  {platform.python_version()}",
        f"torch   {torch.__version__} (CUDA {torch.version.cuda or 'none: a CPU build'})",
        f"triton  {_triton_version()}",
        f"lmkern._C  {'loaded' if native is None else 'not available: ' + native}",
        f"LMKERN_BACKEND={os.environ.get('LMKERN_BACKEND', '')!r}  "
        f"TRITON_INTERPRET={os.environ.get('TRITON_INTERPRET', '')!r}",
        "devices:",
        *_devices(),
        "backends (float32 inputs; limits: what a backend declares it does not take, and auto then skips):",
        *_backends(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
