"""The backends of lmkern.ffn (see lmkern.backend): the kernels of lmkern.linear_gelu and of
lmkern.layer_norm together (the Function loads both by the one name resolved), with the
LayerNorm kernels' row limit. Calls carry `width`, the hidden size D."""

from lmkern.backend import Native, Op, Reference, Triton
from lmkern.ops.layer_norm.backends import cuda_row_limit, row_limit

KERNELS = "lmkern.ops.linear_gelu"
FFN = Op("ffn", Reference(KERNELS), Triton(KERNELS, row_limit), Native(KERNELS, cuda_row_limit))
