"""Flash attention and KV-cache decoding: every backend against the reference under the
tolerance rule (3x for gradients), the reference against torch, dropout, decoding token
by token against full recomputation, the torch.library registration, and bad input.

Shapes are small where the Triton interpreter runs them (on CPU); the native and torch
backends see the same cases.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import bad_call_test
from numerics import assert_close_to_truth, truth_dtype
from torch.nn.attention import bias as attention_bias

import lmkern
from lmkern.backend import Call
from lmkern.ops.attention import reference
from lmkern.ops.attention.backends import ATTENTION, native_cuda_limit, triton_limit
from lmkern.philox import draw_seed, dropout_keep

# id -> shape (B, H, H_kv, Lq, Lk, D[, Dv]) and keyword arguments; "mask" names a mask
# that make_case builds.
CASES = {
    "basic": ((2, 3, 3, 17, 17, 16), {}),
    "one_query_one_key": ((2, 2, 2, 1, 1, 16), {}),
    "one_query_many_keys": ((1, 2, 2, 1, 255, 32), {}),
    "cross_attention": ((2, 2, 2, 17, 113, 32), {}),
    "causal_113": ((1, 2, 2, 113, 113, 32), dict(is_causal=True)),
    "causal_255": ((1, 1, 1, 255, 255, 16), dict(is_causal=True)),
    "causal_1023": ((1, 1, 1, 1023, 1023, 16), dict(is_causal=True)),
    "causal_more_queries": ((1, 2, 2, 113, 17, 32), dict(is_causal=True)),
    "causal_fewer_queries": ((1, 2, 2, 17, 113, 32), dict(is_causal=True)),
    "key_padding": ((3, 2, 2, 33, 40, 32), dict(mask="key_padding")),
    "key_padding_causal_lengths": ((3, 2, 2, 1, 40, 32), dict(mask="key_padding")),
    "bool_mask": ((2, 2, 2, 33, 47, 16), dict(mask="bool")),
    "additive_mask": ((2, 2, 2, 33, 47, 16), dict(mask="additive")),
    "additive_key_mask": ((2, 2, 2, 33, 47, 16), dict(mask="additive_key")),
    "gqa": ((2, 4, 2, 33, 33, 16), dict(enable_gqa=True)),
    "mqa_causal": ((1, 4, 1, 65, 65, 16), dict(enable_gqa=True, is_causal=True)),
    "mqa_broadcast_heads": ((2, 4, 1, 17, 29, 16), {}),
    "value_dim_differs": ((2, 2, 2, 17, 29, 32, 16), {}),
    "scale": ((2, 2, 2, 17, 29, 16), dict(scale=0.3)),
    "dropout": ((2, 2, 2, 33, 47, 16), dict(dropout_p=0.2)),
    "dropout_causal_gqa": ((1, 4, 2, 40, 40, 16), dict(dropout_p=0.3, is_causal=True, enable_gqa=True)),
    "dropout_key_padding": ((3, 2, 2, 17, 33, 16), dict(dropout_p=0.2, mask="key_padding")),
    # torch.nn.attention.bias objects: causal attention aligned top-left or bottom-right
    "causal_upper_left_bias": ((1, 2, 2, 33, 47, 16), dict(mask="causal_upper_left")),
    "causal_lower_right_fewer_queries": ((2, 2, 2, 17, 113, 32), dict(mask="causal_lower_right")),
    "causal_lower_right_more_queries": ((1, 2, 2, 113, 17, 32), dict(mask="causal_lower_right")),
    "causal_lower_right_gqa_dropout": ((1, 4, 2, 40, 72, 16), dict(mask="causal_lower_right", enable_gqa=True,
                                                                  dropout_p=0.2)),
}
CAUSAL_BIASES = ("causal_upper_left", "causal_lower_right")
HEAD_DIMS = (16, 32, 64, 80, 96, 128, 256)


def make_mask(kind, batch, heads, seqlen_q, seqlen_k, dtype, generator):
    """Masks with rows (or whole sequences) that see no key, to check zeros there; or a
    torch.nn.attention.bias.CausalBias, which describes a causal mask instead of holding it."""
    if kind in CAUSAL_BIASES:
        return getattr(attention_bias, kind)(seqlen_q, seqlen_k)
    if kind == "key_padding":  # (B, 1, 1, Lk): random padding, the last sequence all padding
        keep = torch.rand(batch, 1, 1, seqlen_k, generator=generator) > 0.3
        keep[-1] = False
        return keep
    if kind == "bool":  # (B, H, Lq, Lk), query row 3 of every head sees nothing
        keep = torch.rand(batch, heads, seqlen_q, seqlen_k, generator=generator) > 0.5
        keep[:, :, 3] = False
        return keep
    shape = (1, heads, seqlen_q, seqlen_k) if kind == "additive" else (batch, 1, 1, seqlen_k)
    bias = torch.randn(shape, generator=generator).to(dtype)
    return bias.masked_fill(torch.rand(shape, generator=generator) < 0.2, float("-inf"))


def make_case(case, dtype=torch.float32, device="cpu", head_dim=None):
    """(query, key, value, keyword arguments) for a case, on device."""
    shape, kwargs = CASES[case]
    batch, heads, kv_heads, seqlen_q, seqlen_k, dim, *dim_v = shape
    dim = head_dim or dim
    dim_v = dim_v[0] if dim_v else dim
    generator = torch.Generator().manual_seed(1)
    q = torch.randn(batch, heads, seqlen_q, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, dim_v, generator=generator)
    kwargs = dict(kwargs)
    if "mask" in kwargs:
        kind = kwargs.pop("mask")
        mask = make_mask(kind, batch, heads, seqlen_q, seqlen_k, dtype, generator)
        kwargs["attn_mask"] = mask if kind in CAUSAL_BIASES else mask.to(device)
    return q.to(device, dtype), k.to(device, dtype), v.to(device, dtype), kwargs


def is_causal_bias(mask):
    return isinstance(mask, attention_bias.CausalBias)


def attention_call(q, v, mask=None, dropout_p=0.0, windowed=False, backward=True):
    """The Call the backends see for attention of q (B, H, Lq, D) over values v with this
    mask (or causal bias), dropout and window, with or without backward."""
    if is_causal_bias(mask):
        mask = None
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], mask.shape[-1])
    return Call.of(q, head_dims=(q.shape[3], v.shape[3]), mask=mask, mask_grad=False, dropout_p=dropout_p,
                   relative_bias=False, windowed=windowed, backward=backward)


def require_call(backend, q, v, mask=None, dropout_p=0.0, windowed=False):
    """Skip, saying why, where `backend` has a limit on this call (e.g. head dims the native
    CUDA kernels do not take); test_native_cuda_limits and test_triton_limits cover the limits."""
    reason = ATTENTION.unavailable(backend, attention_call(q, v, mask, dropout_p, windowed))
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def attention_and_grads(q, k, v, kwargs, backend, dtype=None):
    """The output and (dq, dk, dv) for a fixed random upstream gradient, in `dtype`.
    Dropout draws its seed from torch's generator, reset here so that every call masks alike."""
    dtype = dtype or q.dtype
    windowed = kwargs.get("window_size", (-1, -1))[0] >= 0
    require_call(backend, q.to(dtype), v, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0), windowed)
    inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    mask = kwargs.get("attn_mask")
    if mask is not None and not is_causal_bias(mask) and mask.is_floating_point():
        kwargs = dict(kwargs, attn_mask=mask.to(dtype))
    torch.manual_seed(123)
    out = lmkern.scaled_dot_product_attention(*inputs, **kwargs, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, out.dtype)
    out.backward(upstream)
    return out.detach(), [x.grad for x in inputs]


def assert_matches_reference(q, k, v, kwargs, backend, reference_kwargs=None):
    """The backend's call with kwargs against the reference's with reference_kwargs (by
    default the same), under the tolerance rule."""
    dtype = q.dtype
    reference_kwargs = kwargs if reference_kwargs is None else reference_kwargs
    out, grads = attention_and_grads(q, k, v, kwargs, backend)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    truth_out, truth_grads = attention_and_grads(q, k, v, reference_kwargs, "torch", truth_dtype(dtype))
    base_out, base_grads = attention_and_grads(q, k, v, reference_kwargs, "torch")
    assert_close_to_truth(out, truth_out, base_out, name="out")
    for name, grad, truth, base in zip(("dq", "dk", "dv"), grads, truth_grads, base_grads):
        assert_close_to_truth(grad, truth, base, factor=3.0, name=name)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, backend, dtype, case):
    require(backend, device, dtype, "attention")
    assert_matches_reference(*make_case(case, dtype, device), backend)


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_head_dims(device, backend, dtype, head_dim):
    require(backend, device, dtype, "attention")
    assert_matches_reference(*make_case("causal_more_queries", dtype, device, head_dim), backend)


CAUSAL = torch.ones(113, 113, dtype=torch.bool).tril()


@pytest.mark.parametrize("case", [c for c, (_, kwargs) in CASES.items() if "dropout_p" not in kwargs])
def test_reference_matches_torch(case):
    q, k, v, kwargs = make_case(case, torch.float64)
    out, grads = attention_and_grads(q, k, v, kwargs, "torch")
    inputs = [x.clone().requires_grad_() for x in (q, k, v)]
    expected = F.scaled_dot_product_attention(*inputs, **kwargs)
    expected.backward(torch.randn(expected.shape, generator=torch.Generator().manual_seed(2)).double())
    # Where a row sees no key torch's CPU kernel gives zeros like lmkern; its math backend NaN.
    torch.testing.assert_close(out, expected.detach())
    for grad, x in zip(grads, inputs):
        torch.testing.assert_close(grad, x.grad)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_that_see_no_key_give_zeros_and_zero_gradients(backend):
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, kwargs = make_case("bool_mask")
    out, (dq, dk, dv) = attention_and_grads(q, k, v, kwargs, backend)
    assert out.isfinite().all() and all(g.isfinite().all() for g in (dq, dk, dv))
    assert (out[:, :, 3] == 0).all() and (dq[:, :, 3] == 0).all()
    # Keys that no query sees get no gradient either.
    q, k, v, kwargs = make_case("key_padding")
    out, (dq, dk, dv) = attention_and_grads(q, k, v, kwargs, backend)
    padded = ~kwargs["attn_mask"][:, 0, 0]  # (B, Lk)
    assert (out[-1] == 0).all() and (dq[-1] == 0).all()
    assert (dk.transpose(1, 2)[padded] == 0).all() and (dv.transpose(1, 2)[padded] == 0).all()


@pytest.mark.parametrize("backend", BACKENDS)
def test_layouts_with_strides(backend):
    """(B, L, H, D) tensors viewed as (B, H, L, D), a broadcast batch, and a strided grad."""
    require(backend, "cpu", torch.float32, "attention")
    generator = torch.Generator().manual_seed(3)
    q = torch.randn(2, 33, 4, 16, generator=generator).transpose(1, 2)
    k = torch.randn(1, 40, 2, 16, generator=generator).transpose(1, 2)  # batch broadcast
    v = torch.randn(2, 2, 16, 40, generator=generator).transpose(2, 3)  # (B, H_kv, Lk, Dv), Dv strided
    kwargs = dict(enable_gqa=True, is_causal=True)
    assert_matches_reference(q, k, v, kwargs, backend)
    assert_matches_reference(q.contiguous(), k.contiguous(), v.contiguous(), kwargs, backend)


def dropout_probe(backend, dropout_p, device="cpu"):
    """Attention whose output shows its dropout mask: q = 0 makes every probability 1/Lk,
    and v = I reads them out, so out[b, h, i, j] = Z_ij / Lk."""
    seqlen = 64
    q = torch.zeros(2, 2, seqlen, seqlen, device=device)
    v = torch.eye(seqlen, device=device).expand(2, 2, seqlen, seqlen)
    return lmkern.scaled_dot_product_attention(q, q, v, dropout_p=dropout_p, backend=backend) * seqlen


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_dropout_keeps_about_one_minus_p_and_scales_them(device, backend):
    require(backend, device, torch.float32, "attention")
    require_call(backend, torch.empty(1, 1, 1, 64, device=device), torch.empty(1, 1, 1, 64), dropout_p=0.3)
    torch.manual_seed(0)
    factors = dropout_probe(backend, 0.3, device)
    kept = factors != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.02  # 16384 draws: 5 standard deviations
    torch.testing.assert_close(factors[kept], torch.full_like(factors[kept], 1 / 0.7))
    torch.manual_seed(0)
    assert torch.equal(dropout_probe(backend, 0.3, device), factors), "the same seed must give the same mask"
    assert not torch.equal(dropout_probe(backend, 0.3, device), factors), "the next seed must give another"
    assert (dropout_probe(backend, 1.0, device) == 0).all()


def test_dropout_masks_are_the_same_on_every_backend():
    masks = []
    for name in BACKENDS:
        require(name, "cpu", torch.float32, "attention")
        torch.manual_seed(7)
        masks.append(dropout_probe(name, 0.5) != 0)
    assert all(torch.equal(mask, masks[0]) for mask in masks)
    offsets = torch.arange(masks[0].numel()).view(masks[0].shape)
    torch.manual_seed(7)
    assert torch.equal(masks[0], dropout_keep(draw_seed(), offsets, 0.5))


def test_auto_picks_native_on_cpu_and_the_reference_for_float64():
    require("native", "cpu", torch.float32, "attention")
    q, k, v, _ = make_case("basic")
    assert ATTENTION.resolve(attention_call(q, v)) == "native"
    assert ATTENTION.resolve(attention_call(q.double(), v.double())) == "torch"
    q, k, v = (x.double() for x in (q, k, v))
    torch.testing.assert_close(lmkern.scaled_dot_product_attention(q, k, v), F.scaled_dot_product_attention(q, k, v))
    with pytest.raises(lmkern.BackendUnavailableError, match="float32, float16 or bfloat16"):
        lmkern.scaled_dot_product_attention(q, k, v, backend="native")
    assert lmkern.functional.scaled_dot_product_attention is lmkern.scaled_dot_product_attention


def test_native_cuda_limits():
    """What "auto" keeps away from the native CUDA kernels, and what they take."""
    half, key_padding = torch.float16, torch.ones(2, 1, 1, 8, dtype=torch.bool).expand(2, 4, 8, 8)
    assert native_cuda_limit(half, (64, 64)) is None
    assert native_cuda_limit(torch.bfloat16, (128, 128), key_padding) is None
    assert "float16 or bfloat16" in native_cuda_limit(torch.float32, (64, 64))
    assert "head dims" in native_cuda_limit(half, (96, 96))
    assert "head dims" in native_cuda_limit(half, (64, 128))
    assert "key-padding" in native_cuda_limit(half, (64, 64), torch.ones(2, 4, 8, 8, dtype=torch.bool))
    assert "key-padding" in native_cuda_limit(half, (64, 64), torch.zeros(2, 1, 1, 8).expand(2, 4, 8, 8))
    assert "dropout" in native_cuda_limit(half, (64, 64), dropout_p=0.1)
    assert ATTENTION.unavailable("native", attention_call(torch.empty(2, 4, 8, 96), torch.empty(1, 1, 1, 96))) is None


def test_triton_limits():
    """Head dims up to 256; on CUDA, float32 backward over head dim 128 only without a mask
    read per element, dropout or a window (scripts/triton_check.py checks these against the
    configs that fit)."""
    q, v = torch.empty(2, 4, 8, 256), torch.empty(1, 1, 1, 256)
    full, key_padding = torch.zeros(1, 1, 8, 8), torch.ones(2, 1, 1, 8, dtype=torch.bool)
    assert triton_limit(attention_call(torch.empty(2, 4, 8, 264), torch.empty(1, 1, 1, 264))) is not None
    for call in (attention_call(q, v, full), attention_call(q, v, dropout_p=0.1), attention_call(q, v, windowed=True)):
        assert triton_limit(call) is None  # on CPU (the interpreter) any
        call.device_type = "cuda"
        assert "float32 backward at head dims over 128" in triton_limit(call)
        call.backward = False
        assert triton_limit(call) is None  # the forward fits
    for fits in (attention_call(q, v, key_padding), attention_call(q.half(), v.half(), full, 0.1, True),
                 attention_call(q[..., :128], v[..., :128], full, 0.1, True)):
        fits.device_type = "cuda"
        assert triton_limit(fits) is None


def test_triton_refuses_head_dims_over_256_and_auto_goes_on():
    require("triton", "cpu", torch.float32, "attention")
    q = torch.randn(1, 1, 4, 264)
    with pytest.raises(lmkern.BackendUnavailableError, match="head dims up to 256"):
        lmkern.scaled_dot_product_attention(q, q, q, backend="triton")
    with lmkern.use_backend("auto"):
        expected = F.scaled_dot_product_attention(q, q, q)
        torch.testing.assert_close(lmkern.scaled_dot_product_attention(q, q, q), expected)


def _bad_calls():
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 4, 10, 16)
    sdpa = lmkern.scaled_dot_product_attention
    return [
        (lambda: sdpa(q[0, 0, 0], k, k), RuntimeError, r"query must be at least 2-D \(\.\.\., H, Lq, D\)"),
        (lambda: sdpa(q.long(), k, k), TypeError, "query must be a floating-point tensor"),
        (lambda: sdpa(q, k.half(), k), ValueError, "key must have query's dtype and device"),
        (lambda: sdpa(q, k[..., :8], k), ValueError, "key must have query's head dim 16"),
        (lambda: sdpa(q, k, k[:, :, :9]), ValueError, "value must have key's length 10"),
        (lambda: sdpa(q, k[:1].expand(3, -1, -1, -1), k), RuntimeError,
         r"batch dimensions \(before the last three\) that broadcast, got \(2, 4, 8, 16\), \(3, 4, 10, 16\)"),
        (lambda: sdpa(q, k[:, :2], k[:, :2]), ValueError, "same number of heads, or 1.*enable_gqa=True"),
        (lambda: sdpa(q, k[:, :3], k[:, :3], enable_gqa=True), ValueError,
         r"multiple of the number of key heads \(3\)"),
        (lambda: sdpa(q, k, k, dropout_p=1.5), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: sdpa(q, k, k, attn_mask=torch.ones(8, 10, dtype=torch.bool), is_causal=True), ValueError,
         "attn_mask and is_causal=True cannot both be set"),
        (lambda: sdpa(q, k, k, attn_mask=torch.ones(8, 10, dtype=torch.int64)), TypeError, "attn_mask must be bool"),
        (lambda: sdpa(q, k, k, attn_mask=torch.ones(8, 9, dtype=torch.bool)), ValueError,
         r"attn_mask must broadcast to \(B, H, Lq, Lk\) = \(2, 4, 8, 10\)"),
        (lambda: sdpa(q, k, k, attn_mask=torch.ones(1, 1, 1, 8, 10, dtype=torch.bool)), ValueError,
         "attn_mask must broadcast"),
        (lambda: sdpa(q, k, k, backend="flash"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "attention")
    q, k = torch.randn(2, 4, 8, 16), torch.randn(2, 3, 10, 16)
    fwd = torch.ops.lmkern.attention_fwd
    with pytest.raises(RuntimeError, match=r"query heads \(4\) must be a multiple of the key/value heads \(3\)"):
        fwd(q, k, k, None, False, 0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="must be contiguous in its last dimension"):
        fwd(q, q.transpose(2, 3), q, None, False, 0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match=r"mask must have shape \(B, H, Lq, Lk\)"):
        fwd(q, q, q, torch.ones(8, 8, dtype=torch.bool), False, 0, 0.25, 0.0, 0)


# ------------------------------------------------------------------------------------------
# The native ops themselves (torch.ops.lmkern.attention_fwd / _bwd): out, lse and every
# gradient against the reference's, in half precision on each device (the CUDA kernels take
# fp16 and bf16 at head dims 64 and 128, key-padding masks, no dropout), and the cases the
# kernels handle on their own. (In fp32 a flash backward's P = exp(s - lse) carries lse's
# rounding, some |lse| ulps, beside the reference's directly normalised softmax: the
# public API's tests above hold fp32 to the tolerance rule at the shapes models use.)
NATIVE_DTYPES = {"cpu": (torch.float16,), "cuda": (torch.float16, torch.bfloat16)}
# id -> (B, H, H_kv, Lq, Lk): odd lengths, Lq != Lk both ways, GQA and MQA.
NATIVE_SHAPES = {
    "one_query_one_key": (2, 2, 2, 1, 1),
    "odd_17": (2, 3, 3, 17, 17),
    "cross_113_255": (2, 2, 2, 113, 255),
    "cross_255_113": (2, 2, 2, 255, 113),
    "long_1023": (1, 2, 2, 1023, 1023),
    "one_query_1023_keys": (3, 2, 2, 1, 1023),
    "gqa": (2, 8, 2, 129, 200),
    "mqa": (3, 6, 1, 65, 64),
}


def native_inputs(shape, dtype, head_dim, device, seed=0):
    """(q, k, v, dout, generator) of a (B, H, H_kv, Lq, Lk) shape."""
    batch, heads, kv_heads, seqlen_q, seqlen_k = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    return (*(x.to(device, dtype) for x in (q, k, v, dout)), generator)


def key_padding(batch, seqlen_k, generator, device):
    """(B, 1, 1, Lk) bool, True = attend: random padding; sequence 0's first 3 keys padded
    (so that under a causal mask its first queries see no key), sequence 1 all padding."""
    keep = torch.rand(batch, seqlen_k, generator=generator) > 0.3
    keep[0, :3] = False
    if batch > 1:
        keep[1] = False
    return keep[:, None, None, :].to(device)


def op_results(impl, q, k, v, mask, causal_shift, scale, dout):
    """(out, lse, dq, dk, dv) from an implementation's attention_fwd and attention_bwd;
    causal_shift None: not causal."""
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    args = (mask, causal_shift is not None, causal_shift or 0, scale, 0.0, 0)
    out, lse = impl.attention_fwd(q, k, v, *args)
    return (out, lse, *impl.attention_bwd(dout, q, k, v, out, lse, *args))


def assert_native_op_matches_reference(q, k, v, mask, causal_shift, scale, dout, results=None):
    """The native op's (out, lse, dq, dk, dv), or `results`, against the reference's in the
    wider dtype (truth) and in q's (baseline), from the same inputs."""
    results = results or op_results(torch.ops.lmkern, q, k, v, mask, causal_shift, scale, dout)
    wide = truth_dtype(q.dtype)
    truth = op_results(reference, *(x.to(wide) for x in (q, k, v)), mask, causal_shift, scale, dout.to(wide))
    baseline = op_results(reference, q, k, v, mask, causal_shift, scale, dout)
    for name, actual, truth_value, baseline_value in zip(("out", "lse", "dq", "dk", "dv"), results, truth, baseline):
        assert actual.dtype == (torch.float32 if name == "lse" else q.dtype), f"{name}: dtype {actual.dtype}"
        assert_close_to_truth(actual, truth_value, baseline_value.to(actual.dtype),
                              factor=3.0 if name.startswith("d") else 2.0, name=name)


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("shape", NATIVE_SHAPES.values(), ids=NATIVE_SHAPES.keys())
@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_match_the_reference(device, shape, head_dim, causal, masked):
    for dtype in NATIVE_DTYPES[device]:
        require("native", device, dtype, "attention")
        q, k, v, dout, generator = native_inputs(shape, dtype, head_dim, device)
        mask = key_padding(shape[0], shape[4], generator, device) if masked else None
        causal_shift = {None: None, "top_left": 0, "bottom_right": shape[4] - shape[3]}[causal]
        assert_native_op_matches_reference(q, k, v, mask, causal_shift, 1.0 / math.sqrt(head_dim), dout)


@pytest.mark.parametrize("device", DEVICES)
def test_native_rows_that_see_no_key_give_zeros_and_infinite_lse(device):
    for dtype in NATIVE_DTYPES[device]:
        require("native", device, dtype, "attention")
        q, k, v, dout, generator = native_inputs((3, 2, 1, 40, 70), dtype, 64, device)
        mask = key_padding(3, 70, generator, device)
        mask[2, ..., 0] = True  # every causal row of sequence 2 sees a key
        out, lse, dq, dk, dv = op_results(torch.ops.lmkern, q, k, v, mask, 0, 0.125, dout)
        assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()  # sequence 1: all keys padded
        assert not out[1].any() and not dq[1].any() and not dk[1].any() and not dv[1].any()
        assert torch.isinf(lse[0, :, :3]).all() and not out[0, :, :3].any()  # causal rows before any key
        assert torch.isfinite(lse[2]).all()
        assert all(torch.isfinite(x).all() for x in (out, dq, dk, dv))


@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("device", DEVICES)
def test_native_causal_reads_no_key_above_the_diagonal(device, head_dim):
    """64 queries see keys 0..63 only: NaN in the later key blocks must never be read."""
    for dtype in NATIVE_DTYPES[device]:
        require("native", device, dtype, "attention")
        q, k, v, dout, _ = native_inputs((1, 2, 2, 64, 256), dtype, head_dim, device)
        k[:, :, 64:] = float("nan")
        v[:, :, 64:] = float("nan")
        out, lse, dq, dk, dv = op_results(torch.ops.lmkern, q, k, v, None, 0, 0.1, dout)
        results = (out, lse, dq, dk[:, :, :64], dv[:, :, :64])
        assert_native_op_matches_reference(q, k[:, :, :64], v[:, :, :64], None, 0, 0.1, dout, results)
        assert not dk[:, :, 64:].any() and not dv[:, :, 64:].any()


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_read_strided_views(device):
    """q, k, v sliced from a packed (B, L, 3, H, D) projection (strided rows, read in place),
    an upstream gradient transposed from (B, L, H, D), and views whose rows are not 16-byte
    aligned (the CUDA binding copies them)."""
    for dtype in NATIVE_DTYPES[device]:
        require("native", device, dtype, "attention")
        batch, seqlen, heads, head_dim = 2, 97, 4, 64
        generator = torch.Generator().manual_seed(0)
        qkv = torch.randn(batch, seqlen, 3, heads, head_dim, generator=generator).to(device, dtype)
        q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), rows 3 H D apart
        dout = torch.randn(batch, seqlen, heads, head_dim, generator=generator).to(device, dtype).transpose(1, 2)
        padded = torch.randn(batch, heads, seqlen, head_dim + 4, generator=generator).to(device, dtype)
        for value in (v, padded[..., 2 : head_dim + 2]):  # the second: rows D + 4 apart, starting 4 bytes in
            assert_native_op_matches_reference(q, k, value, None, 0, 0.125, dout)


@pytest.mark.parametrize("device", DEVICES)
def test_native_backward_is_deterministic(device):
    for dtype in NATIVE_DTYPES[device]:
        require("native", device, dtype, "attention")
        q, k, v, dout, _ = native_inputs((2, 8, 2, 300, 300), dtype, 128, device)
        first = op_results(torch.ops.lmkern, q, k, v, None, 0, 0.1, dout)
        second = op_results(torch.ops.lmkern, q, k, v, None, 0, 0.1, dout)
        assert all(torch.equal(a, b) for a, b in zip(first, second))


def _native_cuda_refusals():
    """(attention_fwd's arguments, message) for what the native CUDA kernels do not run."""

    def qkv(head_dim=64, dtype=torch.float16, head_dim_v=None):
        q, k = (torch.randn(2, 2, 8, head_dim, device="cuda", dtype=dtype) for _ in range(2))
        return q, k, torch.randn(2, 2, 8, head_dim_v or head_dim, device="cuda", dtype=dtype)

    return [
        ((*qkv(), None, False, 0, 0.1, 0.1, 0), "dropout is not supported by native CUDA attention"),
        ((*qkv(head_dim=96), None, False, 0, 0.1, 0.0, 0), "head dims 64 and 128"),
        ((*qkv(dtype=torch.float32), None, False, 0, 0.1, 0.0, 0), "float16 or bfloat16"),
        ((*qkv(head_dim_v=128), None, False, 0, 0.1, 0.0, 0), "v's head dim equal to q's"),
        ((*qkv(), torch.rand(2, 2, 8, 8, device="cuda") > 0.5, False, 0, 0.1, 0.0, 0), "only boolean key-padding"),
        ((*qkv(), torch.zeros(2, 1, 1, 8, device="cuda").expand(2, 2, 8, 8), False, 0, 0.1, 0.0, 0),
         "only boolean key-padding"),
    ]


@pytest.mark.gpu
@pytest.mark.parametrize("index", range(6), ids=["dropout", "head_dim_96", "float32", "value_head_dim",
                                                  "general_bool_mask", "additive_mask"])
def test_native_cuda_op_refuses_what_it_does_not_run(index):
    require("native", "cuda", torch.float16, "attention")
    args, message = _native_cuda_refusals()[index]
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lmkern.attention_fwd(*args)


@pytest.mark.gpu
def test_auto_sends_what_native_cuda_cannot_run_to_triton():
    require("native", "cuda", torch.float16, "attention")
    q = torch.randn(2, 2, 8, 96, device="cuda", dtype=torch.float16)
    with pytest.raises(lmkern.BackendUnavailableError, match="head dims"):
        lmkern.scaled_dot_product_attention(q, q, q, backend="native")
    assert ATTENTION.resolve(attention_call(q, q)) == "triton"


# ------------------------------------------------------------------------------------------
# The torch.library registration of the native ops, in a dtype and head dim (64) that the
# native kernels of each device take.
NATIVE_TEST_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


@pytest.mark.parametrize(
    "case", ["basic", "causal_fewer_queries", "causal_lower_right_fewer_queries", "key_padding", "additive_mask", "gqa",
             "dropout"]
)
@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device, case):
    dtype = NATIVE_TEST_DTYPE[device]
    require("native", device, dtype, "attention")
    q, k, v, kwargs = make_case(case, dtype, device, head_dim=64)
    mask, is_causal, causal_shift = kwargs.get("attn_mask"), kwargs.get("is_causal", False), 0
    if is_causal_bias(mask):  # the op's arguments for a lower-right causal mask
        mask, is_causal, causal_shift = None, True, k.shape[2] - q.shape[2]
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    require_call("native", q, v, mask, kwargs.get("dropout_p", 0.0))
    args = (mask, is_causal, causal_shift, 0.25, kwargs.get("dropout_p", 0.0), 1234)
    out, lse = torch.ops.lmkern.attention_fwd(q, k, v, *args)
    torch.library.opcheck(torch.ops.lmkern.attention_fwd.default, (q, k, v, *args))
    torch.library.opcheck(torch.ops.lmkern.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *args))


@pytest.mark.parametrize("case", ["causal_more_queries", "key_padding", "gqa"])
def test_compiles_with_fullgraph_on_cpu(case):
    require("native", "cpu", torch.float32, "attention")
    q, k, v, kwargs = make_case(case)
    weight = torch.randn(q.shape[-1], q.shape[-1]) / 4

    def step(x):
        return lmkern.scaled_dot_product_attention(x @ weight, k, v, backend="native", **kwargs).square().sum()

    assert_compiles_like_eager(step, q)


def test_dropout_compiles_with_fullgraph_on_cpu():
    """The seed is drawn inside the compiled graph: every call draws a new mask."""
    require("native", "cpu", torch.float32, "attention")
    probe = torch.compile(dropout_probe, fullgraph=True)
    first, second = probe("native", 0.3), probe("native", 0.3)
    kept = first != 0
    assert abs(kept.double().mean().item() - 0.7) < 0.02
    torch.testing.assert_close(first[kept], torch.full_like(first[kept], 1 / 0.7))
    assert not torch.equal(first, second)
