"""Residual add + dropout + RMSNorm in one pass: lmkern.add_rms_norm, on the Function and
kernels of lmkern.ops.layer_norm with rms=True, as lmkern.add_layer_norm is without."""

from lmkern.ops.add_layer_norm import add_and_normalize
from lmkern.ops.rms_norm import check_weight_offset
from lmkern.ops.rms_norm.backends import ADD_RMS_NORM


def add_rms_norm(x, residual, weight, eps=None, *, dropout_p=0.0, prenorm=True, weight_offset=0.0, backend=None):
    """s = residual + dropout(x), then RMSNorm of s over the last dimension, in one pass.

    Args:
        x: (..., D), float32/float16/bfloat16: a sub-layer's output.
        residual: the residual stream, shaped like x, or None (s = dropout(x)). Of x's
            dtype or another: s is computed in the residual's dtype, x cast to it.
        weight: (D,) or None.
        eps: added to the mean square; None as in lmkern.rms_norm (fp32's epsilon for
            fp32 and half s).
        dropout_p: drop probability for x, as in lmkern.add_layer_norm (lmkern's
            counter-based RNG, the same mask on every backend, drawn again in backward).
        prenorm: True (pre-norm, Llama) returns (RMSNorm(s), s), s being the new residual
            stream; False (post-norm) returns RMSNorm(s) alone. Both in s's dtype.
        weight_offset: 0.0, or 1.0 for Gemma's (1 + weight); as in lmkern.rms_norm.
        backend: as in lmkern.rms_norm.

    Saves for backward s and the fp32 rstd per row. torch.autocast changes nothing: the
    statistics are fp32 whatever the dtypes.
    """
    check_weight_offset(weight_offset, weight)
    return add_and_normalize(ADD_RMS_NORM, x, residual, weight, None, eps, dropout_p, prenorm, backend, rms=True,
                             weight_offset=float(weight_offset))
