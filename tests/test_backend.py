"""The dispatch point: resolution order, errors that say why and what to do, and that the
ops run the backend it resolves."""

import os
import threading

import pytest
import torch
from conftest import BACKENDS

import lmkern
from lmkern import backend
from lmkern.ops.cross_entropy import reference

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
    assert backend.triton_error() is None
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    with pytest.raises(lmkern.BackendUnavailableError, match="set TRITON_INTERPRET=1"):
        lmkern.cross_entropy(X, torch.randint(0, 10, (4,)), backend="triton")


def test_native_not_built(monkeypatch):
    monkeypatch.setitem(backend._import_errors, "lmkern._C", "No module named 'lmkern._C'")
    with pytest.raises(lmkern.BackendUnavailableError, match="pip install --no-build-isolation -e ."):
        lmkern.cross_entropy(X, torch.randint(0, 10, (4,)), backend="native")
    assert backend.resolve("cross_entropy", X) == "torch"


def test_native_without_cuda_kernels_says_how_to_build_them():
    if backend.native_error() or torch._C._dispatch_has_kernel_for_dispatch_key("lmkern::cross_entropy_fwd", "CUDA"):
        pytest.skip("needs lmkern._C built without CUDA")
    assert "LMKERN_BUILD_CUDA=1" in backend.unavailable_reason("native", "cross_entropy", "cuda")


def test_call_limits_rule_out_a_backend_for_that_call():
    limits = {"native": "this call needs something native lacks"}
    with pytest.raises(lmkern.BackendUnavailableError, match="backend 'native' cannot run .*native lacks"):
        backend.resolve("cross_entropy", X, "native", limits)
    assert backend.resolve("cross_entropy", X, "auto", limits) != "native"
    assert backend.resolve("cross_entropy", X, "torch", limits) == "torch"


def test_auto_prefers_native_on_cpu_then_torch(monkeypatch):
    if backend.native_error():
        pytest.skip(backend.native_error())
    assert backend.resolve("cross_entropy", X) == "native"
    assert backend.resolve("cross_entropy", X.double()) == "torch"
    monkeypatch.setitem(backend._import_errors, "lmkern._C", "not built")
    assert backend.resolve("cross_entropy", X) == "torch"


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
    if backend.native_error() is None:
        lmkern.cross_entropy(X, target, backend="native")
        assert calls == ["torch", "torch"]


def test_required_backends_are_available():
    """CI sets LMKERN_REQUIRE_BACKENDS so that a failed build cannot pass as skipped tests."""
    required = [name for name in os.environ.get("LMKERN_REQUIRE_BACKENDS", "").split(",") if name]
    if not required:
        pytest.skip("LMKERN_REQUIRE_BACKENDS is not set")
    devices = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
    for name in required:
        assert name in BACKENDS, name
        for device in devices:
            assert backend.unavailable_reason(name, "cross_entropy", device) is None, (name, device)


def test_constant_marker_is_the_one_torch_compile_uses():
    def probe():
        return None

    torch.compiler.assume_constant_result(probe)
    assert vars(probe) == vars(backend.constant_under_compile(lambda: None))
