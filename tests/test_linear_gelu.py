"""Linear + GELU with the fused epilogue: every backend against the reference under the
tolerance rule (output and all gradients), the epilogue's dropout and residual, what
backward saves, the torch.library registration, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads

import lmkern
from lmkern.ops.linear_gelu.backends import LINEAR_GELU

# id -> (input shape, out features, approximate, recompute, bias)
CASES = {
    "exact": ((40, 64), 96, "none", False, True),
    "tanh_3d": ((2, 9, 48), 80, "tanh", False, True),
    "odd_recompute": ((33, 1000), 70, "none", True, True),
    "no_bias_odd": ((17, 7), 13, "tanh", False, False),
    "one_feature": ((5, 1), 1, "none", False, True),
}


def make(shape, features, bias, dtype, device):
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    w = (torch.randn(features, shape[-1]) / shape[-1] ** 0.5 * 2).to(device, dtype).requires_grad_()
    b = torch.randn(features).to(device, dtype).requires_grad_() if bias else None
    return x, w, b


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, backend, dtype, case):
    require(backend, device, dtype, "linear_gelu")
    shape, features, approximate, recompute, bias = CASES[case]
    x, w, b = make(shape, features, bias, dtype, device)

    def op(x, w, b, backend):
        return lmkern.linear_gelu(x, w, b, approximate, recompute=recompute, backend=backend)

    assert_matches_reference(op, (x, w, b), backend, ["out", "grad_x", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input_and_weight(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    x = torch.randn(3, 20, 2, 64)[:, :, 1].requires_grad_()  # strided rows
    w = torch.randn(64, 50).T.requires_grad_()  # (50, 64) transposed
    b = torch.randn(50).requires_grad_()

    def op(x, w, b, backend):
        return lmkern.linear_gelu(x, w, b, "tanh", backend=backend)

    assert_matches_reference(op, (x, w, b), backend, ["out", "grad_x", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("approximate", ["none", "tanh"])
def test_reference_matches_torch(approximate):
    x, w, b = make((2, 5, 24), 40, True, torch.float64, "cpu")
    ours = outputs_and_grads(
        lambda *a: lmkern.linear_gelu(*a, approximate=approximate, backend="torch"), (x, w, b), torch.float64
    )
    theirs = outputs_and_grads(
        lambda x, w, b: F.gelu(F.linear(x, w, b), approximate=approximate), (x, w, b), torch.float64
    )
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


# The epilogue as the FFN's second linear layer uses it: no activation, dropout, residual.
@pytest.mark.parametrize("activation", ["none", "gelu_tanh"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_epilogue_dropout_and_residual_match_reference(backend, dtype, activation):
    require(backend, "cpu", dtype, "linear_gelu")
    x, w, b = make((30, 40), 72, True, dtype, "cpu")
    residual = torch.randn(30, 72).to(dtype)
    b32, seed, p = b.detach().float(), 1234, 0.25
    reference, kernels = LINEAR_GELU.implementation("torch"), LINEAR_GELU.implementation(backend)
    expected, pre = reference.linear_gelu_fwd(x.detach(), w.detach(), b32, activation, True, p, seed, residual)
    out, kernel_pre = kernels.linear_gelu_fwd(x.detach(), w.detach(), b32, activation, True, p, seed, residual)
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=2e-2, rtol=1e-2)
    torch.testing.assert_close(out, expected, **tolerance)
    # With pre = 1 everywhere, out == residual exactly where an element was dropped.
    ones = (torch.zeros_like(w.detach()), torch.ones_like(b32), activation, False, p, seed, residual)
    kept = kernels.linear_gelu_fwd(x.detach(), *ones)[0] != residual
    assert torch.equal(kept, reference.linear_gelu_fwd(x.detach(), *ones)[0] != residual), "not the same mask"
    assert 0.6 < kept.float().mean() < 0.9
    grad_out = torch.randn(30, 72).to(dtype)
    pre = None if activation == "none" else pre
    expected_grads = reference.linear_gelu_bwd(grad_out, pre, activation, p, seed, True)
    grads = kernels.linear_gelu_bwd(grad_out, pre, activation, p, seed, True)
    for got, want in zip(grads, expected_grads):
        if want is None:
            assert got is None
        else:
            torch.testing.assert_close(got, want.to(got.dtype), **tolerance)
    grad_copy = grad_out.clone()
    overwritten = kernels.linear_gelu_bwd(grad_copy, pre, activation, p, seed, True, inplace=True)
    assert overwritten[0] is grad_copy
    for got, want in zip(overwritten, grads):
        assert (got is None and want is None) or torch.equal(got, want)
    # Backward regenerates forward's mask: with pre = 1, grad_pre is 0 exactly where dropped.
    ones = torch.ones_like(grad_out)
    regenerated = kernels.linear_gelu_bwd(ones, None if activation == "none" else ones, activation, p, seed, False)
    assert torch.equal(regenerated[0] != 0, kept)


def saved_bytes(fn, inputs):
    """Bytes of the tensors autograd saves for backward while fn() builds its graph, each
    storage counted once, leaving out the storages of `inputs` (which exist anyway)."""
    storages = {}

    def pack(tensor):
        storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda tensor: tensor):
        fn()
    for tensor in inputs:
        storages.pop(tensor.untyped_storage().data_ptr(), None)
    return sum(storages.values())


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_the_preactivation_or_nothing_with_recompute(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    x, w, b = make((64, 32), 128, True, torch.float32, "cpu")
    assert saved_bytes(lambda: lmkern.linear_gelu(x, w, b, backend=backend), (x, w, b)) == 64 * 128 * 4
    assert saved_bytes(lambda: lmkern.linear_gelu(x, w, b, recompute=True, backend=backend), (x, w, b)) == 0


def test_bias_gradient_is_deterministic():
    for name in ("native", "triton"):
        require(name, "cpu", torch.float32, "linear_gelu")
        x, w, b = make((500, 16), 24, True, torch.float32, "cpu")
        op = lambda *a: lmkern.linear_gelu(*a, backend=name)  # noqa: E731
        first, second = outputs_and_grads(op, (x, w, b), torch.float32), outputs_and_grads(op, (x, w, b), torch.float32)
        assert torch.equal(first[-1], second[-1])


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    x, w, b = make((0, 16), 24, True, torch.float32, "cpu")
    out = lmkern.linear_gelu(x, w, b, backend=backend)
    out.sum().backward()
    assert out.shape == (0, 24) and torch.equal(b.grad, torch.zeros(24)) and torch.equal(w.grad, torch.zeros(24, 16))


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device):
    require("native", device, torch.float32, "linear_gelu")
    x, w = torch.randn(10, 24, device=device), torch.randn(40, 24, device=device)
    b, residual = torch.randn(40, device=device), torch.randn(10, 40, device=device)
    forward = torch.ops.lmkern.linear_gelu_fwd.default
    torch.library.opcheck(forward, (x, w, b, "gelu", True, 0.0, 0, None))
    torch.library.opcheck(forward, (x, w, None, "none", False, 0.3, 77, residual))
    torch.library.opcheck(forward, (x, w, b, "gelu_tanh", False, 0.1, 77, residual))
    backward = torch.ops.lmkern.linear_gelu_bwd.default
    grad = torch.randn(10, 40, device=device)
    torch.library.opcheck(backward, (grad, torch.randn_like(grad), "gelu", 0.0, 0, True))
    torch.library.opcheck(backward, (grad, None, "none", 0.3, 5, False))
    overwriting = torch.ops.lmkern.linear_gelu_bwd_.default
    torch.library.opcheck(overwriting, (grad.clone(), torch.randn_like(grad), "gelu_tanh", 0.2, 5, True))
    torch.library.opcheck(overwriting, (grad.clone(), None, "none", 0.3, 5, False))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "linear_gelu")
    w, b = torch.randn(60, 30) / 5, torch.randn(60)

    def step(x):
        return lmkern.linear_gelu(x, w, b, "tanh").sum() + lmkern.linear_gelu(x, w, None, recompute=True).square().sum()

    assert_compiles_like_eager(step, torch.randn(3, 8, 30))


def _bad_calls():
    x, w, b = torch.randn(4, 10), torch.randn(6, 10), torch.randn(6)
    lg = lmkern.linear_gelu
    return [
        (lambda: lg(x.long(), w), TypeError, "input must be a floating-point tensor"),
        (lambda: lg(x, w[:, :9]), ValueError, r"weight must have shape \(out_features, 10\), got \(6, 9\)"),
        (lambda: lg(x, w.double()), ValueError, r"weight must have the dtype torch.float32 and the input's device"),
        (lambda: lg(x, w, b[:5]), ValueError, r"bias must have shape \(6,\)"),
        (lambda: lg(x, w, b, "sigmoid"), ValueError, r"approximate must be one of \('none', 'tanh'\)"),
        (lambda: lg(x[0, 0], w), ValueError, "input must have at least one dimension"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "linear_gelu")
    x, w = torch.randn(4, 10), torch.randn(6, 10)
    with pytest.raises(RuntimeError, match="activation must be 'gelu', 'gelu_tanh' or 'none', got 'relu'"):
        torch.ops.lmkern.linear_gelu_fwd(x, w, None, "relu", False, 0.0, 0, None)
    with pytest.raises(RuntimeError, match=r"linear_gelu_fwd: residual must have shape \[4, 6\]"):
        torch.ops.lmkern.linear_gelu_fwd(x, w, None, "gelu", False, 0.0, 0, torch.randn(4, 5))
    with pytest.raises(RuntimeError, match="preactivation must be given exactly when there is an activation"):
        torch.ops.lmkern.linear_gelu_bwd(torch.randn(4, 6), None, "gelu", 0.0, 0, False)
    with pytest.raises(RuntimeError, match="linear_gelu_bwd_: grad_out must be contiguous to be overwritten"):
        torch.ops.lmkern.linear_gelu_bwd_(torch.randn(6, 8)[:, :4], None, "none", 0.1, 0, False)
