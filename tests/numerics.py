"""The tolerance rule of DESIGN.md."""

import torch


def truth_dtype(dtype):
    """The reference runs in fp64 for fp32 inputs and in fp32 for half inputs."""
    return torch.float64 if dtype == torch.float32 else torch.float32


def assert_close_to_truth(actual, truth, baseline, factor=2.0, name="output"):
    """max|actual - truth| <= factor * max|baseline - truth| + floor.

    truth: the reference in higher precision; baseline: the reference in the input dtype.
    floor is one epsilon of actual's dtype at the scale of max|truth|, so an exact
    baseline does not demand an exact kernel. NaN and inf must be where truth has them.
    """
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    eps = torch.finfo(actual.dtype).eps
    actual, truth, baseline = actual.double(), truth.double(), baseline.double()
    special = ~torch.isfinite(truth)
    assert torch.equal(~torch.isfinite(actual), special), f"{name}: NaN/inf where truth has none, or missing"
    assert torch.equal(actual[special].nan_to_num(), truth[special].nan_to_num()), f"{name}: wrong NaN/inf"
    finite = ~special
    if not finite.any():
        return
    error = (actual - truth)[finite].abs().max().item()
    baseline_error = (baseline - truth)[finite].abs().max().item()
    floor = eps * truth[finite].abs().max().item()
    bound = factor * baseline_error + floor
    assert error <= bound, f"{name}: max error {error:.3g} > {factor} * baseline {baseline_error:.3g} + floor {floor:.3g}"
