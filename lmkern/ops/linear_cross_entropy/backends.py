"""The backends of lmkern.linear_cross_entropy (see lmkern.backend): cross_entropy's
kernels (the matmuls are torch's), with no limits beyond their kinds'."""

from lmkern.backend import Native, Op, Reference, Triton

KERNELS = "lmkern.ops.cross_entropy"
LINEAR_CROSS_ENTROPY = Op("linear_cross_entropy", Reference(KERNELS), Triton(KERNELS), Native(KERNELS))
