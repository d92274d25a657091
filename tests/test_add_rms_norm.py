"""Residual add + dropout + RMSNorm in one pass (lmkern.add_rms_norm, on LayerNorm's kernels
with the RMS switch): every backend against the reference under the tolerance rule (both
outputs and all gradients), pre- and post-norm, Gemma's (1 + weight), strided rows, the
reference against torch, the dropout mask the same on every backend, and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads
from test_add_layer_norm import ADD_CASES
from test_layer_norm import make

import lmkern


@pytest.mark.parametrize("weight_offset", [0.0, 1.0], ids=["plain", "gemma"])
@pytest.mark.parametrize("case", ADD_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_add_rms_norm_matches_reference(device, backend, dtype, case, weight_offset):
    require(backend, device, dtype, "add_rms_norm")
    shape, p, prenorm, with_residual = ADD_CASES[case]
    x, r, w, _ = make(shape, dtype, device, residual=with_residual)

    def op(x, r, w, backend):
        return lmkern.add_rms_norm(x, r, w, dropout_p=p, prenorm=prenorm, weight_offset=weight_offset,
                                   backend=backend)

    outputs = ["out", "summed"] if prenorm else ["out"]
    assert_matches_reference(op, (x, r, w), backend, outputs + ["grad_x", "grad_residual", "grad_w"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_strided_rows_without_weight(backend):
    require(backend, "cpu", torch.float32, "add_rms_norm")
    x = torch.randn(5, 2, 64)[:, 1].requires_grad_()
    r = torch.randn(5, 128)[:, 32:96].requires_grad_()

    def op(x, r, backend):
        return lmkern.add_rms_norm(x, r, None, 1e-5, dropout_p=0.2, backend=backend)

    assert_matches_reference(op, (x, r), backend, ["out", "summed", "grad_x", "grad_r"])


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("shape", [(9, 7), (2, 3, 768)])
def test_reference_matches_torch(shape, prenorm):
    x, r, w, _ = make(shape, torch.float64, "cpu")

    def added(x, r, w):
        s = x + r
        out = F.rms_norm(s, (s.shape[-1],), w)
        return (out, s) if prenorm else out

    ours = outputs_and_grads(
        lambda *a: lmkern.add_rms_norm(*a, prenorm=prenorm, backend="torch"), (x, r, w), torch.float64
    )
    for a, e in zip(ours, outputs_and_grads(added, (x, r, w), torch.float64)):
        torch.testing.assert_close(a, e)


def test_backends_draw_the_same_mask_as_add_layer_norm():
    masks = {}
    for name in BACKENDS:
        require(name, "cpu", torch.float32, "add_rms_norm")
        x = torch.ones(64, 300)
        torch.manual_seed(3)
        masks[name] = lmkern.add_rms_norm(x, None, None, dropout_p=0.4, backend=name)[1] != 0
    torch.manual_seed(3)
    layer_norm_mask = lmkern.add_layer_norm(torch.ones(64, 300), None, None, None, dropout_p=0.4)[1] != 0
    for name, mask in masks.items():
        assert torch.equal(mask, layer_norm_mask), name


def _bad_calls():
    x, w = torch.randn(4, 10), torch.ones(10)
    add = lmkern.add_rms_norm
    return [
        (lambda: add(x, x[:3], w), ValueError, r"residual must have x's shape and device"),
        (lambda: add(x, x, w, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: add(x.long(), None, w), TypeError, "x must be a floating-point tensor"),
        (lambda: add(x, x, torch.ones(9)), ValueError, r"weight must have shape \(10,\)"),
        (lambda: add(x, x, None, weight_offset=1.0), ValueError, "weight_offset applies to a weight"),
        (lambda: add(x, x, w, eps=-1.0), ValueError, "eps must be >= 0, got -1.0"),
        (lambda: add(x, None, w, backend="gpu"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)
