"""One call of every Triton kernel per dtype, forward and backward, against the reference
under the tolerance rule: the GPU check's first look at the Triton kernels (its first
command runs the cuda cases with LMKERN_TRITON_ONE_CONFIG=1, one compile per kernel).
The other test files cover each op's arguments and shapes in depth."""

import pytest
import torch
from conftest import DEVICES, DTYPES, require
from numerics import assert_close_to_truth, truth_dtype
from op_check import assert_matches_reference

import lmkern


def randn(*shape, device, dtype, grad=True):
    return torch.randn(*shape).to(device, dtype).requires_grad_(grad)


def cross_entropy(device, dtype):
    logits = randn(64, 1000, device=device, dtype=dtype)
    target = torch.randint(0, 1000, (64,), device=device)
    return lambda x, t, backend: lmkern.cross_entropy(x, t, backend=backend), (logits, target), ["loss", "grad", None]


def linear_cross_entropy(device, dtype):
    hidden, weight = randn(64, 96, device=device, dtype=dtype), randn(500, 96, device=device, dtype=dtype)
    target = torch.randint(0, 500, (64,), device=device)

    def op(h, w, t, backend):
        return lmkern.linear_cross_entropy(h, w, t, backend=backend)

    return op, (hidden, weight, target), ["loss", "grad_hidden", "grad_weight", None]


def add_layer_norm(device, dtype):
    x, r = randn(64, 768, device=device, dtype=dtype), randn(64, 768, device=device, dtype=dtype)
    w, b = randn(768, device=device, dtype=dtype), randn(768, device=device, dtype=dtype)

    def op(x, r, w, b, backend):
        return lmkern.add_layer_norm(x, r, w, b, dropout_p=0.1, backend=backend)

    return op, (x, r, w, b), ["out", "summed", "grad_x", "grad_r", "grad_w", "grad_b"]


def wide_layer_norm(device, dtype):
    """A row wider than the fused backward takes (the two-kernel path)."""
    x, w, b = randn(4, 12000, device=device, dtype=dtype), randn(12000, device=device, dtype=dtype), None

    def op(x, w, backend):
        return lmkern.layer_norm(x, (12000,), w, b, backend=backend)

    return op, (x, w), ["out", "grad_x", "grad_w"]


def add_rms_norm(device, dtype):
    """LayerNorm's kernels with the RMS switch, Gemma's (1 + weight)."""
    x, r, w = randn(64, 768, device=device, dtype=dtype), randn(64, 768, device=device, dtype=dtype), randn(
        768, device=device, dtype=dtype)

    def op(x, r, w, backend):
        return lmkern.add_rms_norm(x, r, w, dropout_p=0.1, weight_offset=1.0, backend=backend)

    return op, (x, r, w), ["out", "summed", "grad_x", "grad_r", "grad_w"]


def wide_rms_norm(device, dtype):
    """RMSNorm on the two-kernel backward path."""
    x, w = randn(4, 12000, device=device, dtype=dtype), randn(12000, device=device, dtype=dtype)

    def op(x, w, backend):
        return lmkern.rms_norm(x, (12000,), w, backend=backend)

    return op, (x, w), ["out", "grad_x", "grad_w"]


def ffn(device, dtype):
    """Pre-LN with dropout: LayerNorm, both matmul epilogues (GELU; dropout + residual) and
    their backward."""
    x = randn(64, 128, device=device, dtype=dtype)
    shapes = ((128,), (128,), (256, 128), (256,), (128, 256), (128,))  # norm w, b; fc1 w, b; fc2 w, b
    params = [randn(*shape, device=device, dtype=dtype) for shape in shapes]

    def op(x, *params, backend):
        return lmkern.ffn(x, *params, approximate="tanh", dropout_p=0.1, backend=backend)

    return op, (x, *params), ["out", "grad_x", "grad_nw", "grad_nb", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]


def attention(device, dtype):
    """Causal, with GQA."""
    q, k, v = randn(2, 4, 80, 64, device=device, dtype=dtype), *(randn(2, 2, 80, 64, device=device, dtype=dtype)
                                                                 for _ in range(2))

    def op(q, k, v, backend):
        return lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, backend=backend)

    return op, (q, k, v), ["out", "grad_q", "grad_k", "grad_v"]


def padded_attention(device, dtype):
    """BERT's case: a key-padding mask, read once per key block."""
    q, k, v = (randn(2, 4, 80, 64, device=device, dtype=dtype) for _ in range(3))
    keep = torch.ones(2, 1, 1, 80, dtype=torch.bool, device=device)
    keep[1, ..., 50:] = False

    def op(q, k, v, backend):
        return lmkern.scaled_dot_product_attention(q, k, v, keep, backend=backend)

    return op, (q, k, v), ["out", "grad_q", "grad_k", "grad_v"]


def window_attention(device, dtype):
    """Mistral's sliding window (causal, 16 keys) with GQA, over several key blocks."""
    q, k, v = randn(1, 4, 200, 64, device=device, dtype=dtype), *(randn(1, 2, 200, 64, device=device, dtype=dtype)
                                                                  for _ in range(2))

    def op(q, k, v, backend):
        return lmkern.scaled_dot_product_attention(
            q, k, v, is_causal=True, enable_gqa=True, window_size=(15, 0), backend=backend
        )

    return op, (q, k, v), ["out", "grad_q", "grad_k", "grad_v"]


def biased_attention(device, dtype):
    """T5's learned bias (1, H, Lq, Lk), shared by the batch, with its gradient (the mask
    gradient kernel, summing over the batch)."""
    q, k, v = (randn(2, 4, 80, 64, device=device, dtype=dtype) for _ in range(3))
    bias = randn(1, 4, 80, 80, device=device, dtype=dtype)

    def op(q, k, v, bias, backend):
        return lmkern.scaled_dot_product_attention(q, k, v, bias, backend=backend)

    return op, (q, k, v, bias), ["out", "grad_q", "grad_k", "grad_v", "grad_bias"]


def apply_rotary(device, dtype):
    """Partial rotary of queries sliced from a packed qkv, at per-sequence offsets."""
    qkv = randn(2, 40, 3, 4, 64, device=device, dtype=dtype, grad=False)
    q = qkv[:, :, 0].transpose(1, 2).requires_grad_()  # (B, H, L, D), strided
    cos, sin = lmkern.rotary_cache(32, 128, device=device)
    offsets = torch.tensor([0, 70], device=device)

    def op(q, cos, sin, backend):
        return lmkern.apply_rotary(q, cos, sin, position_ids=offsets, backend=backend)

    return op, (q, cos, sin), ["out", "grad_q", None, None]


def swiglu(device, dtype):
    """Llama's gated feed-forward, F not a multiple of any tile."""
    x = randn(2, 24, 256, device=device, dtype=dtype)
    w_gate, w_up = (randn(700, 256, device=device, dtype=dtype, grad=False).div(16).requires_grad_() for _ in range(2))
    w_down = randn(256, 700, device=device, dtype=dtype, grad=False).div(26).requires_grad_()

    def op(x, w_gate, w_up, w_down, backend):
        return lmkern.swiglu(x, w_gate, w_up, w_down, backend=backend)

    return op, (x, w_gate, w_up, w_down), ["out", "grad_x", "grad_w_gate", "grad_w_up", "grad_w_down"]


OPS = {
    fn.__name__: fn
    for fn in (cross_entropy, linear_cross_entropy, add_layer_norm, wide_layer_norm, add_rms_norm, wide_rms_norm, ffn,
               swiglu, attention, padded_attention, window_attention, biased_attention, apply_rotary)
}
KERNEL_OP = {"linear_cross_entropy": "cross_entropy", "add_layer_norm": "layer_norm", "wide_layer_norm": "layer_norm",
             "wide_rms_norm": "rms_norm",
             "ffn": "linear_gelu", "padded_attention": "attention", "window_attention": "attention",
             "biased_attention": "attention"}


# The one backend, a parameter so that test ids (and the GPU check's summary) name it.
BACKEND = pytest.mark.parametrize("backend", ["triton"])


@pytest.mark.parametrize("name", OPS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@BACKEND
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_reference(device, backend, dtype, name):
    require(backend, device, dtype, KERNEL_OP.get(name, name))
    op, inputs, names = OPS[name](device, dtype)
    assert_matches_reference(op, inputs, backend, names, factor=3.0 if "attention" in name else 2.0)


@pytest.mark.parametrize("variant", ["plain", "rotary", "window"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@BACKEND
@pytest.mark.parametrize("device", DEVICES)
def test_triton_decoding_matches_reference(device, backend, dtype, variant):
    """One decoding step over caches long enough to be split (the keys, or a window's),
    against the reference; rotary: partial GPT-J rotary embeddings fused into the step."""
    require(backend, device, dtype, "attention_with_kv_cache")
    q, k_new, v_new = (torch.randn(1, 8, 1, 64).to(device, dtype) for _ in range(3))
    k_new, v_new = k_new[:, :2], v_new[:, :2]
    caches = [torch.randn(1, 2, 1024, 64).to(device, dtype) for _ in range(2)]
    lengths = torch.tensor([700], device=device)
    cos, sin = lmkern.rotary_cache(32, 1024, device=device)
    variant_args = {"plain": {}, "rotary": {"rotary_cos": cos, "rotary_sin": sin, "rotary_interleaved": True},
                    "window": {"window_size": (299, 0)}}[variant]
    outs, k_caches = [], []
    for name in (backend, "torch"):
        k_cache, v_cache = (cache.clone() for cache in caches)
        outs.append(lmkern.attention_with_kv_cache(q, k_cache, v_cache, lengths, k_new, v_new, backend=name,
                                                   **variant_args))
        k_caches.append(k_cache)
    wide = truth_dtype(dtype)
    truth_k = caches[0].to(wide)
    truth = lmkern.attention_with_kv_cache(
        q.to(wide), truth_k, caches[1].to(wide), lengths, k_new.to(wide), v_new.to(wide), backend="torch",
        **variant_args,
    )
    assert_close_to_truth(outs[0], truth, outs[1], factor=3.0, name="out")
    assert_close_to_truth(k_caches[0], truth_k, k_caches[1], name="k_cache")
