"""RMSNorm: lmkern.rms_norm, on the LayerNorm Function and kernels of lmkern.ops.layer_norm
with rms=True (one reduction skeleton: the row is not centred, there is no bias, and
backward drops the mean(g) term). Backward saves the input and the fp32 rstd per row."""

from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops.layer_norm import (
    check_eps_dropout,
    check_float_tensor,
    check_normalized_shape,
    check_param,
    normalize_rows,
    rms_eps,
)
from lmkern.ops.rms_norm.backends import RMS_NORM


def check_weight_offset(weight_offset, weight):
    if not isinstance(weight_offset, (int, float)) or isinstance(weight_offset, bool):
        raise ArgumentTypeError(f"weight_offset must be a number (0.0, or 1.0 for Gemma), got {weight_offset!r}")
    if weight_offset and weight is None:
        raise ArgumentError(f"weight_offset applies to a weight, got weight_offset={weight_offset} and weight None")


def rms_norm(input, normalized_shape, weight=None, eps=None, *, weight_offset=0.0, backend=None):
    """torch.nn.functional.rms_norm on lmkern's kernels:
    out = input / sqrt(mean(input^2) + eps) * (weight_offset + weight).

    Args:
        input: (..., *normalized_shape), float32/float16/bfloat16 (float64 runs on the
            torch backend); any strides.
        normalized_shape: the trailing dimensions to normalise over (an int or a sequence
            of ints); they are normalised as one row of prod(normalized_shape) elements.
        weight: normalized_shape, or None; any float dtype (the kernels use it in fp32, and
            its gradient is returned in its own dtype).
        eps: added to the mean square; None, as in torch, means the epsilon of the dtype
            the statistics are computed in: torch.finfo(torch.float32).eps for fp32 and
            half inputs (fp64's for fp64), which is what torch's code does.
        weight_offset: the row is scaled by (weight_offset + weight), formed in fp32 (a new
            (D,) tensor when not 0). 0.0 (default) is torch's RMSNorm; 1.0 is Gemma's
            convention, whose weight is stored as the offset from 1 (zero-initialised).
            Needs a weight when not 0.
        backend: "torch", "triton", "native" or "auto"; see lmkern.backend. Rows wider
            than 64 KiB are refused by the GPU kernels (auto then runs the reference).

    Returns the normalised input, same shape and dtype: under torch.autocast too, which
    changes nothing here (fp32 weights beside half activations are not copied or cast
    down). The mean square is computed in fp32; backward saves only the input and the
    fp32 rstd per row, and sums the weight gradient in a fixed order (deterministic).
    """
    check_float_tensor(input, "input")
    shape = check_normalized_shape(input, normalized_shape)
    check_param(weight, "weight", shape, input)
    check_weight_offset(weight_offset, weight)
    eps = rms_eps(eps, input.dtype)
    check_eps_dropout(eps, 0.0)
    return normalize_rows(RMS_NORM, input, shape, weight, None, eps, backend, rms=True,
                          weight_offset=float(weight_offset))
