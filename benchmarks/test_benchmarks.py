"""The benchmark suite's cases as pytest-benchmark tests (see conftest.py)."""

import pytest
import torch

from .harness import absent_reason, pass_functions


def test_pass(benchmark, bench, request):
    module, case, provider, pass_name, device = bench
    absent = absent_reason(provider, request.config.getoption("--quick"), case)
    if absent:
        pytest.skip(absent)
    run = pass_functions(module, case, provider, device, module.dtype(device))[pass_name]

    def synchronized():
        run()
        if device == "cuda":
            torch.cuda.synchronize()

    benchmark(synchronized)
