"""lmkern: fused attention, LayerNorm/RMSNorm/GELU and gated (SwiGLU) feed-forward,
cross-entropy and rotary-embedding kernels for language models, each with a PyTorch
reference, Triton kernels and a C++/CUDA extension behind one function (choose with `backend=` or
`lmkern.use_backend`), and GPT and BERT models built on them (lmkern.models).

Importing lmkern queries no device and does not import triton.
"""

from lmkern import functional, nn
from lmkern.backend import BackendUnavailableError, use_backend
from lmkern.ops.attention import scaled_dot_product_attention
from lmkern.ops.attention_with_kv_cache import attention_with_kv_cache
from lmkern.ops.cross_entropy import cross_entropy
from lmkern.ops.linear_cross_entropy import linear_cross_entropy
from lmkern.ops.ffn import ffn
from lmkern.ops.add_layer_norm import add_layer_norm
from lmkern.ops.add_rms_norm import add_rms_norm
from lmkern.ops.apply_rotary import apply_rotary, rotary_cache
from lmkern.ops.layer_norm import layer_norm
from lmkern.ops.rms_norm import rms_norm
from lmkern.ops.linear_gelu import linear_gelu
from lmkern.ops.swiglu import swiglu

__version__ = "0.1.0"

__all__ = [
    "BackendUnavailableError",
    "add_layer_norm",
    "add_rms_norm",
    "apply_rotary",
    "attention_with_kv_cache",
    "cross_entropy",
    "ffn",
    "functional",
    "layer_norm",
    "linear_cross_entropy",
    "linear_gelu",
    "nn",
    "rms_norm",
    "rotary_cache",
    "scaled_dot_product_attention",
    "swiglu",
    "use_backend",
]
