"""Residual add + dropout + LayerNorm in one pass (lmkern.add_layer_norm): every backend
against the reference under the tolerance rule (both outputs and all gradients), pre- and
post-LN, strided rows, the reference against torch, the dropout mask (its statistics, its
gradient, the same on every backend, under torch.compile), and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads
from test_layer_norm import make

import lmkern


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
    require(backend, device, dtype, "add_layer_norm")
    shape, p, prenorm, with_residual = ADD_CASES[case]
    x, r, w, b = make(shape, dtype, device, residual=with_residual)

    def op(x, r, w, b, backend):
        return lmkern.add_layer_norm(x, r, w, b, dropout_p=p, prenorm=prenorm, backend=backend)

    outputs = ["out", "summed"] if prenorm else ["out"]
    assert_matches_reference(op, (x, r, w, b), backend, outputs + ["grad_x", "grad_residual", "grad_w", "grad_b"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_strided_rows(backend):
    require(backend, "cpu", torch.float32, "add_layer_norm")
    x = torch.randn(5, 2, 64)[:, 1].requires_grad_()
    r = torch.randn(5, 128)[:, 32:96].requires_grad_()
    w, b = torch.rand(64).requires_grad_(), torch.randn(64).requires_grad_()

    def op(x, r, w, b, backend):
        return lmkern.add_layer_norm(x, r, w, b, dropout_p=0.2, backend=backend)

    assert_matches_reference(op, (x, r, w, b), backend, ["out", "summed", "grad_x", "grad_r", "grad_w", "grad_b"])


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 768)])
def test_reference_matches_torch(shape, prenorm):
    x, r, w, b = make(shape, torch.float64, "cpu")

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
    require(backend, "cpu", torch.float32, "add_layer_norm")
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
        require(name, "cpu", torch.float32, "add_layer_norm")
        masks[name] = dropout_pattern(name, 0.4, seed=3)[0] != 0
    for name, mask in masks.items():
        assert torch.equal(mask, masks["torch"]), name


def test_compiled_dropout_is_reproducible_and_backward_uses_its_mask():
    require("native", "cpu", torch.float32, "add_layer_norm")

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
    add = lmkern.add_layer_norm
    return [
        (lambda: add(x, x[:3], w, None), ValueError, r"residual must have x's shape and device"),
        (lambda: add(x, x, w, None, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: add(x.long(), None, w, None), TypeError, "x must be a floating-point tensor"),
        (lambda: add(x, None, w, None, backend="gpu"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)
