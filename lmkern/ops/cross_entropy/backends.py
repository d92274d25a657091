"""The backends of lmkern.cross_entropy (see lmkern.backend): any number of classes, and
no limits beyond their kinds'."""

from lmkern.backend import Native, Op, Reference, Triton

PACKAGE = "lmkern.ops.cross_entropy"
CROSS_ENTROPY = Op("cross_entropy", Reference(PACKAGE), Triton(PACKAGE), Native(PACKAGE))
