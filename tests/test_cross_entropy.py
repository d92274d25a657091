"""Fused softmax cross-entropy: every backend against the reference under the tolerance
rule, the reference against torch, the drop-in forms, the torch.library registration,
and bad input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import bad_call_test
from numerics import assert_close_to_truth, truth_dtype

import lmkern

# id -> (logits shape, keyword arguments, which targets are set to ignore_index)
CASES = {
    "basic": ((64, 1000), {}, "none"),
    "one_class": ((9, 1), {}, "none"),
    "gpt2_vocab": ((6, 50257), {}, "some"),
    "long_vocab_smoothing": ((3, 131072), dict(label_smoothing=0.1), "none"),
    "largest_vocab": ((2, 262144), dict(z_loss=1e-4), "none"),
    "batch_time": ((2, 7, 300), {}, "some"),
    "smoothing": ((64, 1000), dict(label_smoothing=0.1), "some"),
    "weight": ((64, 1000), dict(weight=True), "some"),
    "weight_smoothing_sum": ((48, 513), dict(weight=True, label_smoothing=0.2, reduction="sum"), "some"),
    "z_loss_none": ((64, 1000), dict(z_loss=1e-2, reduction="none"), "some"),
    "all_options_none": ((3, 11, 777), dict(weight=True, label_smoothing=0.05, z_loss=1e-3, reduction="none"), "some"),
    "ignore_index_in_range": ((32, 100), dict(ignore_index=3), "some"),
    "all_ignored_mean": ((16, 100), {}, "all"),
    "all_ignored_sum": ((16, 100), dict(reduction="sum"), "all"),
    "all_ignored_none_smoothing": ((16, 100), dict(reduction="none", label_smoothing=0.1), "all"),
}


def make_case(case, dtype=torch.float32, device="cpu"):
    shape, kwargs, ignore = CASES[case]
    vocab = shape[-1]
    logits = (3 * torch.randn(shape)).to(dtype)
    target = torch.randint(0, vocab, shape[:-1])
    kwargs = dict(kwargs)
    ignore_index = kwargs.get("ignore_index", -100)
    if ignore == "some":
        target[torch.rand(target.shape) < 0.25] = ignore_index
    elif ignore == "all":
        target.fill_(ignore_index)
    if kwargs.pop("weight", False):
        kwargs["weight"] = (torch.rand(vocab) + 0.5).to(device)
    return logits.to(device), target.to(device), kwargs


def loss_and_grad(logits, target, kwargs, backend, dtype=None):
    """The loss and d(loss)/d(logits) for a fixed random upstream gradient, in `dtype`."""
    dtype = dtype or logits.dtype
    x = logits.detach().to(dtype).requires_grad_()
    kwargs = {k: v.to(dtype) if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss = lmkern.cross_entropy(x, target, backend=backend, **kwargs)
    upstream = torch.rand(loss.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    loss.backward(upstream.to(loss.device, loss.dtype))
    return loss.detach(), x.grad


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, backend, dtype, case):
    require(backend, device, dtype, "cross_entropy")
    logits, target, kwargs = make_case(case, dtype, device)
    loss, grad = loss_and_grad(logits, target, kwargs, backend)
    assert loss.dtype == dtype and grad.dtype == dtype
    truth_loss, truth_grad = loss_and_grad(logits, target, kwargs, "torch", truth_dtype(dtype))
    base_loss, base_grad = loss_and_grad(logits, target, kwargs, "torch")
    assert_close_to_truth(loss, truth_loss, base_loss, name="loss")
    assert_close_to_truth(grad, truth_grad, base_grad, name="grad")


@pytest.mark.parametrize("case", [c for c, (_, kwargs, _) in CASES.items() if "z_loss" not in kwargs])
def test_reference_matches_torch(case):
    logits, target, kwargs = make_case(case, torch.float64)
    kwargs = {k: v.double() if isinstance(v, torch.Tensor) else v for k, v in kwargs.items()}
    loss, grad = loss_and_grad(logits, target, kwargs, "torch")
    vocab = logits.shape[-1]
    x = logits.detach().clone().requires_grad_()
    expected = F.cross_entropy(x.reshape(-1, vocab), target.reshape(-1), **kwargs)
    if kwargs.get("reduction") == "none":
        expected = expected.view(target.shape)
    upstream = torch.rand(expected.shape, generator=torch.Generator().manual_seed(1)) + 0.5
    expected.backward(upstream.double())
    torch.testing.assert_close(loss, expected.detach(), equal_nan=True)
    torch.testing.assert_close(grad, x.grad, equal_nan=True)


def test_z_loss_adds_mean_squared_logsumexp():
    logits, target, _ = make_case("basic", torch.float64)
    target[:5] = -100
    z = 1e-2
    with_z = lmkern.cross_entropy(logits, target, z_loss=z, backend="torch")
    without = lmkern.cross_entropy(logits, target, backend="torch")
    lse = torch.logsumexp(logits[target != -100], dim=-1)
    torch.testing.assert_close(with_z - without, z * (lse**2).mean())


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_logits(backend):
    require(backend, "cpu", torch.float32, "cross_entropy")
    wide = 3 * torch.randn(40, 600)
    target = torch.randint(0, 300, (40,))
    for logits in (wide[:, :300], wide[:, ::2], wide.T[:300].T):  # strided rows, strided columns
        loss, grad = loss_and_grad(logits, target, {}, backend)
        ref_loss, ref_grad = loss_and_grad(logits.contiguous(), target, {}, "torch", torch.float64)
        base_loss, base_grad = loss_and_grad(logits.contiguous(), target, {}, "torch")
        assert_close_to_truth(loss, ref_loss, base_loss, name="loss")
        assert_close_to_truth(grad, ref_grad, base_grad, name="grad")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_inplace_backward(device, backend):
    require(backend, device, torch.float32, "cross_entropy")
    hidden = torch.randn(32, 16, device=device, requires_grad=True)
    head = torch.randn(16, 500, device=device)
    target = torch.randint(0, 500, (32,), device=device)
    expected_loss = lmkern.cross_entropy(hidden @ head, target, label_smoothing=0.1, backend=backend)
    (expected,) = torch.autograd.grad(expected_loss, hidden)

    logits = hidden @ head
    loss = lmkern.cross_entropy(logits, target, label_smoothing=0.1, inplace_backward=True, backend=backend)
    loss.backward()
    torch.testing.assert_close(loss, expected_loss, rtol=0, atol=0)
    torch.testing.assert_close(hidden.grad, expected, rtol=0, atol=0)
    # The logits now hold d(loss)/d(logits): no new (N, V) tensor was made for it.
    torch.testing.assert_close(hidden.grad, logits.detach() @ head.T)


def test_inplace_backward_invalidates_other_saved_uses_of_the_logits():
    hidden = torch.randn(8, 4, requires_grad=True)
    logits = hidden @ torch.randn(4, 10)
    squares = logits.pow(2).sum()  # saves the logits for its backward
    loss = lmkern.cross_entropy(logits, torch.randint(0, 10, (8,)), inplace_backward=True)
    with pytest.raises(RuntimeError, match="modified by an inplace operation"):
        (loss + squares).backward()


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_twice_with_retain_graph(backend):
    require(backend, "cpu", torch.float32, "cross_entropy")
    logits, target, kwargs = make_case("smoothing")
    x = logits.requires_grad_()
    loss = lmkern.cross_entropy(x, target, backend=backend, **kwargs)
    loss.backward(retain_graph=True)
    first = x.grad.clone()
    loss.backward()
    torch.testing.assert_close(x.grad, 2 * first)


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("bad", [1000, -5])
def test_out_of_range_target_raises_on_cpu(backend, bad):
    require(backend, "cpu", torch.float32, "cross_entropy")
    logits = torch.randn(8, 1000)
    target = torch.randint(0, 1000, (8,))
    target[5] = bad
    with pytest.raises(ValueError, match=rf"target\[5\] = {bad} is outside \[0, 1000\)"):
        lmkern.cross_entropy(logits, target, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_target_gives_nan_row_on_gpu(backend):
    require(backend, "cuda", torch.float32, "cross_entropy")
    logits = torch.randn(8, 1000, device="cuda", requires_grad=True)
    target = torch.randint(0, 1000, (8,), device="cuda")
    target[5] = 1000
    loss = lmkern.cross_entropy(logits, target, reduction="none", backend=backend)
    loss.sum().backward()
    assert loss[5].isnan() and loss[torch.arange(8) != 5].isfinite().all()
    assert logits.grad[5].isnan().all() and logits.grad[torch.arange(8) != 5].isfinite().all()
    assert lmkern.cross_entropy(logits, target, backend=backend).isnan()
    torch.cuda.synchronize()  # the CUDA context is still usable


def _bad_calls():
    x, t = torch.randn(4, 10), torch.randint(0, 10, (4,))
    ce = lmkern.cross_entropy
    return [
        (lambda: ce(x[0], t), ValueError, "input must be 2-D or 3-D"),
        (lambda: ce(x.long(), t), TypeError, "input must be a floating-point tensor"),
        (lambda: ce(x, t.float()), TypeError, "target must hold class indices"),
        (lambda: ce(x, t[:3]), ValueError, r"target must have shape \(4,\)"),
        (lambda: ce(x[:, :0], t), ValueError, "at least one class"),
        (lambda: ce(x, t, weight=torch.ones(9)), ValueError, r"weight must have shape \(10,\)"),
        (lambda: ce(x, t, reduction="avg"), ValueError, "reduction must be one of"),
        (lambda: ce(x, t, label_smoothing=1.5), ValueError, r"label_smoothing must be in \[0, 1\]"),
        (lambda: ce(x, t, z_loss=-1.0), ValueError, "z_loss must be >= 0"),
        (lambda: ce(x, t, ignore_index=1.5), TypeError, "ignore_index must be an int"),
        (lambda: ce(x, t, backend="cuda"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_float64_runs_on_torch_under_auto_and_is_refused_by_kernels():
    logits, target, _ = make_case("basic", torch.float64)
    expected = F.cross_entropy(logits, target)
    torch.testing.assert_close(lmkern.cross_entropy(logits, target), expected)
    with pytest.raises(lmkern.BackendUnavailableError, match="float32, float16 or bfloat16"):
        lmkern.cross_entropy(logits, target, backend="native")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("op", ["cross_entropy_fwd", "cross_entropy_fwd_"])
def test_native_ops_pass_opcheck(device, op):
    require("native", device, torch.float32, "cross_entropy")
    logits = torch.randn(16, 300, device=device)
    target = torch.randint(0, 300, (16,), device=device)
    target[3] = -100
    weight = torch.rand(300, device=device)
    for args in ((logits.clone(), target, weight, -100, 0.1, 1e-3), (logits.clone(), target, None, -100, 0.0, 0.0)):
        torch.library.opcheck(getattr(torch.ops.lmkern, op).default, args)


@pytest.mark.parametrize("inplace_backward", [False, True])
def test_compiles_with_fullgraph_on_cpu(inplace_backward):
    require("native", "cpu", torch.float32, "cross_entropy")
    logits, target, kwargs = make_case("all_options_none")
    head = torch.randn(logits.shape[-1], logits.shape[-1]) / 30

    def step(x):
        # A matmul first, so that inplace_backward overwrites an intermediate, not the input.
        return lmkern.cross_entropy(x @ head, target, inplace_backward=inplace_backward, **kwargs).sum()

    assert_compiles_like_eager(step, logits)


# The drop-in forms keep torch's layouts: classes in dim 1, unbatched (C,), legacy arguments.
DROP_IN = {
    "unbatched": ((10,), ()),
    "rows": ((6, 10), (6,)),
    "spatial": ((3, 10, 4, 5), (3, 4, 5)),
}


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("layout", DROP_IN)
def test_functional_matches_torch_layouts(layout, reduction):
    input_shape, target_shape = DROP_IN[layout]
    x = torch.randn(input_shape, dtype=torch.float64)
    target = torch.randint(0, 10, target_shape)
    weight = torch.rand(10, dtype=torch.float64) + 0.5
    kwargs = dict(weight=weight, reduction=reduction, label_smoothing=0.1)
    torch.testing.assert_close(
        lmkern.functional.cross_entropy(x, target, **kwargs), F.cross_entropy(x, target, **kwargs)
    )


def test_functional_legacy_and_probability_targets():
    x = torch.randn(6, 10, dtype=torch.float64)
    target = torch.randint(0, 10, (6,))
    torch.testing.assert_close(
        lmkern.functional.cross_entropy(x, target, None, False), F.cross_entropy(x, target, reduction="sum")
    )
    probabilities = torch.softmax(torch.randn(6, 10, dtype=torch.float64), dim=1)
    torch.testing.assert_close(
        lmkern.functional.cross_entropy(x, probabilities), F.cross_entropy(x, probabilities)
    )
    with pytest.raises(ValueError, match="class-probability targets"):
        lmkern.functional.cross_entropy(x, probabilities, backend="native")
    with pytest.raises(ValueError, match=r"target must have shape \(6,\)"):
        lmkern.functional.cross_entropy(x, target[:5])


def test_module_is_a_drop_in_for_torch():
    weight = torch.rand(10) + 0.5
    ours = lmkern.nn.CrossEntropyLoss(weight, ignore_index=2, label_smoothing=0.1, z_loss=1e-4)
    theirs = torch.nn.CrossEntropyLoss(weight, ignore_index=2, label_smoothing=0.1)
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    assert isinstance(ours, torch.nn.CrossEntropyLoss) and "z_loss=0.0001" in repr(ours)
    x, target = torch.randn(3, 10, 4), torch.randint(0, 10, (3, 4))
    plain = lmkern.nn.CrossEntropyLoss(weight, ignore_index=2, label_smoothing=0.1)
    torch.testing.assert_close(plain(x, target), theirs(x, target))
    assert ours(x, target) > plain(x, target)
