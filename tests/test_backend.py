"""The dispatch point: resolution order, errors that say why and what to do, and that the
ops run the backend it resolves."""

import os
import threading

import pytest
import torch
from conftest import BACKENDS

import lmkern
from lmkern import backend, extension, triton_support
from lmkern.backend import Call
from lmkern.ops import OPS
from lmkern.ops.attention.backends import ATTENTION
from lmkern.ops.cross_entropy import reference
from lmkern.ops.cross_entropy.backends import CROSS_ENTROPY

X = torch.randn(4, 10)


def test_resolution_order(monkeypatch):
    monkeypatch.setenv("LMKERN_BACKEND", "torch")
    assert backend.requested_backend() == "torch"
    with lmkern.use_backend("triton"):
        assert backend.requested_backend() == "triton"
        with lmkern.use_backend("native"):
            assert backend.requested_backend() == "native"
            assert backend.requested_backend("auto") == "auto"
        assert backend.requested_backend() == "triton"
    monkeypatch.delenv("LMKERN_BACKEND")
    assert backend.requested_backend() == "auto"


def test_use_backend_is_per_thread_and_unwinds_on_error():
    seen = []
    with lmkern.use_backend("torch"):
        thread = threading.Thread(target=lambda: seen.append(backend.requested_backend()))
        thread.start()
        thread.join()
    assert seen == ["auto"]
    with pytest.raises(KeyError), lmkern.use_backend("torch"):
        raise KeyError
    assert backend.requested_backend() == "auto"


def test_bad_names_say_where_they_came_from(monkeypatch):
    with pytest.raises(ValueError, match="use_backend"):
        lmkern.use_backend("cuda").__enter__()
    monkeypatch.setenv("LMKERN_BACKEND", "fast")
    with pytest.raises(ValueError, match="LMKERN_BACKEND must be one of"):
        backend.requested_backend()


def test_triton_on_cpu_needs_the_interpreter(monkeypatch):
    # Import triton first: it keeps the TRITON_INTERPRET it sees when imported.
    assert triton_support.ERROR is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(lmkern.BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        lmkern.cross_entropy(X, torch.randint(0, 10, (4,)), backend="triton")


def test_native_not_built(monkeypatch):
    monkeypatch.setattr(extension, "ERROR", "the extension lmkern._C is not built (pip install --no-build-isolation -e .)")
    with pytest.raises(lmkern.BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        lmkern.cross_entropy(X, torch.randint(0, 10, (4,)), backend="native")
    assert CROSS_ENTROPY.resolve(Call.of(X)) == "torch"


def test_native_without_cuda_kernels_says_how_to_build_them():
    if extension.ERROR or extension.has_kernels("cuda"):
        pytest.skip("needs lmkern._C built without CUDA")
    assert "LMKERN_BUILD_CUDA=1" in backend.unavailable_reason("native", "cross_entropy", "cuda")


def test_a_backends_limits_rule_it_out_for_that_call():
    """Triton's attention kernels take head dims up to 256: an explicit request for a wider
    one says so, and auto goes to the next backend."""
    call = Call("cpu", torch.float32, head_dims=(264, 264), mask=None, mask_grad=False, dropout_p=0.0,
                relative_bias=False, windowed=False, backward=True)
    with pytest.raises(lmkern.BackendUnavailableError, match="backend 'triton' cannot run .*head dims up to 256"):
        ATTENTION.resolve(call, "triton")
    assert ATTENTION.auto(call) != "triton"
    assert ATTENTION.resolve(call, "torch") == "torch"
    narrow = Call("cpu", torch.float32, head_dims=(64, 64), mask=None, mask_grad=False, dropout_p=0.0,
                  relative_bias=False, windowed=False, backward=True)
    assert ATTENTION.resolve(narrow, "triton") == "triton"


def test_auto_prefers_native_on_cpu_then_torch(monkeypatch):
    if extension.ERROR:
        pytest.skip(extension.ERROR)
    assert CROSS_ENTROPY.resolve(Call.of(X)) == "native"
    assert CROSS_ENTROPY.resolve(Call.of(X.double())) == "torch"
    monkeypatch.setattr(extension, "ERROR", "not built")
    assert CROSS_ENTROPY.resolve(Call.of(X)) == "torch"


def test_a_call_with_nothing_to_compute_runs_on_the_reference():
    assert CROSS_ENTROPY.resolve(Call.of(X), "triton", empty=True) == "torch"
    with pytest.raises(lmkern.BackendUnavailableError, match="float64"):  # still a backend that exists
        CROSS_ENTROPY.resolve(Call.of(X.double()), "native", empty=True)


def test_ops_run_the_resolved_backend(monkeypatch):
    calls = []
    original = reference.cross_entropy_fwd

    def spy(*args, **kwargs):
        calls.append("torch")
        return original(*args, **kwargs)

    monkeypatch.setattr(reference, "cross_entropy_fwd", spy)
    target = torch.randint(0, 10, (4,))
    with lmkern.use_backend("torch"):
        lmkern.cross_entropy(X, target)
        lmkern.linear_cross_entropy(X, torch.randn(7, 10), target % 7)
    assert calls == ["torch", "torch"]
    if extension.ERROR is None:
        lmkern.cross_entropy(X, target, backend="native")
        assert calls == ["torch", "torch"]


def test_every_public_op_declares_its_backends():
    assert sorted(backend.OPS) == sorted(OPS) == sorted(backend.AUTO)
    for op in OPS:
        assert backend.OPS[op].name == op and list(backend.OPS[op].backends) == list(backend.BACKENDS)


def test_required_backends_are_available():
    """CI sets LMKERN_REQUIRE_BACKENDS so that a failed build cannot pass as skipped tests."""
    required = [name for name in os.environ.get("LMKERN_REQUIRE_BACKENDS", "").split(",") if name]
    if not required:
        pytest.skip("LMKERN_REQUIRE_BACKENDS is not set")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in required:
        assert name in BACKENDS, name
        for op in OPS:
            for device in devices:
                assert backend.unavailable_reason(name, op, device) is None, (name, op, device)
