"""Config pruning (lmkern/ops/triton_tuning.py), the one-config switch, and the Triton
compile check (scripts/triton_check.py), which compiles for a GPU without one."""

import os
import subprocess
import sys

import pytest
import triton

from lmkern.ops import triton_tuning
from lmkern.ops.triton_tuning import ConfigPruner, Target

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def configs(*sizes):
    return [triton.Config({"BLOCK": size}, num_warps=4) for size in sizes]


def resources(config, args, target):
    """A tile of BLOCK x width elements: bytes of shared memory, registers per thread."""
    elements = config.kwargs["BLOCK"] * args["width"]
    registers = elements / 128 if target.wgmma else 2 * elements / 128
    return 2 * elements, registers


def test_pruner_keeps_the_first_configs_that_fit_in_order(monkeypatch):
    monkeypatch.delenv(triton_tuning.ONE_CONFIG_ENV, raising=False)
    pruner = ConfigPruner(resources)
    candidates = configs(256, 128, 64, 32, 16, 8)
    # width 64: 256 x 64 = 16384 elements take 128 registers per thread, under the budget.
    kept = pruner.fitting(candidates, {"width": 64}, Target(shared_memory=20000))
    assert [c.kwargs["BLOCK"] for c in kept] == [128, 64, 32, 16]  # 256 needs 32768 bytes; at most MAX_CONFIGS
    assert len(kept) == triton_tuning.MAX_CONFIGS
    # Without wgmma the operands take registers too: 256 x 64 is over the budget.
    kept = pruner.fitting(candidates, {"width": 64}, Target(wgmma=False))
    assert [c.kwargs["BLOCK"] for c in kept] == [128, 64, 32, 16]
    assert pruner.fitting(candidates, {"width": 64}, Target())[0].kwargs["BLOCK"] == 256


def test_one_config_switch_keeps_only_the_first_that_fits(monkeypatch):
    monkeypatch.setenv(triton_tuning.ONE_CONFIG_ENV, "1")
    kept = ConfigPruner(resources).fitting(configs(256, 128, 64), {"width": 64}, Target(shared_memory=20000))
    assert [c.kwargs["BLOCK"] for c in kept] == [128]


def test_pruner_says_why_when_nothing_fits(monkeypatch):
    with pytest.raises(ValueError, match="no Triton config fits: 2 candidates"):
        ConfigPruner(resources).fitting(configs(256, 128), {"width": 4096}, Target(shared_memory=1024))


def test_triton_check_compiles_for_sm_90_without_a_gpu(tmp_path):
    """The check itself, on one small case: compiled by triton.compile for sm_90, its table written."""
    env = {key: value for key, value in os.environ.items() if key != "TRITON_INTERPRET"}
    result = subprocess.run(
        [sys.executable, os.path.join(ROOT, "scripts", "triton_check.py"), "--arch", "90", "--jobs", "1",
         "--case", "layer_norm: N4096 D768 fp16", "--out", str(tmp_path)],
        capture_output=True, text=True, env=env, cwd=ROOT, timeout=600,
    )
    assert result.returncode == 0, result.stdout + result.stderr
    assert "0 problems" in result.stdout
    table = (tmp_path / f"triton-{triton.__version__}-sm_90.md").read_text()
    rows = [line for line in table.splitlines() if line.startswith("| layer_norm_") and "N4096 D768" in line]
    assert {row.split(" | ")[0].strip("| ") for row in rows} == {"layer_norm_fwd_kernel", "layer_norm_bwd_kernel"}
    for row in rows:
        cells = row.split(" | ")
        assert int(cells[4]) > 0 and cells[5] == "0", row  # registers from ptxas, no spills


def test_triton_check_fails_on_spills_and_shared_memory_of_kept_configs():
    """Its failure rule (in a process of its own: importing the check turns the interpreter off)."""
    checks = """
import triton_check as check
fine = {"shared": 1000, "spill_bytes": 0, "stack": 0}
assert check.failure({"result": fine, "kept": True}, 2000) is None
assert "spills 8 bytes" in check.failure({"result": {**fine, "spill_bytes": 8}, "kept": True}, 2000)
assert "over the limit" in check.failure({"result": {**fine, "shared": 3000}, "kept": True}, 2000)
assert check.failure({"result": {**fine, "shared": 3000}, "kept": False}, 2000) is None  # pruned: cannot run
assert "compile error" in check.failure({"result": {"error": "boom"}, "kept": False}, 2000)
"""
    result = subprocess.run([sys.executable, "-c", checks], capture_output=True, text=True,
                            cwd=os.path.join(ROOT, "scripts"), timeout=300)
    assert result.returncode == 0, result.stderr
