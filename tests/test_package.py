"""The package imports without its extension, queries no GPU and does not import triton
on import, and `python -m lmkern.info` reports what it sees."""

import subprocess
import sys

PROBE = """
import sys
{setup}
import torch
import lmkern
assert "triton" not in sys.modules, "importing lmkern imported triton"
assert sys.modules.get("lmkern._C") is None, "importing lmkern loaded the extension"
assert not torch.cuda.is_initialized(), "importing lmkern initialised CUDA"
{check}
print("ok")
"""


def run_python(setup="", check=""):
    result = subprocess.run(
        [sys.executable, "-c", PROBE.format(setup=setup, check=check)], capture_output=True, text=True
    )
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_import_is_light():
    run_python()


def test_works_without_the_extension():
    check = """
x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
torch.testing.assert_close(lmkern.cross_entropy(x, t), torch.nn.functional.cross_entropy(x, t))
try:
    lmkern.cross_entropy(x, t, backend="native")
    raise AssertionError("native ran without lmkern._C")
except lmkern.BackendUnavailableError as error:
    assert "pip install --no-build-isolation -e ." in str(error), error
"""
    run_python(setup="sys.modules['lmkern._C'] = None  # as if it were not built", check=check)


def test_info_reports_versions_and_backends():
    result = subprocess.run([sys.executable, "-m", "lmkern.info"], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    import torch

    assert f"torch   {torch.__version__}" in result.stdout
    for line in ("cross_entropy on cpu: auto -> ", "    native ", "    triton ", "    torch   yes"):
        assert line in result.stdout, result.stdout
