"""Sliding-window (local) attention, window_size=(left, right), of
lmkern.scaled_dot_product_attention and lmkern.attention_with_kv_cache: every backend
against the reference given the same window as a dense boolean mask, built here
independently, under the tolerance rule (3x for gradients); Mistral's window against a
mask built the Hugging Face way; rows whose window holds no key; bad window sizes.

That the kernels skip the key blocks outside the window (loop bounds, not masking) shows
in benchmarks/bench_attention.py's window cases, whose time grows linearly in L; no test
asserts a time.
"""

import pytest
import torch
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from numerics import assert_close_to_truth, truth_dtype
from op_check import bad_call_test
from test_attention import assert_matches_reference, attention_and_grads, make_mask
from test_attention_with_kv_cache import require_call as require_cache_call
from torch.nn.attention import bias as attention_bias

import lmkern


def band_mask(seqlen_q, seqlen_k, left, right, shift=0, causal=False):
    """(Lq, Lk) boolean, element by element: query i sees key j when
    i + shift - left <= j <= i + shift + right (-1: that side unbounded), and j <= i + shift
    if causal."""
    mask = torch.zeros(seqlen_q, seqlen_k, dtype=torch.bool)
    for i in range(seqlen_q):
        for j in range(seqlen_k):
            diagonal = i + shift
            mask[i, j] = (
                (left < 0 or j >= diagonal - left)
                and (right < 0 or j <= diagonal + right)
                and (not causal or j <= diagonal)
            )
    return mask


# id -> shape (B, H, H_kv, Lq, Lk, D[, Dv]), window_size and keyword arguments; "mask"
# names a mask of test_attention.make_mask.
CASES = {
    "left_only": ((2, 2, 2, 37, 37, 16), (5, -1), {}),
    "right_only": ((1, 2, 2, 37, 37, 16), (-1, 3), {}),
    "both_sides": ((2, 2, 2, 70, 70, 16), (7, 4), {}),
    "zero": ((1, 2, 2, 33, 33, 16), (0, 0), {}),
    "larger_than_length": ((1, 2, 2, 20, 20, 16), (100, 100), {}),
    "causal_left": ((1, 2, 2, 100, 100, 16), (9, -1), dict(is_causal=True)),
    "causal_ignores_right": ((1, 2, 2, 40, 40, 16), (5, 7), dict(is_causal=True)),
    "causal_zero": ((1, 1, 1, 33, 33, 16), (0, 0), dict(is_causal=True)),
    "long_causal": ((1, 1, 1, 300, 300, 16), (20, 0), dict(is_causal=True)),
    "long_both_sides": ((1, 1, 1, 300, 300, 16), (24, 40), {}),
    # Lq != Lk: top-left alignment as is_causal; more queries than keys leaves rows empty
    "more_queries": ((1, 2, 2, 70, 17, 16), (3, 2), {}),
    "more_queries_causal": ((1, 2, 2, 70, 17, 16), (3, -1), dict(is_causal=True)),
    "fewer_queries": ((1, 2, 2, 17, 70, 32), (3, 20), {}),
    "lower_right_fewer_queries": ((2, 2, 2, 17, 70, 32), (5, -1), dict(mask="causal_lower_right")),
    "lower_right_more_queries": ((1, 2, 2, 70, 17, 16), (4, 0), dict(mask="causal_lower_right")),
    "mistral_gqa": ((1, 4, 2, 65, 65, 16), (15, 0), dict(enable_gqa=True, is_causal=True)),
    "mqa": ((1, 4, 1, 50, 50, 16), (6, 6), dict(enable_gqa=True)),
    "key_padding": ((3, 2, 2, 33, 40, 32), (6, 6), dict(mask="key_padding")),
    "bool_mask": ((2, 2, 2, 33, 47, 16), (10, -1), dict(mask="bool")),
    "additive_mask": ((2, 2, 2, 33, 47, 16), (-1, 8), dict(mask="additive")),
    "dropout_causal": ((1, 2, 2, 40, 40, 16), (8, 0), dict(dropout_p=0.2, is_causal=True)),
    "odd_head_dims": ((2, 2, 2, 45, 45, 40, 24), (11, 3), {}),
}


def window_case(case, dtype, device):
    """(q, k, v, keyword arguments with window_size, the same attention with the window as
    a dense mask instead)."""
    shape, window, kwargs = CASES[case]
    batch, heads, kv_heads, seqlen_q, seqlen_k, dim, *dim_v = shape
    dim_v = dim_v[0] if dim_v else dim
    generator = torch.Generator().manual_seed(11)
    q, k, v = (
        torch.randn(batch, h, length, d, generator=generator).to(device, dtype)
        for h, length, d in ((heads, seqlen_q, dim), (kv_heads, seqlen_k, dim), (kv_heads, seqlen_k, dim_v))
    )
    kwargs = dict(kwargs)
    causal, shift, mask = kwargs.pop("is_causal", False), 0, None
    kind = kwargs.pop("mask", None)
    if kind == "causal_lower_right":
        causal, shift = True, seqlen_k - seqlen_q
        kwargs["attn_mask"] = attention_bias.causal_lower_right(seqlen_q, seqlen_k)
    elif kind is not None:
        mask = make_mask(kind, batch, heads, seqlen_q, seqlen_k, dtype, generator).to(device)
        kwargs["attn_mask"] = mask
    elif causal:
        kwargs["is_causal"] = True
    band = band_mask(seqlen_q, seqlen_k, *window, shift, causal).to(device)
    if mask is None:
        dense = band
    elif mask.dtype == torch.bool:
        dense = mask & band
    else:
        dense = mask.masked_fill(~band, float("-inf"))
    dense_kwargs = {name: value for name, value in kwargs.items() if name not in ("attn_mask", "is_causal")}
    return q, k, v, dict(kwargs, window_size=window), dict(dense_kwargs, attn_mask=dense)


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_window_matches_dense_mask(device, backend, dtype, case):
    require(backend, device, dtype, "attention")
    q, k, v, kwargs, dense_kwargs = window_case(case, dtype, device)
    assert_matches_reference(q, k, v, kwargs, backend, reference_kwargs=dense_kwargs)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rows_whose_window_is_empty_give_zeros(backend):
    """Queries past the keys with a left-only window (top-left alignment) see none."""
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, kwargs, _ = window_case("more_queries", torch.float32, "cpu")
    out, (dq, dk, dv) = attention_and_grads(q, k, v, kwargs, backend)
    assert out.isfinite().all() and all(g.isfinite().all() for g in (dq, dk, dv))
    empty = 17 + 3  # queries i > Lk - 1 + left see no key
    assert (out[:, :, empty:] == 0).all() and (dq[:, :, empty:] == 0).all()


def test_no_window_is_the_default_and_a_wide_window_changes_nothing():
    q, k, v, _, _ = window_case("both_sides", torch.float64, "cpu")
    plain = lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, backend="torch")
    for window in ((-1, -1), (69, 69), (1000, -1)):
        windowed = lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=window, backend="torch")
        torch.testing.assert_close(windowed, plain, rtol=0, atol=0)


def hf_mistral_mask(seqlen, sliding_window):
    """The mask of transformers' sliding_window_causal_mask_function as Mistral uses it,
    built the way it reads: causal, and kv_idx > q_idx - sliding_window."""
    q_idx = torch.arange(seqlen)[:, None]
    kv_idx = torch.arange(seqlen)[None, :]
    return (kv_idx <= q_idx) & (kv_idx > q_idx - sliding_window)


def test_mistral_window_is_sliding_window_minus_one():
    """Mistral's config.sliding_window W lets a query see itself and the W - 1 keys before
    it: window_size=(W - 1, 0) with is_causal=True. The mask is checked against
    transformers' own mask function where it is importable."""
    seqlen, sliding_window = 40, 8
    expected = hf_mistral_mask(seqlen, sliding_window)
    try:
        from transformers.masking_utils import sliding_window_causal_mask_function
    except ImportError:
        pass
    else:
        function = sliding_window_causal_mask_function(sliding_window)
        index = torch.tensor(0)
        from_hf = function(index, index, torch.arange(seqlen)[:, None], torch.arange(seqlen)[None, :])
        assert torch.equal(from_hf, expected)
    assert torch.equal(band_mask(seqlen, seqlen, sliding_window - 1, 0, causal=True), expected)
    q, k, v = torch.randn(3, 1, 2, seqlen, 16, generator=torch.Generator().manual_seed(3)).double()
    window = (sliding_window - 1, 0)
    torch.testing.assert_close(
        lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, window_size=window, backend="torch"),
        torch.nn.functional.scaled_dot_product_attention(q, k, v, attn_mask=expected),
    )


def _bad_calls():
    q = torch.randn(1, 2, 8, 16)
    caches = torch.zeros(2, 1, 2, 16, 16)
    lengths = torch.tensor([3])
    sdpa, decode = lmkern.scaled_dot_product_attention, lmkern.attention_with_kv_cache
    return [
        (lambda: sdpa(q, q, q, window_size=4), TypeError, r"window_size must be a pair of ints \(left, right\), got 4"),
        (lambda: sdpa(q, q, q, window_size=(4,)), TypeError, "window_size must be a pair of ints"),
        (lambda: sdpa(q, q, q, window_size=(4, 2.0)), TypeError, "window_size must be a pair of ints"),
        (lambda: sdpa(q, q, q, window_size=(True, 0)), TypeError, "window_size must be a pair of ints"),
        (lambda: sdpa(q, q, q, window_size=(-2, 0)), ValueError, r"window_size must be ints >= -1 .*got \(-2, 0\)"),
        (lambda: sdpa(q, q, q, window_size=(3, -5)), ValueError, r"window_size must be ints >= -1"),
        (lambda: decode(q[:, :, :1], *caches, lengths, window_size=(-3, 0)), ValueError,
         r"window_size must be ints >= -1"),
        (lambda: decode(q[:, :, :1], *caches, lengths, window_size="4"), TypeError, "window_size must be a pair"),
    ]


test_bad_window_sizes_name_the_argument = bad_call_test(_bad_calls)


# KV cache: ragged cache lengths, several new tokens, GQA; a window smaller and larger than
# the cached part; a long cache that the triton backend splits across programs.
CACHE_CASES = {
    "decode_one_token": (1, 5),
    "prefill_chunk": (6, 9),
    "window_zero": (3, 0),
    "window_wider_than_cache": (4, 500),
    "no_window": (2, -1),
    "window_far_from_the_start": (2, 290),
}


def cache_reference(q, k_cache, v_cache, lengths, window_left):
    """Each sequence's queries over its cache with the dense mask: query i at position
    total - Lq + i sees positions total - Lq + i - window_left .. total - Lq + i."""
    batch, heads, seqlen_q, _ = q.shape
    outs = []
    for b in range(batch):
        total = int(lengths[b])
        mask = band_mask(seqlen_q, total, window_left, 0, shift=total - seqlen_q, causal=True).to(q.device)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[b : b + 1], k_cache[b : b + 1, :, :total], v_cache[b : b + 1, :, :total], attn_mask=mask,
            enable_gqa=True,
        )
        outs.append(out.nan_to_num())  # rows that see nothing: zeros, as lmkern gives
    return torch.cat(outs)


@pytest.mark.parametrize("case", CACHE_CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_window_matches_dense_mask(device, backend, dtype, case):
    require(backend, device, dtype, "attention_with_kv_cache")
    seqlen_q, window_left = CACHE_CASES[case]
    batch, heads, kv_heads, capacity, dim = 3, 4, 2, 600, 16
    generator = torch.Generator().manual_seed(12)
    q = torch.randn(batch, heads, seqlen_q, dim, generator=generator).to(device, dtype)
    require_cache_call(backend, q, q)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=generator).to(device, dtype)
    k_new, v_new = torch.randn(2, batch, kv_heads, seqlen_q, dim, generator=generator).to(device, dtype)
    lengths = torch.tensor([0, 17, 580], dtype=torch.int32, device=device)
    caches = (k_cache.clone(), v_cache.clone())
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(
            q, *caches, lengths, k_new, v_new, window_size=(window_left, 0), backend=backend
        )
        expected_caches = (k_cache.clone(), v_cache.clone())
        lmkern.attention_with_kv_cache(q, *expected_caches, lengths, k_new, v_new, backend="torch")
    for cache, expected in zip(caches, expected_caches):
        assert torch.equal(cache, expected)
    totals = lengths + seqlen_q
    wide = truth_dtype(dtype)
    truth = cache_reference(q.to(wide), *(c.to(wide) for c in caches), totals, window_left)
    baseline = cache_reference(q, *caches, totals, window_left)
    assert_close_to_truth(out, truth, baseline, name="out")


@pytest.mark.parametrize("backend", BACKENDS)
def test_kv_cache_window_right_counts_as_zero(backend):
    """The cache's attention is causal: a right bound changes nothing."""
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    generator = torch.Generator().manual_seed(13)
    q = torch.randn(2, 2, 3, 16, generator=generator)
    require_cache_call(backend, q, q)
    k_cache, v_cache = torch.randn(2, 2, 2, 40, 16, generator=generator)
    lengths = torch.tensor([10, 37])
    with torch.no_grad():
        outs = [
            lmkern.attention_with_kv_cache(q, k_cache, v_cache, lengths, window_size=window, backend=backend)
            for window in ((4, 0), (4, 9), (4, -1))
        ]
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_kv_cache_window_split_across_programs(device, backend):
    """One sequence, one key/value head, a long cache: the triton backend splits the
    window's keys (not the cache's) across programs and combines them."""
    require(backend, device, torch.float32, "attention_with_kv_cache")
    generator = torch.Generator().manual_seed(14)
    capacity, heads, window_left = 1000, 8, 300
    q = torch.randn(1, heads, 1, 16, generator=generator).to(device)
    require_cache_call(backend, q, q)
    k_cache, v_cache = torch.randn(2, 1, 1, capacity, 16, generator=generator).to(device)
    if backend == "triton":
        from lmkern.ops.attention_with_kv_cache.triton_kernels import decode_splits

        assert decode_splits(1, window_left + 1, q.device) > 1
    for length in (0, 250, 999):  # cached keys besides the new one
        k_new, v_new = torch.randn(2, 1, 1, 1, 16, generator=generator).to(device)
        lengths = torch.tensor([length], device=device)
        with torch.no_grad():
            out = lmkern.attention_with_kv_cache(
                q, k_cache, v_cache, lengths, k_new, v_new, window_size=(window_left, 0), backend=backend
            )
        totals = lengths + 1
        truth = cache_reference(q.double(), k_cache.double(), v_cache.double(), totals, window_left)
        baseline = cache_reference(q, k_cache, v_cache, totals, window_left)
        assert_close_to_truth(out, truth, baseline, name=f"length {length}")


# The torch.library registration of the native ops with a window, in a dtype and head dim
# (64) that the native kernels of each device take; and torch.compile.
NATIVE_TEST_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck_with_a_window(device):
    dtype = NATIVE_TEST_DTYPE[device]
    require("native", device, dtype, "attention")
    generator = torch.Generator().manual_seed(15)
    q, k, v = torch.randn(3, 2, 2, 70, 64, generator=generator).to(device, dtype)
    for is_causal, causal_shift, window_left in ((True, 0, 9), (True, 5, 12), (False, 0, 4)):
        args = (None, is_causal, causal_shift, 0.125, 0.0, 0, window_left)
        out, lse = torch.ops.lmkern.attention_fwd(q, k, v, *args)
        torch.library.opcheck(torch.ops.lmkern.attention_fwd.default, (q, k, v, *args))
        torch.library.opcheck(torch.ops.lmkern.attention_bwd.default, (torch.randn_like(out), q, k, v, out, lse, *args))
    require("native", device, dtype, "attention_with_kv_cache")
    k_cache, v_cache = torch.randn(2, 2, 2, 40, 64, generator=generator).to(device, dtype)
    lengths = torch.tensor([3, 30], device=device)
    torch.library.opcheck(
        torch.ops.lmkern.attention_with_kv_cache_fwd.default,
        (q[:2, :, :3], k_cache, v_cache, lengths, k[:2, :, :3], v[:2, :, :3], 0.125),
        {"window_left": 6},
    )


def test_window_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "attention")
    q, k, v, kwargs, _ = window_case("mistral_gqa", torch.float32, "cpu")
    weight = torch.randn(q.shape[-1], q.shape[-1], generator=torch.Generator().manual_seed(16)) / 4

    def step(x):
        return lmkern.scaled_dot_product_attention(x @ weight, k, v, backend="native", **kwargs).square().sum()

    assert_compiles_like_eager(step, q)
