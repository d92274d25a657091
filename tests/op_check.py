"""What every op's tests share: its outputs and gradients on one backend against the
reference (or against torch's own function) under the tolerance rule of numerics.py, and
its bad-input test."""

import pytest
import torch
from numerics import assert_close_to_truth, truth_dtype


def outputs_and_grads(fn, inputs, dtype=None, seed=0):
    """fn's outputs and the gradients of its tensor inputs, all run in `dtype`.

    inputs: tensors (float ones are cast to dtype, unless it is None; those with
    requires_grad are leaves whose gradients are returned) or other values passed as they
    are. torch is seeded with `seed`
    first, so that an op's dropout draws the same mask in every run. Backward takes fixed
    random upstream gradients. Returns a list: the outputs, then the gradients (None for
    inputs that take none).
    """
    leaves = []
    for value in inputs:
        if isinstance(value, torch.Tensor) and value.is_floating_point():
            value = value.detach().to(dtype or value.dtype).requires_grad_(value.requires_grad)
        leaves.append(value)
    torch.manual_seed(seed)
    outputs = fn(*leaves)
    outputs = list(outputs) if isinstance(outputs, tuple) else [outputs]
    generator = torch.Generator().manual_seed(1)
    upstream = [torch.randn(out.shape, generator=generator).to(out.device, out.dtype) for out in outputs]
    wanted = [leaf for leaf in leaves if isinstance(leaf, torch.Tensor) and leaf.requires_grad]
    grads = iter(torch.autograd.grad(outputs, wanted, upstream, materialize_grads=True))  # zeros where unused
    return [out.detach() for out in outputs] + [
        next(grads) if isinstance(leaf, torch.Tensor) and leaf.requires_grad else None for leaf in leaves
    ]


def assert_matches_reference(op, inputs, backend, names, factor=2.0):
    """op(*inputs, backend=backend) against op(..., backend="torch") under the tolerance
    rule, for every output and every input gradient: truth in fp64 (fp32 inputs) or fp32
    (half inputs), baseline in the inputs' dtype. names: one per output, then one per input.
    inputs must already be in the dtype under test."""
    dtype = next(value.dtype for value in inputs if isinstance(value, torch.Tensor) and value.is_floating_point())
    actual = outputs_and_grads(lambda *a: op(*a, backend=backend), inputs, dtype)
    truth = outputs_and_grads(lambda *a: op(*a, backend="torch"), inputs, truth_dtype(dtype))
    baseline = outputs_and_grads(lambda *a: op(*a, backend="torch"), inputs, dtype)
    assert_all_close_to_truth(actual, truth, baseline, names, factor)


def assert_all_close_to_truth(actual, truth, baseline, names, factor=2.0):
    """Lists from outputs_and_grads, element by element under the tolerance rule, with the
    baseline's dtype (None where truth has no gradient either)."""
    assert len(actual) == len(names), (len(actual), names)
    for name, a, t, b in zip(names, actual, truth, baseline):
        if t is None:
            assert a is None, name
            continue
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, expected {b.dtype}"
        assert_close_to_truth(a, t, b, factor=factor, name=name)


def bad_call_test(make_calls):
    """The bad-input test of an op's test file: one case per (call, exception class, message
    pattern) of make_calls(), each raising that class with a message that matches."""

    @pytest.mark.parametrize("index", range(len(make_calls())))
    def test(index):
        call, error, message = make_calls()[index]
        with pytest.raises(error, match=message):
            call()

    return test


def at_thread_counts(run, counts=(1, 2)):
    """[run() with torch's intra-op threads set to each of counts], the count restored after:
    for checking that a kernel's result does not depend on how its work is split."""
    threads = torch.get_num_threads()
    results = []
    try:
        for count in counts:
            torch.set_num_threads(count)
            results.append(run())
    finally:
        torch.set_num_threads(threads)
    return results
