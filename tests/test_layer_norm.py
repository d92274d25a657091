"""LayerNorm and residual add + dropout + LayerNorm: every backend against the reference
under the tolerance rule (outputs and all gradients), the reference against torch, the
dropout mask, the drop-in module, the torch.library registration, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_matches_reference, outputs_and_grads

import lmkern
from lmkern import backend as backend_module
from lmkern.ops import layer_norm as ln_ops

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


# id -> (shape, dropout_p, prenorm, with a residual)
ADD_CASES = {
    "prenorm": ((4, 5, 100), 0.0, True, True),
    "postnorm": ((7, 1023), 0.0, False, True),
    "prenorm_dropout": ((4, 5, 100), 0.3, True, True),
    "postnorm_dropout": ((9, 257), 0.1, False, True),
    "first_layer_dropout": ((6, 64), 0.5, True, False),
}


@pytest.mark.parametrize("case", ADD_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_add_layer_norm_matches_reference(device, backend, dtype, case):
    require(backend, device, dtype, "layer_norm")
    shape, p, prenorm, with_residual = ADD_CASES[case]
    x, r, w, b = make(shape, dtype, device, residual=with_residual)

    def op(x, r, w, b, backend):
        return lmkern.add_layer_norm(x, r, w, b, dropout_p=p, prenorm=prenorm, backend=backend)

    outputs = ["out", "summed"] if prenorm else ["out"]
    assert_matches_reference(op, (x, r, w, b), backend, outputs + ["grad_x", "grad_residual", "grad_w", "grad_b"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_weight_or_bias_and_noncontiguous(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    wide = torch.randn(6, 2, 300)
    for view in (wide[:, 0], wide[:, :, ::2], wide.transpose(0, 1), wide[::2]):
        x = view.requires_grad_()  # the strided view itself
        for affine in ((None, None), (torch.rand(x.shape[-1]) + 0.5, None), (None, torch.randn(x.shape[-1]))):
            inputs = (x, *(t if t is None else t.requires_grad_() for t in affine))
            assert_matches_reference(layer_norm_op, inputs, backend, ["out", "grad_x", "grad_weight", "grad_bias"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_strided_rows(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    x = torch.randn(5, 2, 64)[:, 1].requires_grad_()
    r = torch.randn(5, 128)[:, 32:96].requires_grad_()
    w, b = torch.rand(64).requires_grad_(), torch.randn(64).requires_grad_()

    def op(x, r, w, b, backend):
        return lmkern.add_layer_norm(x, r, w, b, dropout_p=0.2, backend=backend)

    assert_matches_reference(op, (x, r, w, b), backend, ["out", "summed", "grad_x", "grad_r", "grad_w", "grad_b"])


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


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("shape", ["odd_7", "gpt2_3d"])
def test_reference_matches_torch(shape, prenorm):
    x, r, w, b = make(SHAPES[shape][0], torch.float64, "cpu")
    ours = outputs_and_grads(lambda *a: layer_norm_op(*a, backend="torch"), (x, w, b), torch.float64)
    theirs = outputs_and_grads(lambda x, w, b: F.layer_norm(x, (x.shape[-1],), w, b), (x, w, b), torch.float64)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)

    def added(x, r, w, b):
        s = x + r
        out = F.layer_norm(s, (s.shape[-1],), w, b)
        return (out, s) if prenorm else out

    ours = outputs_and_grads(
        lambda *a: lmkern.add_layer_norm(*a, prenorm=prenorm, backend="torch"), (x, r, w, b), torch.float64
    )
    for a, e in zip(ours, outputs_and_grads(added, (x, r, w, b), torch.float64)):
        torch.testing.assert_close(a, e)


def dropout_pattern(name, p, seed, shape=(64, 300), device="cpu"):
    """The residual stream s = dropout(ones), which is 0 or 1 / (1 - p), and its gradient."""
    x = torch.ones(shape, device=device, requires_grad=True)
    torch.manual_seed(seed)
    _, s = lmkern.add_layer_norm(x, None, None, None, dropout_p=p, backend=name)
    s.sum().backward()
    return s.detach(), x.grad


@pytest.mark.parametrize("backend", BACKENDS)
def test_dropout_mask_statistics_and_gradient(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    p = 0.3
    s, grad = dropout_pattern(backend, p, seed=7)
    kept = s != 0
    assert abs(kept.float().mean().item() - (1 - p)) < 0.02
    torch.testing.assert_close(s[kept], torch.full_like(s[kept], 1 / (1 - p)))
    # d(sum s)/dx is the mask itself: the backward regenerates the forward's mask.
    torch.testing.assert_close(grad, s)
    again, _ = dropout_pattern(backend, p, seed=7)
    assert torch.equal(s, again), "the same seed must give the same mask"
    other, _ = dropout_pattern(backend, p, seed=8)
    assert not torch.equal(s, other)
    assert (dropout_pattern(backend, 1.0, seed=7)[0] == 0).all()


def test_backends_draw_the_same_mask():
    masks = {}
    for name in BACKENDS:
        require(name, "cpu", torch.float32, "layer_norm")
        masks[name] = dropout_pattern(name, 0.4, seed=3)[0] != 0
    for name, mask in masks.items():
        assert torch.equal(mask, masks["torch"]), name


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_weight_gradients_are_deterministic(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    x, _, w, b = make((300, 96), torch.float32, "cpu", residual=False)
    first = outputs_and_grads(lambda *a: layer_norm_op(*a, backend=backend), (x, w, b), torch.float32)
    second = outputs_and_grads(lambda *a: layer_norm_op(*a, backend=backend), (x, w, b), torch.float32)
    for a, e in zip(first, second):
        assert torch.equal(a, e)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    require(backend, "cpu", torch.float32, "layer_norm")
    x = torch.randn(0, 3, 10, requires_grad=True)
    w = torch.ones(10, requires_grad=True)
    out = lmkern.layer_norm(x, (10,), w, None, backend=backend)
    out.sum().backward()
    assert out.shape == x.shape and torch.equal(w.grad, torch.zeros(10))


def test_gpu_kernels_refuse_wide_rows_and_auto_falls_back(monkeypatch):
    require("triton", "cpu", torch.float32, "layer_norm")
    x = torch.randn(2, 16385)
    with pytest.raises(ValueError, match=r"rows of 16385 torch.float32 elements \(65540 bytes\) are wider"):
        lmkern.layer_norm(x, (16385,), backend="triton")
    monkeypatch.setitem(backend_module.AUTO, "layer_norm", {"cpu": ("triton", "torch")})
    assert ln_ops.resolve_rows(x, 16385, None) == "torch"
    assert ln_ops.resolve_rows(x, 16384, None) == "triton"
    torch.testing.assert_close(lmkern.layer_norm(x, (16385,)), F.layer_norm(x, (16385,)))


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


def test_compiled_dropout_is_reproducible_and_backward_uses_its_mask():
    require("native", "cpu", torch.float32, "layer_norm")

    def step(x):
        return lmkern.add_layer_norm(x, None, None, None, dropout_p=0.5)[1]

    compiled = torch.compile(step, fullgraph=True)
    x = torch.ones(16, 32, requires_grad=True)
    torch.manual_seed(0)
    summed = compiled(x)
    summed.sum().backward()
    torch.testing.assert_close(x.grad, summed.detach())  # d(sum s)/dx is the mask
    assert 0.4 < (summed == 0).float().mean() < 0.6
    torch.manual_seed(0)
    assert torch.equal(compiled(x), summed)


def _bad_calls():
    x, w = torch.randn(4, 10), torch.ones(10)
    ln, add = lmkern.layer_norm, lmkern.add_layer_norm
    return [
        (lambda: ln(x.long(), (10,)), TypeError, "input must be a floating-point tensor"),
        (lambda: ln(x, (9,)), ValueError, r"normalized_shape must be the last dimensions of input \(4, 10\)"),
        (lambda: ln(x, ()), ValueError, "normalized_shape must be the last dimensions"),
        (lambda: ln(x, (10,), torch.ones(9)), ValueError, r"weight must have shape \(10,\)"),
        (lambda: ln(x, (10,), w, torch.ones(10, 1)), ValueError, r"bias must have shape \(10,\)"),
        (lambda: ln(x, (10,), eps=-1.0), ValueError, "eps must be >= 0"),
        (lambda: add(x, x[:3], w, None), ValueError, r"residual must have x's shape and device"),
        (lambda: add(x, x, w, None, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: add(x, None, w, None, backend="gpu"), ValueError, "backend must be one of"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_name_the_argument(index):
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "layer_norm")
    x = torch.randn(4, 10)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: weight must be a contiguous float32 tensor of shape"):
        torch.ops.lmkern.layer_norm_fwd(x, None, torch.ones(10, dtype=torch.float64), None, 1e-5, 0.0, 0, False)
    with pytest.raises(RuntimeError, match=r"layer_norm_fwd: residual must have shape \[4, 10\]"):
        torch.ops.lmkern.layer_norm_fwd(x, x[:2], None, None, 1e-5, 0.0, 0, False)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: mean and rstd must be contiguous float32"):
        torch.ops.lmkern.layer_norm_bwd(x, None, x, None, torch.zeros(3), torch.zeros(4), 0.0, 0, False)
