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
    finite = _check_special_values(actual, truth, name)
    if finite.any():
        baseline_error = (baseline.double() - truth.double())[finite].abs().max().item()
        _check_error(actual, truth, finite, factor * baseline_error, factor, name)


def assert_mean_loss_close_to_truth(actual, truth, baseline_rows, truth_rows, factor=2.0, name="loss"):
    """The tolerance rule for a scalar loss that is a mean of per-row losses (or a sum of
    such means), with the baseline error taken over the rows: the error of one scalar is a
    single sample, no statistic to scale a bound by, whereas the largest error of the
    reference's row losses in the input dtype (baseline_rows, against truth_rows) says how
    precisely that dtype computes a row, and so the mean."""
    finite = _check_special_values(actual, truth, name)
    if finite.any():
        baseline_error = (baseline_rows.double() - truth_rows.double()).abs().max().item()
        _check_error(actual, truth, finite, factor * baseline_error, factor, name)


def _check_special_values(actual, truth, name):
    """Checks shapes and that NaN and inf are where truth has them; returns where truth is finite."""
    assert actual.shape == truth.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(truth.shape)}"
    actual, truth = actual.double(), truth.double()
    special = ~torch.isfinite(truth)
    assert torch.equal(~torch.isfinite(actual), special), f"{name}: NaN/inf where truth has none, or missing"
    assert torch.equal(actual[special].nan_to_num(), truth[special].nan_to_num()), f"{name}: wrong NaN/inf"
    return ~special


def _check_error(actual, truth, finite, allowed, factor, name):
    """max|actual - truth| over `finite` <= allowed + one epsilon of actual's dtype at max|truth|."""
    eps = torch.finfo(actual.dtype).eps
    truth = truth.double()[finite]
    error = (actual.double()[finite] - truth).abs().max().item()
    floor = eps * truth.abs().max().item()
    assert error <= allowed + floor, (
        f"{name}: max error {error:.3g} > {factor} * baseline {allowed / factor:.3g} + floor {floor:.3g}"
    )
