"""`pytest benchmarks/ --benchmark-only [--quick]`: the suite's cases through pytest-benchmark,
one test per op, case, provider and pass."""

import pytest
import torch

from .harness import op_passes
from .run import OPS


def pytest_addoption(parser):
    parser.addoption("--quick", action="store_true", help="the benchmark suite's small sizes")


def pytest_generate_tests(metafunc):
    if "bench" not in metafunc.fixturenames:
        return
    device = "cuda" if torch.cuda.is_available() else "cpu"
    quick = metafunc.config.getoption("--quick")
    params = []
    for module in OPS.values():
        providers = module.providers(device, module.dtype(device))
        for case in module.cases(device, quick):
            for provider in providers:
                for pass_name in op_passes(module):
                    params.append(
                        pytest.param(
                            (module, case, provider, pass_name, device),
                            id=f"{module.OP}-{module.label(case)}-{provider.name}-{pass_name}".replace(" ", "_"),
                        )
                    )
    metafunc.parametrize("bench", params)
