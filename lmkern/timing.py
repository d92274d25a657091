"""Timing a callable the same way everywhere (the demo, the benchmark suite): the median
and the 20th and 80th percentiles of its run time, in milliseconds, after warm-up.

On CUDA: triton.testing.do_bench (or do_bench_cudagraph, which replays the calls as one
CUDA graph so that launch overhead does not count). On CPU: torch.utils.benchmark.
"""

import dataclasses
import statistics

import torch
import torch.utils.benchmark


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def measure(fn, device, *, min_run_time=1.0, cuda_graph=False):
    """Times fn() on `device` ("cpu" or "cuda"); min_run_time (seconds) bounds CPU timing."""
    if torch.device(device).type == "cuda":
        import triton.testing

        if cuda_graph:
            median, p20, p80 = triton.testing.do_bench_cudagraph(fn, quantiles=[0.5, 0.2, 0.8])
        else:
            median, p20, p80 = triton.testing.do_bench(fn, quantiles=[0.5, 0.2, 0.8])
        return Timing(median, p20, p80)
    fn()  # warm-up
    runs = torch.utils.benchmark.Timer(stmt="fn()", globals={"fn": fn}).blocked_autorange(min_run_time=min_run_time)
    times_ms = [t * 1e3 for t in runs.times]
    if len(times_ms) < 2:
        return Timing(times_ms[0], times_ms[0], times_ms[0])
    deciles = statistics.quantiles(times_ms, n=10, method="inclusive")
    return Timing(statistics.median(times_ms), deciles[1], deciles[7])
