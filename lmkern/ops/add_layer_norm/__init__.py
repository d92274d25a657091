"""Residual add + dropout + LayerNorm in one pass: lmkern.add_layer_norm, on the LayerNorm
Function and kernels of lmkern.ops.layer_norm (their Function takes the residual and the
dropout; the sum is saved for backward instead of the input). lmkern.add_rms_norm shares
add_and_normalize."""

from lmkern import philox
from lmkern.errors import ArgumentError
from lmkern.ops.layer_norm import (
    LayerNormFunction,
    as_rows,
    as_stats_param,
    check_eps_dropout,
    check_float_tensor,
    check_param,
    resolve_rows,
    rms_eps,
)
from lmkern.ops.layer_norm.backends import ADD_LAYER_NORM


def add_layer_norm(x, residual, weight, bias, eps=1e-5, *, dropout_p=0.0, prenorm=True, backend=None):
    """s = residual + dropout(x), then LayerNorm of s over the last dimension, in one pass.

    Args:
        x: (..., D), float32/float16/bfloat16: a sub-layer's output.
        residual: the residual stream, shaped like x, or None (s = dropout(x)). Of x's
            dtype or another: s is computed in the residual's dtype, x cast to it (a
            half-precision branch added to an fp32 stream, as under torch.autocast).
        weight, bias: (D,) or None.
        eps: added to the variance.
        dropout_p: drop probability for x (as F.dropout with training=True). The mask comes
            from lmkern's counter-based RNG seeded from torch's generator (torch.manual_seed
            reproduces it; every backend draws the same mask) and is drawn again in backward,
            never stored.
        prenorm: True (pre-LN, GPT) returns (LayerNorm(s), s), s being the new residual
            stream; False (post-LN, BERT) returns LayerNorm(s) alone. Both in s's dtype.
        backend: as in lmkern.layer_norm.

    Saves for backward s and the fp32 mean and rstd per row. torch.autocast changes
    nothing: the statistics are fp32 whatever the dtypes.
    """
    return add_and_normalize(ADD_LAYER_NORM, x, residual, weight, bias, eps, dropout_p, prenorm, backend)


def add_and_normalize(op, x, residual, weight, bias, eps, dropout_p, prenorm, backend, rms=False, weight_offset=0.0):
    """add_layer_norm (op ADD_LAYER_NORM), or add_rms_norm (op ADD_RMS_NORM, rms True, bias
    None, weight_offset as in lmkern.rms_norm): the checks, then LayerNormFunction."""
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ArgumentError("x must have at least one dimension (..., D), got a scalar")
    if residual is not None:
        check_float_tensor(residual, "residual")
        if residual.shape != x.shape or residual.device != x.device:
            raise ArgumentError(
                f"residual must have x's shape and device ({tuple(x.shape)}, {x.device}), "
                f"got {tuple(residual.shape)}, {residual.device}"
            )
        x = x.to(residual.dtype)  # the sum is the residual stream: in its dtype
    width = x.shape[-1]
    check_param(weight, "weight", (width,), x)
    check_param(bias, "bias", (width,), x)
    if rms:
        eps = rms_eps(eps, x.dtype)
    check_eps_dropout(eps, dropout_p)
    name = resolve_rows(op, x, width, backend)
    outputs = LayerNormFunction.apply(
        as_rows(x, width),
        None if residual is None else as_rows(residual, width),
        as_stats_param(weight, width, x.dtype, weight_offset),
        as_stats_param(bias, width, x.dtype),
        float(eps),
        float(dropout_p),
        philox.draw_seed() if dropout_p > 0 else 0,
        prenorm,
        rms,
        name,
    )
    if prenorm:
        out, summed = outputs
        return out.view(x.shape), summed.view(x.shape)
    return outputs.view(x.shape)
