"""The backends of lmkern.linear_gelu (see lmkern.backend): a matmul with a fused epilogue,
with no limits beyond their kinds'."""

from lmkern.backend import Native, Op, Reference, Triton

PACKAGE = "lmkern.ops.linear_gelu"
LINEAR_GELU = Op("linear_gelu", Reference(PACKAGE), Triton(PACKAGE), Native(PACKAGE))
