"""RMSNorm (lmkern.rms_norm, on LayerNorm's kernels with the RMS switch): every backend
against the reference under the tolerance rule (outputs and all gradients), Gemma's
(1 + weight), eps=None, multi-dimensional normalized_shape, strided input, the reference
against torch.nn.functional.rms_norm, deterministic weight gradients, the GPU kernels' row
limit, the drop-in module (state_dict of torch.nn.RMSNorm), the torch.library registration,
torch.compile, and bad input. Residual add + dropout + RMSNorm: tests/test_add_rms_norm.py;
against torch over a grid of calls: tests/test_dropin.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads
from test_layer_norm import (
    SHAPES,
    assert_deterministic,
    assert_gpu_kernels_refuse_wide_rows,
    assert_runs_empty_rows,
    bad_input_and_shape_calls,
    make,
)

import lmkern
from lmkern.ops.rms_norm.backends import RMS_NORM


def rms_norm_op(weight_offset=0.0, eps=1e-6):
    def op(x, w, backend):
        return lmkern.rms_norm(x, (x.shape[-1],), w, eps=eps, weight_offset=weight_offset, backend=backend)

    return op


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_rms_norm_matches_reference(device, backend, dtype, shape):
    require(backend, device, dtype, "rms_norm")
    x, _, w, _ = make(SHAPES[shape][0], dtype, device, residual=False)
    # A row of one element normalises to x / sqrt(x^2 + eps), whose gradient is all
    # cancellation (1 - xhat^2) at a small eps: the "truth" in fp32 (half inputs) is then
    # no truth. A large eps keeps the width-1 case meaningful.
    eps = 1.0 if SHAPES[shape][1] == 1 else 1e-6
    assert_matches_reference(rms_norm_op(eps=eps), (x, w), backend, ["out", "grad_x", "grad_weight"])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_gemma_weight_offset_and_default_eps(device, backend, dtype):
    require(backend, device, dtype, "rms_norm")
    x, _, w, _ = make((2, 3, 300), dtype, device, residual=False)
    w = (w.detach() - 1).requires_grad_()  # Gemma stores the offset from 1, near 0
    assert_matches_reference(rms_norm_op(1.0, eps=None), (x, w), backend, ["out", "grad_x", "grad_weight"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_weight_and_noncontiguous(backend):
    require(backend, "cpu", torch.float32, "rms_norm")
    wide = torch.randn(6, 2, 300)
    for view in (wide[:, 0], wide[:, :, ::2], wide.transpose(0, 1), wide[::2]):
        x = view.requires_grad_()  # the strided view itself
        for w in (None, (torch.rand(x.shape[-1]) + 0.5).requires_grad_()):
            assert_matches_reference(rms_norm_op(), (x, w), backend, ["out", "grad_x", "grad_weight"])


def test_multidimensional_normalized_shape_int_and_default_eps():
    x = torch.randn(3, 4, 5, 6, dtype=torch.float64)
    w = torch.rand(5, 6, dtype=torch.float64)
    for name in ("torch", "native"):
        require(name, "cpu", torch.float32, "rms_norm")
        torch.testing.assert_close(
            lmkern.rms_norm(x.float(), (5, 6), w.float(), backend=name), F.rms_norm(x, (5, 6), w).float()
        )
        # eps=None: fp32's epsilon for half input too, as torch's code (not fp16's).
        small = (torch.randn(4, 8) * 1e-3).half()
        torch.testing.assert_close(lmkern.rms_norm(small, 8, backend=name), F.rms_norm(small, (8,)))
    torch.testing.assert_close(lmkern.rms_norm(x, 6), F.rms_norm(x, (6,)))


@pytest.mark.parametrize("weight_offset", [0.0, 1.0])
@pytest.mark.parametrize("shape", ["odd_7", "gpt2_3d"])
def test_reference_matches_torch(shape, weight_offset):
    x, _, w, _ = make(SHAPES[shape][0], torch.float64, "cpu", residual=False)
    ours = outputs_and_grads(lambda *a: rms_norm_op(weight_offset)(*a, backend="torch"), (x, w), torch.float64)
    theirs = outputs_and_grads(
        lambda x, w: F.rms_norm(x, (x.shape[-1],), weight_offset + w, eps=1e-6), (x, w), torch.float64
    )
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_weight_gradients_are_deterministic(backend):
    require(backend, "cpu", torch.float32, "rms_norm")
    x, _, w, _ = make((300, 96), torch.float32, "cpu", residual=False)
    assert_deterministic(rms_norm_op(), (x, w), backend)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_rows(backend):
    require(backend, "cpu", torch.float32, "rms_norm")
    assert_runs_empty_rows(lambda x, w: lmkern.rms_norm(x, (10,), w, backend=backend))


def test_gpu_kernels_refuse_wide_rows_and_auto_falls_back(monkeypatch):
    require("triton", "cpu", torch.float32, "rms_norm")
    assert_gpu_kernels_refuse_wide_rows(
        RMS_NORM, lambda x, width, backend=None: lmkern.rms_norm(x, (width,), backend=backend), F.rms_norm,
        monkeypatch,
    )


def test_module_is_a_drop_in_for_torch():
    theirs = torch.nn.RMSNorm((4, 6), eps=1e-6)
    torch.nn.init.normal_(theirs.weight)
    ours = lmkern.nn.RMSNorm((4, 6), eps=1e-6, backend="torch")
    assert isinstance(ours, torch.nn.RMSNorm) and "backend='torch'" in repr(ours)
    ours.load_state_dict(theirs.state_dict())
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    x = torch.randn(2, 3, 4, 6)
    torch.testing.assert_close(ours(x), theirs(x))
    theirs.load_state_dict(ours.state_dict())
    plain = lmkern.nn.RMSNorm(6, elementwise_affine=False)
    assert list(plain.state_dict()) == [] and plain.eps is None
    torch.testing.assert_close(plain(x[..., 0, :]), F.rms_norm(x[..., 0, :], (6,)))
    torch.testing.assert_close(lmkern.functional.rms_norm(x, (6,)), F.rms_norm(x, (6,)))


def test_gemma_module_starts_as_identity_scale():
    gemma = lmkern.nn.RMSNorm(6, weight_offset=1.0)
    assert torch.equal(gemma.weight, torch.zeros(6)) and "weight_offset=1.0" in repr(gemma)
    x = torch.randn(3, 6)
    torch.testing.assert_close(gemma(x), F.rms_norm(x, (6,)))
    gemma.reset_parameters()
    assert torch.equal(gemma.weight, torch.zeros(6))


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device):
    require("native", device, torch.float32, "rms_norm")
    x, r = torch.randn(6, 40, device=device), torch.randn(6, 40, device=device)
    w = torch.rand(40, device=device)
    forward = torch.ops.lmkern.layer_norm_fwd.default
    torch.library.opcheck(forward, (x, r, w, None, 1e-5, 0.2, 123, True, True))
    torch.library.opcheck(forward, (x, None, None, None, 1e-5, 0.0, 0, False, True))
    out, mean, rstd, summed = forward(x, r, w, None, 1e-5, 0.2, 123, True, True)
    assert mean.numel() == 0
    backward = torch.ops.lmkern.layer_norm_bwd.default
    torch.library.opcheck(backward, (torch.randn_like(x), torch.randn_like(x), summed, w, mean, rstd, 0.2, 123, False,
                                     True))
    torch.library.opcheck(backward, (torch.randn_like(x), None, summed, None, mean, rstd, 0.0, 0, False, True))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "rms_norm")
    w = torch.rand(50) + 0.5
    residual = torch.randn(4, 7, 50)

    def step(x):
        out, summed = lmkern.add_rms_norm(x, residual, w)
        return lmkern.rms_norm(out * summed, (50,), w, weight_offset=1.0).square().sum()

    assert_compiles_like_eager(step, torch.randn(4, 7, 50))


def _bad_calls():
    x, w = torch.randn(4, 10), torch.ones(10)
    rms = lmkern.rms_norm
    return [
        *bad_input_and_shape_calls(rms, x),
        (lambda: rms(x, (10,), w, eps=-1.0), ValueError, "eps must be >= 0, got -1.0"),
        (lambda: rms(x, (10,), None, weight_offset=1.0), ValueError,
         "weight_offset applies to a weight, got weight_offset=1.0 and weight None"),
        (lambda: rms(x, (10,), w, weight_offset="gemma"), TypeError,
         r"weight_offset must be a number \(0.0, or 1.0 for Gemma\), got 'gemma'"),
        (lambda: rms(x, (10,), w, backend="gpu"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "rms_norm")
    x, w = torch.randn(4, 10), torch.ones(10)
    with pytest.raises(RuntimeError, match="layer_norm_fwd: rms takes no bias, got one"):
        torch.ops.lmkern.layer_norm_fwd(x, None, w, w, 1e-5, 0.0, 0, False, True)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: rms takes no bias, got has_bias"):
        torch.ops.lmkern.layer_norm_bwd(x, None, x, w, torch.zeros(0), torch.zeros(4), 0.0, 0, True, True)
    with pytest.raises(RuntimeError, match="layer_norm_bwd: mean and rstd must be contiguous float32"):
        torch.ops.lmkern.layer_norm_bwd(x, None, x, None, torch.zeros(0), torch.zeros(3), 0.0, 0, False, True)
