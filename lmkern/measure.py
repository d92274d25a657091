"""Measuring a callable the same way everywhere (the demo, the benchmark suite, the
tests): its run time (median, 20th and 80th percentiles in ms, after warm-up) and the peak
memory it allocates.

Time on CUDA: triton.testing.do_bench, or do_bench_cudagraph, which replays the calls as
one CUDA graph so that launch overhead does not count. On CPU: torch.utils.benchmark.
Memory on CUDA: the caching allocator's peak. On CPU, which keeps no such statistic:
PeakMemory, which follows the tensor storages that ops create.
"""

import dataclasses
import statistics
import weakref

import torch
import torch.utils.benchmark
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


@dataclasses.dataclass(frozen=True)
class Timing:
    median_ms: float
    p20_ms: float
    p80_ms: float


def time_ms(fn, device, *, min_run_time=1.0, cuda_graph=False):
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


def peak_memory_bytes(fn, device):
    """Peak bytes allocated while fn() runs, above what was allocated before."""
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    with PeakMemory() as memory:
        fn()
    return memory.peak


class PeakMemory(TorchDispatchMode):
    """Peak bytes held by the tensor storages that ops inside the block create.

    Counts each storage once while any tensor made inside the block still refers to it,
    not storages made before the block that ops only view; what ops allocate and free
    internally is not seen.
    """

    def __init__(self):
        super().__init__()
        self._refs = {}
        self.current = 0
        self.peak = 0

    def _release(self, key, nbytes):
        self._refs[key] -= 1
        if self._refs[key] == 0:
            del self._refs[key]
            self.current -= nbytes

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        # A view of a storage made before the block (a reshape of an input) allocates nothing.
        outside = {
            t.untyped_storage().data_ptr() for t in tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)
        } - self._refs.keys()
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                storage = tensor.untyped_storage()
                key, nbytes = storage.data_ptr(), storage.nbytes()
                if key in outside:
                    continue
                if key not in self._refs:
                    self._refs[key] = 0
                    self.current += nbytes
                    self.peak = max(self.peak, self.current)
                self._refs[key] += 1
                weakref.finalize(tensor, self._release, key, nbytes)
        return out
