"""The counter-based random stream: lmkern.philox in torch draws exactly what Triton's
tl.rand draws, and is uniform."""

import os
import shutil
import subprocess

import pytest
import torch
import triton
import triton.language as tl
from conftest import require

from lmkern import philox

CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc")


@triton.jit
def _rand_kernel(out_ptr, offsets_ptr, seed, n, BLOCK: tl.constexpr):
    index = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = index < n
    offsets = tl.load(offsets_ptr + index, mask=mask, other=0)
    tl.store(out_ptr + index, tl.rand(seed, offsets), mask=mask)


def test_uniform_is_triton_rand():
    require("triton", "cpu", torch.float32, "cross_entropy")
    offsets = torch.cat([torch.arange(1000), torch.tensor([2**31 - 1, 2**32 + 5, 2**40 + 123])])
    for seed in (0, 1, 12345, 2**40 + 7):
        expected = torch.empty(offsets.shape, dtype=torch.float32)
        _rand_kernel[(triton.cdiv(len(offsets), 256),)](expected, offsets, seed, len(offsets), BLOCK=256)
        torch.testing.assert_close(philox.uniform(seed, offsets), expected, rtol=0, atol=0)


def test_uniform_is_uniform_and_reproducible():
    offsets = torch.arange(200_000)
    values = philox.uniform(philox.draw_seed(), offsets)
    assert 0.0 <= values.min() and values.max() < 1.0
    histogram = torch.histc(values, bins=10, min=0.0, max=1.0) / len(values)
    assert (histogram - 0.1).abs().max() < 0.005
    torch.manual_seed(3)
    first = philox.draw_seed()
    torch.manual_seed(3)
    assert philox.draw_seed() == first
    assert philox.dropout_keep(first, offsets, 0.0).all()
    assert abs(philox.dropout_keep(first, offsets, 0.3).float().mean() - 0.7) < 0.005


CPP_PROBE = """
#include <cstdio>
#include "philox.h"
int main() {
  unsigned long long seed, offset;
  while (std::scanf("%llu %llu", &seed, &offset) == 2) std::printf("%a\\n", lmkern::philox_uniform(seed, offset));
}
"""


def test_cpp_philox_matches(tmp_path):
    """csrc/philox.h, compiled for the host, draws the same numbers."""
    compiler = shutil.which("c++")
    if compiler is None:
        pytest.skip("no C++ compiler")
    source = tmp_path / "probe.cpp"
    source.write_text(CPP_PROBE)
    subprocess.run([compiler, "-O2", f"-I{CSRC}", str(source), "-o", str(tmp_path / "probe")], check=True)
    pairs = [(seed, offset) for seed in (0, 12345, 2**40 + 7) for offset in (0, 1, 999, 2**31 - 1, 2**32 + 5)]
    lines = "\n".join(f"{seed} {offset}" for seed, offset in pairs)
    printed = subprocess.run([str(tmp_path / "probe")], input=lines, capture_output=True, text=True, check=True)
    got = [float.fromhex(value) for value in printed.stdout.split()]
    expected = [philox.uniform(seed, torch.tensor([offset])).item() for seed, offset in pairs]
    assert got == expected
