"""Test set-up: Triton's interpreter when there is no GPU, the device/backend/dtype
parameters, and skips that say why."""

import os

import torch

# Triton reads this when its kernels are defined, so before any test imports them.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402

from lmkern import backend  # noqa: E402

BACKENDS = ("torch", "native", "triton")
DTYPES = (torch.float32, torch.float16, torch.bfloat16)
DEVICES = ("cpu", pytest.param("cuda", marks=pytest.mark.gpu))


# Backends that must run here (CI sets it: a broken build or install then fails the tests
# that need it instead of skipping them).
REQUIRED = [name for name in os.environ.get("LMKERN_REQUIRE_BACKENDS", "").split(",") if name]


def require(name, device, dtype, op):
    """Skip, saying why, unless backend `name` can run lmkern.<op> on this device and dtype
    here; fail instead where it cannot run the op at all and LMKERN_REQUIRE_BACKENDS names it."""
    if device == "cuda" and not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    broken = backend.unavailable_reason(name, op, device)
    if broken is not None and name in REQUIRED:
        pytest.fail(f"LMKERN_REQUIRE_BACKENDS names {name}, which cannot run lmkern.{op} on {device}: {broken}")
    reason = backend.unavailable_reason(name, op, device, dtype)
    if reason is not None:
        pytest.skip(reason)
    backend.OPS[op].implementation(name)  # loaded: a native one registers its ops' fake implementations
    if name == "triton" and device == "cpu" and dtype == torch.bfloat16:
        pytest.skip("the Triton interpreter gave wrong bf16 values (triton 3.9): bf16 Triton runs on GPU")


def assert_compiles_like_eager(step, x):
    """torch.compile(step, fullgraph=True) gives step's value and input gradient at x."""
    eager_x = x.clone().requires_grad_()
    step(eager_x).backward()
    compiled_x = x.clone().requires_grad_()
    loss = torch.compile(step, fullgraph=True)(compiled_x)
    loss.backward()
    torch.testing.assert_close(loss, step(x))
    torch.testing.assert_close(compiled_x.grad, eager_x.grad)


@pytest.fixture(scope="module")
def one_thread():
    """Tiny models run fastest on one thread (threads that wait on each other are slow on a
    busy machine). Model test modules use it: pytestmark = pytest.mark.usefixtures("one_thread")."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
