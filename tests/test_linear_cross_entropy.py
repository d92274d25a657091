"""Linear + cross-entropy without logits: values and gradients against the unfused
computation under the tolerance rule, chunking, memory, and bad input."""

import pytest
import torch
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import bad_call_test
from numerics import assert_close_to_truth, truth_dtype

import lmkern
from lmkern.measure import PeakMemory

# id -> (hidden shape, vocab, bias, keyword arguments)
CASES = {
    "mean": ((37, 32), 300, True, {}),
    "sum_smoothing": ((37, 32), 300, False, dict(reduction="sum", label_smoothing=0.1)),
    "none_z_loss": ((2, 19, 32), 257, True, dict(reduction="none", z_loss=1e-3)),
    "ignore_index": ((37, 32), 300, True, dict(ignore_index=7)),
}


def make_case(case, dtype, device):
    shape, vocab, bias, kwargs = CASES[case]
    hidden = torch.randn(shape).to(device, dtype)
    weight = (torch.randn(vocab, shape[-1]) / shape[-1] ** 0.5).to(device, dtype)
    bias = torch.randn(vocab).to(device, dtype) if bias else None
    target = torch.randint(0, vocab, shape[:-1], device=device)
    target[torch.rand(target.shape, device=device) < 0.2] = kwargs.get("ignore_index", -100)
    return hidden, weight, bias, target, kwargs


def run(fused, hidden, weight, bias, target, kwargs, dtype=None, **options):
    """Loss and gradients of (hidden, weight, bias) for a fixed random upstream gradient.

    fused: lmkern.linear_cross_entropy with `options`; else the logits made in full and
    lmkern.cross_entropy on the torch reference (the unfused computation).
    """
    dtype = dtype or hidden.dtype
    inputs = [None if t is None else t.detach().to(dtype).requires_grad_() for t in (hidden, weight, bias)]
    h, w, b = inputs
    if fused:
        loss = lmkern.linear_cross_entropy(h, w, target, b, **kwargs, **options)
    else:
        logits = h @ w.T + (0 if b is None else b)
        loss = lmkern.cross_entropy(logits, target, backend="torch", **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(upstream.to(loss.device, loss.dtype))
    return [loss.detach()] + [None if t is None else t.grad for t in inputs]


@pytest.mark.parametrize("chunk_size", [8, 37, 100, None])
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_unfused(device, backend, dtype, case, chunk_size):
    require(backend, device, dtype, "cross_entropy")
    hidden, weight, bias, target, kwargs = make_case(case, dtype, device)
    fused = run(True, hidden, weight, bias, target, kwargs, backend=backend, chunk_size=chunk_size)
    truth = run(False, hidden, weight, bias, target, kwargs, truth_dtype(dtype))
    baseline = run(False, hidden, weight, bias, target, kwargs)
    for name, got, want, base in zip(("loss", "d_hidden", "d_weight", "d_bias"), fused, truth, baseline):
        if want is None:
            assert got is None
            continue
        assert got.dtype == dtype, name
        assert_close_to_truth(got, want, base, name=name)


def test_frozen_weight_gets_no_gradient():
    hidden, weight, bias, target, kwargs = make_case("mean", torch.float32, "cpu")
    hidden.requires_grad_()
    lmkern.linear_cross_entropy(hidden, weight, target, bias).backward()
    assert hidden.grad is not None and weight.grad is None and bias.grad is None


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "cross_entropy")
    hidden, weight, bias, target, kwargs = make_case("mean", torch.float32, "cpu")

    def step(h):
        return lmkern.linear_cross_entropy(h, weight, target, bias, chunk_size=8)

    assert_compiles_like_eager(step, hidden)


def test_peak_memory_is_one_chunk_of_logits():
    tokens, hidden_size, vocab, chunk = 2048, 32, 4096, 256
    hidden = torch.randn(tokens, hidden_size, requires_grad=True)
    weight = torch.randn(vocab, hidden_size, requires_grad=True)
    target = torch.randint(0, vocab, (tokens,))
    with PeakMemory() as unfused:
        lmkern.cross_entropy(hidden @ weight.T, target).backward()
    with PeakMemory() as fused:
        lmkern.linear_cross_entropy(hidden, weight, target, chunk_size=chunk).backward()
    logits_bytes = tokens * vocab * 4
    chunk_bytes = chunk * vocab * 4
    # Besides one chunk's logits: the gradients (hidden, fp32 weight) and their scaled copies.
    gradient_bytes = 2 * (hidden.numel() + weight.numel()) * 4
    assert unfused.peak >= logits_bytes
    assert fused.peak <= chunk_bytes + gradient_bytes + 64 * tokens, (fused.peak, chunk_bytes, gradient_bytes)


def _bad_calls():
    h, w, t = torch.randn(4, 8), torch.randn(10, 8), torch.randint(0, 10, (4,))
    lce = lmkern.linear_cross_entropy
    return [
        (lambda: lce(h, w[:, :7], t), ValueError, r"weight must have shape \(V, 8\)"),
        (lambda: lce(h, w.half(), t), ValueError, "weight must have hidden's dtype"),
        (lambda: lce(h, w, t, torch.randn(9)), ValueError, r"bias must have shape \(10,\)"),
        (lambda: lce(h, w, t[:3]), ValueError, r"target must have shape \(4,\)"),
        (lambda: lce(h, w, t, chunk_size=0), ValueError, "chunk_size must be a positive int"),
        (lambda: lce(h[0], w, t), ValueError, "hidden must be 2-D or 3-D"),
        (lambda: lce(h, w, t, reduction="mean_over_batch"), ValueError, "reduction must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_out_of_range_target_raises_on_cpu():
    hidden, weight, bias, target, kwargs = make_case("mean", torch.float32, "cpu")
    target[30] = 300
    with pytest.raises(ValueError, match=r"= 300 is outside \[0, 300\)"):
        lmkern.linear_cross_entropy(hidden, weight, target, bias)
