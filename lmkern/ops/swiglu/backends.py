"""The backends of lmkern.swiglu (see lmkern.backend): the gate and up projections with the
gated activation in their epilogue, and its backward, with no limits beyond their kinds'."""

from lmkern.backend import Native, Op, Reference, Triton

PACKAGE = "lmkern.ops.swiglu"
SWIGLU = Op("swiglu", Reference(PACKAGE), Triton(PACKAGE), Native(PACKAGE))
