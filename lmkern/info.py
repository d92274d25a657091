"""What lmkern sees on this machine: versions, devices, and which backend can run each op
where, with the reason for each one that cannot. Run `python -m lmkern.info` first when
something is off."""

import os
import platform

import torch

import lmkern
from lmkern import backend


def _triton_version():
    if backend.triton_error():
        return "not installed"
    import triton

    return triton.__version__


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
    lines = []
    for op in backend.AUTO:
        for device_type in ("cpu", "cuda"):
            if device_type == "cuda" and not torch.cuda.is_available():
                lines.append(f"  {op} on cuda: no CUDA device; once there is one:")
            else:
                lines.append(f"  {op} on {device_type}: auto -> {backend.auto_backend(op, device_type)}")
            for name in backend.BACKENDS:
                reason = backend.unavailable_reason(name, op, device_type)
                lines.append(f"    {name:<7} {'yes' if reason is None else 'no: ' + reason}")
    return lines


def report():
    native = backend.native_error()
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
        "backends (float32 inputs):",
        *_backends(),
    ]
    return "\n".join(lines)


if __name__ == "__main__":
    print(report())
