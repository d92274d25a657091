"""The backends of lmkern.rms_norm and lmkern.add_rms_norm (see lmkern.backend): LayerNorm's
implementations with rms=True (lmkern.ops.layer_norm), so LayerNorm's limits. Their calls
carry `width`, the elements of a row (the product of normalized_shape)."""

from lmkern.backend import Native, Op, Reference, Triton
from lmkern.ops.layer_norm.backends import PACKAGE, cuda_row_limit, row_limit

RMS_NORM = Op("rms_norm", Reference(PACKAGE), Triton(PACKAGE, row_limit), Native(PACKAGE, cuda_row_limit))
ADD_RMS_NORM = Op("add_rms_norm", Reference(PACKAGE), Triton(PACKAGE, row_limit), Native(PACKAGE, cuda_row_limit))
