"""The device's measured ceilings, against which the GPU check's summary puts each op: copy
bandwidth (a large device-to-device copy, bytes read plus written) for memory-bound ops,
and the matrix-product rate (one large square product through torch: bf16 on CUDA, fp32
on CPU) for compute-bound ones. Measured on random data, timed like the benchmarks.

    python -m benchmarks.ceilings --out FILE.json [--quick]
"""

import argparse
import json

import torch

from lmkern.measure import time_ms

from .harness import device_name


def measure(device, quick):
    """{"GB/s": copy bandwidth, "TFLOP/s": matrix-product rate, and what was measured}."""
    copy_bytes = 2**24 if quick else 2**31
    side = 256 if quick else 8192
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    source = torch.randn(copy_bytes // 4, device=device)
    target = torch.empty_like(source)
    copy = time_ms(lambda: target.copy_(source), device, min_run_time=0.05 if quick else 0.5)
    a, b = (torch.randn(side, side, device=device, dtype=dtype) for _ in range(2))
    matmul = time_ms(lambda: a @ b, device, min_run_time=0.05 if quick else 0.5)
    return {
        "device": device_name(device),
        "GB/s": 2 * copy_bytes / (copy.median_ms * 1e-3) / 1e9,
        "TFLOP/s": 2 * side**3 / (matmul.median_ms * 1e-3) / 1e12,
        "copy": f"{copy_bytes / 2**20:.0f} MiB copied",
        "matmul": f"{side}x{side}x{side} {str(dtype).removeprefix('torch.')}",
    }


def main(argv=None):
    parser = argparse.ArgumentParser(description="the device's copy bandwidth and matrix-product rate")
    parser.add_argument("--out", required=True, help="JSON file to write")
    parser.add_argument("--quick", action="store_true", help="small sizes: a smoke test")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")
    args = parser.parse_args(argv)
    ceilings = measure(args.device, args.quick)
    with open(args.out, "w") as file:
        json.dump(ceilings, file, indent=1)
    print(json.dumps(ceilings))


if __name__ == "__main__":
    main()
