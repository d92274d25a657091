"""Flash attention and KV-cache decoding: every backend against the reference under the
tolerance rule (3x for gradients), the reference against torch, dropout, decoding token
by token against full recomputation, the torch.library registration, and bad input.

Shapes are small where the Triton interpreter runs them (on CPU); the native and torch
backends see the same cases.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from numerics import assert_close_to_truth, truth_dtype
from torch.nn.attention import bias as attention_bias

import lmkern
from lmkern.ops.attention import backend_limits, native_cuda_limit, reference
from lmkern.random import draw_seed, dropout_keep

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


def require_call(backend, q, v, mask=None, dropout_p=0.0):
    """Skip, saying why, where `backend` has a per-call limit on this call (e.g. head dims
    the native CUDA kernels do not take); test_native_cuda_limits covers the limits."""
    if is_causal_bias(mask):
        mask = None
    if mask is not None:
        mask = mask.expand(q.shape[0], q.shape[1], q.shape[2], mask.shape[-1])
    reason = backend_limits(q, mask, (q.shape[3], v.shape[3]), dropout_p).get(backend)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def attention_and_grads(q, k, v, kwargs, backend, dtype=None):
    """The output and (dq, dk, dv) for a fixed random upstream gradient, in `dtype`.
    Dropout draws its seed from torch's generator, reset here so that every call masks alike."""
    dtype = dtype or q.dtype
    require_call(backend, q.to(dtype), v, kwargs.get("attn_mask"), kwargs.get("dropout_p", 0.0))
    inputs = [x.detach().to(dtype).requires_grad_() for x in (q, k, v)]
    mask = kwargs.get("attn_mask")
    if mask is not None and not is_causal_bias(mask) and mask.is_floating_point():
        kwargs = dict(kwargs, attn_mask=mask.to(dtype))
    torch.manual_seed(123)
    out = lmkern.scaled_dot_product_attention(*inputs, **kwargs, backend=backend)
    upstream = torch.randn(out.shape, generator=torch.Generator().manual_seed(2)).to(out.device, out.dtype)
    out.backward(upstream)
    return out.detach(), [x.grad for x in inputs]


def assert_matches_reference(q, k, v, kwargs, backend):
    dtype = q.dtype
    out, grads = attention_and_grads(q, k, v, kwargs, backend)
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    truth_out, truth_grads = attention_and_grads(q, k, v, kwargs, "torch", truth_dtype(dtype))
    base_out, base_grads = attention_and_grads(q, k, v, kwargs, "torch")
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


@pytest.mark.parametrize("backend", BACKENDS)
def test_additive_mask_gradient_runs_on_torch(backend):
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, kwargs = make_case("additive_mask", torch.float64)
    bias = kwargs["attn_mask"].clone().requires_grad_()
    if backend == "torch":
        out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend)
    else:
        with pytest.raises(lmkern.BackendUnavailableError, match="gradient of attn_mask"):
            lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias.float(), backend=backend)
        out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias)  # auto picks torch
    out.sum().backward()
    expected = bias.detach().clone().requires_grad_()
    F.scaled_dot_product_attention(q, k, v, attn_mask=expected).sum().backward()
    torch.testing.assert_close(bias.grad, expected.grad)


def test_auto_picks_a_kernel_and_float64_runs_on_torch():
    q, k, v, _ = make_case("basic", torch.float64)
    expected = F.scaled_dot_product_attention(q, k, v)
    torch.testing.assert_close(lmkern.scaled_dot_product_attention(q, k, v), expected)
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
    assert "native" not in backend_limits(torch.empty(2, 4, 8, 96), None, (96, 96))  # CPU runs every case


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


@pytest.mark.parametrize("index", range(len(_bad_calls())))
def test_bad_arguments_name_the_argument(index):
    call, error, message = _bad_calls()[index]
    with pytest.raises(error, match=message):
        call()


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
# Decoding with a KV cache.


def full_attention(q, k, v, length, scale=None):
    """The reference for one sequence: q (H, Lq, D) attending over keys (H_kv, length, D),
    the last query seeing the last key (bottom-right causal alignment)."""
    (heads, seqlen_q, dim), kv_heads = q.shape, k.shape[0]
    visible = reference.causal_mask(seqlen_q, length, q.device, shift=length - seqlen_q)
    mask = visible.expand(1, heads, seqlen_q, length)
    scale = dim**-0.5 if scale is None else scale
    out, _ = reference.attention_fwd(q[None], k[None, :, :length], v[None, :, :length], mask, False, 0, scale, 0.0, None)
    return out[0]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_decoding_token_by_token_matches_full_recomputation(device, backend, dtype):
    """A prompt of 7 tokens per sequence on top of cached contexts of different lengths,
    then 5 tokens one at a time; each step against attention over the whole sequence."""
    require(backend, device, dtype, "attention_with_kv_cache")
    batch, heads, kv_heads, capacity, dim = 3, 4, 2, 64, 32
    require_call(backend, torch.empty(batch, heads, 1, dim, dtype=dtype, device=device), torch.empty(1, 1, 1, dim))
    generator = torch.Generator().manual_seed(4)
    lengths = torch.tensor([0, 9, 40], dtype=torch.int32)  # already cached
    steps = [7, 1, 1, 1, 1, 1]
    total = int(lengths.max()) + sum(steps)
    keys = torch.randn(batch, kv_heads, total, dim, generator=generator)
    values = torch.randn(batch, kv_heads, total, dim, generator=generator)
    queries = torch.randn(batch, heads, total, dim, generator=generator)
    k_cache = torch.zeros(batch, kv_heads, capacity, dim, dtype=dtype, device=device)
    v_cache = torch.zeros_like(k_cache)
    for b in range(batch):
        k_cache[b, :, : lengths[b]] = keys[b, :, : lengths[b]].to(dtype)
        v_cache[b, :, : lengths[b]] = values[b, :, : lengths[b]].to(dtype)
    for step in steps:
        new = [torch.stack([x[b, :, lengths[b] : lengths[b] + step] for b in range(batch)]) for x in (keys, values)]
        q = torch.stack([queries[b, :, lengths[b] : lengths[b] + step] for b in range(batch)])
        with torch.no_grad():
            out = lmkern.attention_with_kv_cache(
                q.to(device, dtype), k_cache, v_cache, lengths.to(device), *(x.to(device, dtype) for x in new),
                backend=backend,
            )
        lengths += step
        for b in range(batch):
            length = int(lengths[b])
            torch.testing.assert_close(k_cache[b, :, :length].cpu(), keys[b, :, :length].to(dtype))
            torch.testing.assert_close(v_cache[b, :, :length].cpu(), values[b, :, :length].to(dtype))
            query = q[b].to(device, dtype)
            wide = truth_dtype(dtype)
            truth = full_attention(query.to(wide), k_cache[b].to(wide), v_cache[b].to(wide), length)
            baseline = full_attention(query, k_cache[b], v_cache[b], length)
            assert_close_to_truth(out[b], truth, baseline, name=f"step of {step}, sequence {b}")


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_decoding_long_cache_splits_the_keys(device, backend):
    """One sequence, one key/value head (MQA), a long cache: the triton backend splits the
    keys across programs (flash-decoding) and combines them."""
    require(backend, device, torch.float32, "attention_with_kv_cache")
    generator = torch.Generator().manual_seed(5)
    capacity, heads = 1000, 8
    q = torch.randn(1, heads, 1, 16, generator=generator).to(device)
    require_call(backend, q, q)
    k_cache = torch.randn(1, 1, capacity, 16, generator=generator).to(device)
    v_cache = torch.randn(1, 1, capacity, 16, generator=generator).to(device)
    if backend == "triton":
        from lmkern.ops.attention.triton_kernels import decode_splits

        assert decode_splits(1, capacity, q.device) > 1
    for length in (0, 1, 130, 999):  # cached keys besides the new one
        k_new, v_new = torch.randn(2, 1, 1, 1, 16, generator=generator).to(device)
        seqlens = torch.tensor([length], device=device)
        with torch.no_grad():
            out = lmkern.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend)
        expected = full_attention(q[0].double(), k_cache[0].double(), v_cache[0].double(), length + 1)
        baseline = full_attention(q[0], k_cache[0], v_cache[0], length + 1)
        assert_close_to_truth(out[0], expected, baseline, name=f"length {length}")


@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_without_new_keys_and_queries_before_the_cache(backend):
    """Without k_new the cache is read as it is; a query whose position is negative sees nothing."""
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    generator = torch.Generator().manual_seed(6)
    q = torch.randn(2, 2, 3, 16, generator=generator)
    k_cache, v_cache = torch.randn(2, 2, 2, 20, 16, generator=generator)
    seqlens = torch.tensor([1, 20])
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(q, k_cache, v_cache, seqlens, scale=0.5, backend=backend)
    assert (out[0, :, :2] == 0).all()  # positions -2 and -1
    torch.testing.assert_close(out[0, :, 2:], full_attention(q[0, :, 2:], k_cache[0], v_cache[0], 1, scale=0.5))
    torch.testing.assert_close(out[1], full_attention(q[1], k_cache[1], v_cache[1], 20, scale=0.5))


OVERFLOWS = [([3, 8], r"cache_seqlens\[1\] = 8"), ([-1, 0], r"cache_seqlens\[0\] = -1")]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("lengths, message", OVERFLOWS)
def test_decoding_past_the_cache_raises_on_cpu_and_writes_nothing(backend, lengths, message):
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    q, k_new = torch.randn(2, 2, 2, 1, 16)
    k_cache = torch.zeros(2, 2, 8, 16)
    with torch.no_grad(), pytest.raises(ValueError, match=message + ": with 1 new keys the sequence must fit"):
        seqlens = torch.tensor(lengths)
        lmkern.attention_with_kv_cache(q, k_cache, k_cache.clone(), seqlens, k_new, k_new, backend=backend)
    assert (k_cache == 0).all()


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_decoding_past_the_cache_gives_nan_on_gpu(backend):
    require(backend, "cuda", torch.float32, "attention_with_kv_cache")
    q, k_new = torch.randn(2, 2, 2, 1, 16, device="cuda")
    require_call(backend, q, q)
    k_cache = torch.zeros(2, 2, 8, 16, device="cuda")
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(
            q, k_cache, k_cache.clone(), torch.tensor([3, 8], device="cuda"), k_new, k_new, backend=backend
        )
    assert out[1].isnan().all() and out[0].isfinite().all()
    assert (k_cache[1] == 0).all() and torch.equal(k_cache[0, :, 3], k_new[0, :, 0])


def _bad_cache_calls():
    q = torch.randn(2, 4, 1, 16)
    cache = torch.zeros(2, 2, 8, 16)
    lens = torch.tensor([0, 1])
    new = torch.randn(2, 2, 1, 16)
    kv = lmkern.attention_with_kv_cache
    return [
        (lambda: kv(q, cache[:, :, :, :8], cache, lens), ValueError, r"k_cache must have shape \(B, H_kv, L_max, D\)"),
        (lambda: kv(q, cache, cache[:, :, :4], lens), ValueError, "v_cache must have shape"),
        (lambda: kv(q, cache[:, :1].expand(2, 3, 8, 16), cache[:, :1].expand(2, 3, 8, 16), lens), ValueError,
         r"multiple of the number of cache heads \(3\)"),
        (lambda: kv(q, cache.transpose(2, 3).contiguous().transpose(2, 3), cache, lens), ValueError,
         "k_cache must be contiguous in its last dimension"),
        (lambda: kv(q, cache, cache, lens.float()), TypeError, "cache_seqlens must be int32 or int64"),
        (lambda: kv(q, cache, cache, lens[:1]), ValueError, r"cache_seqlens must have shape \(2,\)"),
        (lambda: kv(q, cache, cache, lens, new), ValueError, "k_new and v_new must be given together"),
        (lambda: kv(q, cache, cache, lens, new[:, :1], new), ValueError,
         r"k_new must have shape \(B, H_kv, L_new, D\)"),
        (lambda: kv(q, cache, cache, lens, new.half(), new), ValueError, "k_new must have k_cache's dtype"),
        (lambda: kv(q.requires_grad_(), cache, cache, lens), RuntimeError, "call it under torch.no_grad"),
    ]


@pytest.mark.parametrize("index", range(len(_bad_cache_calls())))
def test_bad_cache_arguments_name_the_argument(index):
    call, error, message = _bad_cache_calls()[index]
    with pytest.raises(error, match=message):
        call()


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


@pytest.mark.parametrize("device", DEVICES)
def test_native_kv_cache_op_passes_opcheck(device):
    dtype = NATIVE_TEST_DTYPE[device]
    require("native", device, dtype, "attention_with_kv_cache")
    q = torch.randn(2, 4, 3, 64, device=device, dtype=dtype)
    k_cache, v_cache = torch.randn(2, 2, 2, 12, 64, device=device, dtype=dtype)
    k_new, v_new = torch.randn(2, 2, 2, 3, 64, device=device, dtype=dtype)
    lens = torch.tensor([0, 5], device=device)
    torch.library.opcheck(
        torch.ops.lmkern.attention_with_kv_cache_fwd.default, (q, k_cache, v_cache, lens, k_new, v_new, 0.25)
    )


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


def test_kv_cache_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "attention_with_kv_cache")
    q = torch.randn(2, 4, 1, 16)
    k_cache, v_cache = torch.randn(2, 2, 2, 12, 16)
    k_new, v_new = torch.randn(2, 2, 2, 1, 16)
    lens = torch.tensor([0, 5])

    def step(k_cache, v_cache):
        return lmkern.attention_with_kv_cache(q, k_cache, v_cache, lens, k_new, v_new, backend="native")

    eager_caches = (k_cache.clone(), v_cache.clone())
    with torch.no_grad():
        expected = step(*eager_caches)
        out = torch.compile(step, fullgraph=True)(k_cache, v_cache)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close((k_cache, v_cache), eager_caches)
