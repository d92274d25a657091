"""LayerNorm (lmkern.layer_norm): every backend against the reference under the tolerance
rule (outputs and all gradients), the reference against torch, the GPU kernels' row limit,
the drop-in module, the torch.library registration, and bad input. Residual add + dropout
+ LayerNorm, on the same kernels: tests/test_add_layer_norm.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads

import lmkern
from lmkern import backend as backend_module
from lmkern.backend import Call
from lmkern.ops.layer_norm.backends import LAYER_NORM

# id -> (input shape, normalized width); widths 1 to 16,384, odd and powers of two.
SHAPES = {
    "width_1": ((5, 1), 1),
    "odd_7": ((9, 7), 7),
    "gpt2_3d": ((2, 3, 768), 768),
    "odd_1000": ((6, 1000), 1000),
    "odd_1023_3d": ((2, 2, 1023), 1023),
    "wide_16384": ((3, 16384), 16384),
}


def make(shape, dtype, device, residual=True, affine=True):
    """x, residual, weight, bias (residual/weight/bias None if not wanted), requires_grad."""
    width = shape[-1]
    x = (torch.randn(shape) * 2 + 0.5).to(device, dtype).requires_grad_()
    r = torch.randn(shape).to(device, dtype).requires_grad_() if residual else None
    w = (torch.rand(width) + 0.5).to(device, dtype).requires_grad_() if affine else None
    b = torch.randn(width).to(device, dtype).requires_grad_() if affine else None
    return x, r, w, b


def layer_norm_op(x, w, b, backend):
    return lmkern.layer_norm(x, (x.shape[-1],), w, b, eps=1e-5, backend=backend)


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_layer_norm_matches_reference(device, backend, dtype, shape):
    require(backend, device, dtype, "layer_norm")
    x, _, w, b = make(SHAPES[shape][0], dtype, device, residual=False)
    assert_matches_reference(layer_norm_op, (x, w, b), backend, ["out", "grad_x", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_weight_or_bias_and_noncontiguous(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    wide = torch.randn(6, 2, 300)
    for view in (wide[:, 0], wide[:, :, ::2], wide.transpose(0, 1), wide[::2]):
        x = view.requires_grad_()  # the strided view itself
        for affine in ((None, None), (torch.rand(x.shape[-1]) + 0.5, None), (None, torch.randn(x.shape[-1]))):
            inputs = (x, *(t if t is None else t.requires_grad_() for t in affine))
            assert_matches_reference(layer_norm_op, inputs, backend, ["out", "grad_x", "grad_weight", "grad_bias"])


def test_multidimensional_normalized_shape_and_int():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w, b = torch.rand(5, 6, dtype=torch.float64), torch.randn(5, 6, dtype=torch.float64)
    for name in ("torch", "native"):
        require(name, "cpu", torch.float32, "layer_norm")
        torch.testing.assert_close(
            lmkern.layer_norm(x.float(), (5, 6), w.float(), b.float(), backend=name),
            F.layer_norm(x, (5, 6), w, b).float(),
        )
    torch.testing.assert_close(lmkern.layer_norm(x, 6), F.layer_norm(x, (6,)))


@pytest.mark.parametrize("shape", ["odd_7", "gpt2_3d"])
def test_reference_matches_torch(shape):
    x, _, w, b = make(SHAPES[shape][0], torch.float64, "cpu", residual=False)
    ours = outputs_and_grads(lambda *a: layer_norm_op(*a, backend="torch"), (x, w, b), torch.float64)
    theirs = outputs_and_grads(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b), (x, w, b), torch.float64)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


def assert_deterministic(op, inputs, backend):
    """op(*inputs, backend=backend) twice: bit-identical outputs and gradients."""
    first = outputs_and_grads(lambda *a: op(*a, backend=backend), inputs, torch.float32)
    second = outputs_and_grads(lambda *a: op(*a, backend=backend), inputs, torch.float32)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_weight_gradients_are_deterministic(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    x, _, w, b = make((300, 96), torch.float32, "cpu", residual=False)
    assert_deterministic(layer_norm_op, (x, w, b), backend)


def assert_runs_empty_rows(normalize):
    """normalize(x, weight) of (0, 3, 10) rows: an empty output and a zero weight gradient."""
    x = torch.randn(0, 3, 10, requires_grad=True)
    w = torch.ones(10, requires_grad=True)
    out = normalize(x, w)
    out.sum().backward()
    assert out.shape == x.shape and torch.equal(w.grad, torch.zeros(10))


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    assert_runs_empty_rows(lambda x, w: lmkern.layer_norm(x, (10,), w, None, backend=backend))


def assert_gpu_kernels_refuse_wide_rows(op, normalize, torch_normalize, monkeypatch):
    """op (an Op on LayerNorm's kernels) and normalize(x, width, backend=None): the Triton
    backend refuses rows over 64 KiB, and auto falls back to the reference for them
    (compared with torch_normalize(x, (width,)))."""
    x = torch.randn(2, 16385)
    with pytest.raises(lmkern.BackendUnavailableError,
                       match=rf"{op.name}: .*rows of up to 65536 bytes, got 16385 torch.float32"):
        normalize(x, 16385, backend="triton")
    monkeypatch.setitem(backend_module.AUTO, op.name, {"cpu": ("triton", "torch")})
    assert op.resolve(Call.of(x, width=16385)) == "torch"
    assert op.resolve(Call.of(x, width=16384)) == "triton"
    torch.testing.assert_close(normalize(x, 16385), torch_normalize(x, (16385,)))


def test_gpu_kernels_refuse_wide_rows_and_auto_falls_back(monkeypatch):
    require("triton", "cpu", torch.float32, "layer_norm")
    assert_gpu_kernels_refuse_wide_rows(
        LAYER_NORM, lambda x, width, backend=None: lmkern.layer_norm(x, (width,), backend=backend), F.layer_norm,
        monkeypatch,
    )


def test_float64_runs_on_torch_under_auto_and_is_refused_by_kernels():
    x = torch.randn(4, 10, dtype=torch.float64)
    torch.testing.assert_close(lmkern.layer_norm(x, (10,)), F.layer_norm(x, (10,)))
    with pytest.raises(lmkern.BackendUnavailableError, match="float32, float16 or bfloat16"):
        lmkern.layer_norm(x, (10,), backend="native")


def test_module_is_a_drop_in_for_torch():
    theirs = torch.nn.LayerNorm((4, 6), eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    ours = lmkern.nn.LayerNorm((4, 6), eps=1e-6, backend="torch")
    assert isinstance(ours, torch.nn.LayerNorm) and "backend='torch'" in repr(ours)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    plain = lmkern.nn.LayerNorm(6, elementwise_affine=False)
    torch.testing.assert_close(plain(x[..., 0, :]), F.layer_norm(x[..., 0, :], (6,)))
    assert list(lmkern.nn.LayerNorm(6, bias=False).state_dict()) == ["weight"]
    torch.testing.assert_close(lmkern.functional.layer_norm(x, (6,)), F.layer_norm(x, (6,)))


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device):
    require("native", device, torch.float32, "layer_norm")
    x, r = torch.randn(6, 40, device=device), torch.randn(6, 40, device=device)
    w, b = torch.rand(40, device=device), torch.randn(40, device=device)
    forward = torch.ops.lmkern.layer_norm_fwd.default
    torch.library.opcheck(forward, (x, r, w, b, 1e-5, 0.2, 123, True))
    torch.library.opcheck(forward, (x, None, None, None, 1e-5, 0.0, 0, False))
    out, mean, rstd, summed = forward(x, r, w, b, 1e-5, 0.2, 123, True)
    backward = torch.ops.lmkern.layer_norm_bwd.default
    torch.library.opcheck(backward, (torch.randn_like(x), torch.randn_like(x), summed, w, mean, rstd, 0.2, 123, True))
    torch.library.opcheck(backward, (torch.randn_like(x), None, summed, None, mean, rstd, 0.0, 0, False))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "layer_norm")
    w, b = torch.rand(50) + 0.5, torch.randn(50)
    residual = torch.randn(4, 7, 50)

    def step(x):
        out, summed = lmkern.add_layer_norm(x, residual, w, b)
        return lmkern.layer_norm(out * summed, (50,), w, b).square().sum()

    assert_compiles_like_eager(step, torch.randn(4, 7, 50))


def bad_input_and_shape_calls(norm, x):
    """The bad calls that lmkern.layer_norm and lmkern.rms_norm (norm) share, on x (4, 10)."""
    return [
        (lambda: norm(x.long(), (10,)), TypeError, "input must be a floating-point tensor"),
        (lambda: norm(x, (9,)), ValueError, r"normalized_shape must be the last dimensions of input \(4, 10\)"),
        (lambda: norm(x, ()), ValueError, "normalized_shape must be the last dimensions"),
        (lambda: norm(x, (10,), torch.ones(9)), ValueError, r"weight must have shape \(10,\)"),
    ]


def _bad_calls():
    x, w = torch.randn(4, 10), torch.ones(10)
    ln = lmkern.layer_norm
    return [
        *bad_input_and_shape_calls(ln, x),
        (lambda: ln(x, (10,), w, torch.ones(10, 1)), ValueError, r"bias must have shape \(10,\)"),
        (lambda: ln(x, (10,), eps=-1.0), ValueError, "eps must be >= 0"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "layer_norm")
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: weight must be a contiguous float32 tensor of shape"):
        torch.ops.lmkern.layer_norm_fwd(x, None, torch.ones(10, dtype=torch.float64), None, 1e-5, 0.0, 0, False)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: residual must have shape \[4, 10\]"):
        torch.ops.lmkern.layer_norm_fwd(x, x[:2], None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: mean and rstd must be contiguous float32"):
        torch.ops.lmkern.layer_norm_bwd(x, None, x, None, torch.zeros(3), torch.zeros(4), 0.0, 0, False)
