"""The benchmark suite's cases as pytest-benchmark tests (see conftest.py)."""

import pytest
import torch

from benchmarks.harness import pass_functions


def test_pass(benchmark, bench):
    module, case, provider, pass_name, device = bench
    if provider.run is None:
        pytest.skip(provider.absent)
    run = pass_functions(module, case, provider, device, module.dtype(device))[pass_name]

    def synchronized():
        run()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(synchronized)
