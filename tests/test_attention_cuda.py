"""The native CUDA attention kernels (csrc/cuda/attention_kernels.cu) called directly through
torch.ops.lmkern.*: forward, backward and KV-cache decoding against a plain PyTorch reference
under the tolerance rule (2x for outputs, 3x for gradients), the edge cases the kernels handle
on their own (rows that see no key, blocks above the causal diagonal, strided views, caches that
overflow) and the errors for what they do not run. Every test needs a CUDA device.

The reference here is this file's own, kept to what the kernels compute (boolean visibility,
no dropout); lmkern/ops/attention/reference.py is the oracle of the public API's tests.
"""

import math

import pytest
import torch
from conftest import require
from numerics import assert_close_to_truth

import lmkern

pytestmark = pytest.mark.gpu

DTYPES = (torch.float16, torch.bfloat16)
HEAD_DIMS = (64, 128)

# id -> (B, H, H_kv, Lq, Lk): odd lengths, Lq != Lk both ways, GQA and MQA.
SHAPES = {
    "one_query_one_key": (2, 2, 2, 1, 1),
    "odd_17": (2, 3, 3, 17, 17),
    "cross_113_255": (2, 2, 2, 113, 255),
    "cross_255_113": (2, 2, 2, 255, 113),
    "long_1023": (1, 2, 2, 1023, 1023),
    "one_query_1023_keys": (3, 2, 2, 1, 1023),
    "gqa": (2, 8, 2, 129, 200),
    "mqa": (3, 6, 1, 65, 64),
}


@pytest.fixture(autouse=True)
def _native_cuda():
    require("native", "cuda", None, "attention")


def visibility(batch, seqlen_q, seqlen_k, causal_shift, key_padding, device):
    """(B, 1, Lq, Lk) bool: which keys each query sees (causal_shift None: all; else query i
    sees keys j <= i + causal_shift, 0 being torch's top-left alignment)."""
    visible = torch.ones(batch, 1, seqlen_q, seqlen_k, dtype=torch.bool, device=device)
    if causal_shift is not None:
        visible &= torch.ones(seqlen_q, seqlen_k, dtype=torch.bool, device=device).tril(causal_shift)
    if key_padding is not None:
        visible &= key_padding[:, None, None, :]
    return visible


def make_key_padding(batch, seqlen_k, generator, device):
    """(B, Lk) bool, True = attend: random padding; sequence 0's first 3 keys padded (so that
    under a causal mask its first queries see no key) and sequence 1 all padding."""
    keep = torch.rand(batch, seqlen_k, generator=generator) > 0.3
    keep[0, :3] = False
    if batch > 1:
        keep[1] = False
    return keep.to(device)


def reference(q, k, v, visible, scale, dout):
    """(out, lse, dq, dk, dv) of softmax(scale q k^T) v over `visible`, computed in q's dtype.
    A row that sees no key gets out 0, lse +inf and zero gradients."""
    q, k, v = (x.detach().requires_grad_() for x in (q, k, v))
    group = q.shape[1] // k.shape[1]
    scores = scale * (q @ k.repeat_interleave(group, dim=1).transpose(-1, -2))
    scores = scores.masked_fill(~visible, float("-inf"))
    sees_none = ~visible.any(dim=-1, keepdim=True)
    scores = scores.masked_fill(sees_none, 0.0)  # keeps softmax and its gradient finite there
    probs = torch.softmax(scores, dim=-1).masked_fill(sees_none, 0.0)
    out = probs @ v.repeat_interleave(group, dim=1)
    lse = torch.logsumexp(scores.float(), dim=-1).masked_fill(sees_none.squeeze(-1), float("inf"))
    out.backward(dout)
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def native(q, k, v, mask, causal_shift, scale, dout):
    """(out, lse, dq, dk, dv) from the CUDA ops; mask (B, Lk) key padding or None;
    causal_shift as in visibility."""
    if mask is not None:
        mask = mask[:, None, None, :].expand(q.shape[0], q.shape[1], q.shape[2], k.shape[2])
    args = (mask, causal_shift is not None, causal_shift or 0, scale, 0.0, 0)
    out, lse = torch.ops.lmkern.attention_fwd(q, k, v, *args)
    dq, dk, dv = torch.ops.lmkern.attention_bwd(dout, q, k, v, out, lse, *args)
    return out, lse, dq, dk, dv


def assert_matches_reference(q, k, v, mask, causal_shift, scale, dout, results):
    """results (out, lse, dq, dk, dv) against the reference in fp32 (truth) and in q's dtype
    (baseline), from the same half-precision inputs."""
    visible = visibility(q.shape[0], q.shape[2], k.shape[2], causal_shift, mask, q.device)
    truth = reference(q.float(), k.float(), v.float(), visible, scale, dout.float())
    baseline = reference(q, k, v, visible, scale, dout)
    names = ("out", "lse", "dq", "dk", "dv")
    for name, actual, truth_value, baseline_value in zip(names, results, truth, baseline):
        expected_dtype = torch.float32 if name == "lse" else q.dtype
        assert actual.dtype == expected_dtype, f"{name}: dtype {actual.dtype}"
        assert_close_to_truth(
            actual, truth_value, baseline_value, factor=3.0 if name.startswith("d") else 2.0, name=name
        )


def make_inputs(shape, dtype, head_dim, seed=0):
    batch, heads, kv_heads, seqlen_q, seqlen_k = shape
    generator = torch.Generator().manual_seed(seed)
    q = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, head_dim, generator=generator)
    dout = torch.randn(batch, heads, seqlen_q, head_dim, generator=generator)
    return [x.to("cuda", dtype) for x in (q, k, v, dout)], generator


@pytest.mark.parametrize("masked", [False, True], ids=["no_mask", "key_padding"])
@pytest.mark.parametrize("causal", [None, "top_left", "bottom_right"], ids=["full", "causal", "causal_bottom_right"])
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
def test_matches_reference(shape, dtype, head_dim, causal, masked):
    (q, k, v, dout), generator = make_inputs(shape, dtype, head_dim)
    mask = make_key_padding(shape[0], shape[4], generator, "cuda") if masked else None
    scale = 1.0 / math.sqrt(head_dim)
    causal_shift = {None: None, "top_left": 0, "bottom_right": shape[4] - shape[3]}[causal]
    results = native(q, k, v, mask, causal_shift, scale, dout)
    assert_matches_reference(q, k, v, mask, causal_shift, scale, dout, results)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_rows_that_see_no_key_are_zero(dtype):
    (q, k, v, dout), generator = make_inputs((3, 2, 1, 40, 70), dtype, 64)
    mask = make_key_padding(3, 70, generator, "cuda")
    mask[2, 0] = True  # every causal row of sequence 2 sees a key
    out, lse, dq, dk, dv = native(q, k, v, mask, 0, 0.125, dout)
    assert torch.isinf(lse[1]).all() and (lse[1] > 0).all()  # sequence 1: all keys padded
    assert not out[1].any() and not dq[1].any() and not dk[1].any() and not dv[1].any()
    assert torch.isinf(lse[0, :, :3]).all() and not out[0, :, :3].any()  # causal rows before any key
    assert torch.isfinite(lse[2]).all()
    for x in (out, dq, dk, dv):
        assert torch.isfinite(x).all()


@pytest.mark.parametrize("head_dim", HEAD_DIMS)
def test_causal_skips_blocks_above_the_diagonal(head_dim):
    """64 queries see keys 0..63 only: NaN in the later key blocks must never be read."""
    (q, k, v, dout), _ = make_inputs((1, 2, 2, 64, 256), torch.bfloat16, head_dim)
    k[:, :, 64:] = float("nan")
    v[:, :, 64:] = float("nan")
    out, lse, dq, dk, dv = native(q, k, v, None, 0, 0.1, dout)
    results = (out, lse, dq, dk[:, :, :64], dv[:, :, :64])
    assert_matches_reference(q, k[:, :, :64], v[:, :, :64], None, 0, 0.1, dout, results)
    assert not dk[:, :, 64:].any() and not dv[:, :, 64:].any()


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_views(dtype):
    """q, k, v sliced from a packed (B, L, 3, H, D) projection (strided rows, read in place),
    an upstream gradient transposed from (B, L, H, D), and views whose rows are not 16-byte
    aligned (copied by the binding)."""
    batch, seqlen, heads, head_dim = 2, 97, 4, 64
    generator = torch.Generator().manual_seed(0)
    qkv = torch.randn(batch, seqlen, 3, heads, head_dim, generator=generator).to("cuda", dtype)
    q, k, v = (qkv[:, :, i].transpose(1, 2) for i in range(3))  # (B, H, L, D), rows 3 H D apart
    dout = torch.randn(batch, seqlen, heads, head_dim, generator=generator).to("cuda", dtype).transpose(1, 2)
    padded = torch.randn(batch, heads, seqlen, head_dim + 4, generator=generator).to("cuda", dtype)
    misaligned_v = padded[..., 2 : head_dim + 2]  # rows D + 4 apart, starting 4 bytes in
    for query, key, value in ((q, k, v), (q, k, misaligned_v)):
        results = native(query, key, value, None, 0, 0.125, dout)
        assert_matches_reference(query, key, value, None, 0, 0.125, dout, results)


def test_backward_is_deterministic():
    (q, k, v, dout), _ = make_inputs((2, 8, 2, 300, 300), torch.bfloat16, 128)
    first = native(q, k, v, None, 0, 0.1, dout)
    second = native(q, k, v, None, 0, 0.1, dout)
    for a, b in zip(first, second):
        assert torch.equal(a, b)


# --- decoding -----------------------------------------------------------------------------
# id -> (H, H_kv, Lq, L_new, L_max, cache lengths before the call, one per sequence). Split
# counts chosen by the launcher on an H100 (132 multiprocessors): one_token 4, long_cache 16
# (most of them empty for the 101-key sequence), mqa_long_cache 8, the others 1.
DECODE_CASES = {
    "one_token": (8, 2, 1, 1, 1023, [0, 16, 500, 1022]),
    "long_cache": (4, 1, 1, 1, 4096, [4095, 100]),
    "mqa_long_cache": (16, 1, 1, 1, 2000, [1999]),
    "speculative": (4, 4, 3, 3, 300, [0, 17, 297]),
    "no_new_keys": (2, 1, 2, 0, 255, [1, 255]),  # sequence 0's first query sees no key
    "prefill": (8, 2, 113, 113, 256, [0, 100]),
}


def append_reference(cache, new, lengths):
    """cache with new (B, H_kv, L_new, D) written at each sequence's position."""
    cache = cache.clone()
    for b, length in enumerate(lengths):
        cache[b, :, length : length + new.shape[2]] = new[b]
    return cache


@pytest.mark.parametrize("seqlens_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("head_dim", HEAD_DIMS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("case", DECODE_CASES.values(), ids=DECODE_CASES.keys())
def test_decoding_matches_full_recomputation(case, dtype, head_dim, seqlens_dtype):
    heads, kv_heads, seqlen_q, seqlen_new, capacity, lengths = case
    batch = len(lengths)
    generator = torch.Generator().manual_seed(0)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to("cuda", dtype)

    q = randn(batch, heads, seqlen_q, head_dim)
    k_cache, v_cache = randn(batch, kv_heads, capacity, head_dim), randn(batch, kv_heads, capacity, head_dim)
    k_new, v_new = randn(batch, kv_heads, seqlen_new, head_dim), randn(batch, kv_heads, seqlen_new, head_dim)
    for b, length in enumerate(lengths):  # past each sequence's keys: never read
        k_cache[b, :, length + seqlen_new :] = float("nan")
        v_cache[b, :, length + seqlen_new :] = float("nan")
    expected_k, expected_v = append_reference(k_cache, k_new, lengths), append_reference(v_cache, v_new, lengths)
    cache_seqlens = torch.tensor(lengths, dtype=seqlens_dtype, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)

    out = torch.ops.lmkern.attention_with_kv_cache_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    assert cache_seqlens.tolist() == lengths  # the caller advances the lengths
    for b, length in enumerate(lengths):
        total = length + seqlen_new
        keys, values = expected_k[b : b + 1, :, :total], expected_v[b : b + 1, :, :total]
        # Bottom-right alignment: query i sits at position total - Lq + i.
        positions = torch.arange(total - seqlen_q, total, device="cuda")[:, None]
        visible = (torch.arange(total, device="cuda")[None, :] <= positions)[None, None]
        dout = torch.zeros_like(q[b : b + 1])
        truth = reference(q[b : b + 1].float(), keys.float(), values.float(), visible, scale, dout.float())[0]
        baseline = reference(q[b : b + 1], keys, values, visible, scale, dout)[0]
        assert_close_to_truth(out[b : b + 1], truth, baseline, name=f"out of sequence {b}")


def test_decoding_sequence_that_does_not_fit_gets_nan_and_no_write():
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(3, 4, 1, 64, generator=generator).to("cuda", torch.float16)
    k_cache = torch.randn(3, 2, 600, 64, generator=generator).to("cuda", torch.float16)
    v_cache = torch.randn(3, 2, 600, 64, generator=generator).to("cuda", torch.float16)
    k_new = torch.randn(3, 2, 1, 64, generator=generator).to("cuda", torch.float16)
    v_new = torch.randn(3, 2, 1, 64, generator=generator).to("cuda", torch.float16)
    before = k_cache.clone(), v_cache.clone()
    cache_seqlens = torch.tensor([600, -1, 10], dtype=torch.int32, device="cuda")  # full, negative, fine
    out = torch.ops.lmkern.attention_with_kv_cache_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, 0.125)
    assert torch.isnan(out[:2]).all() and torch.isfinite(out[2]).all()
    assert torch.equal(k_cache[:2], before[0][:2]) and torch.equal(v_cache[:2], before[1][:2])
    assert torch.equal(k_cache[2, :, 10:11], k_new[2]) and torch.equal(v_cache[2, :, 10:11], v_new[2])


# --- what the native CUDA kernels do not run ------------------------------------------------


def _qkv(head_dim=64, dtype=torch.float16, head_dim_v=None):
    q = torch.randn(2, 2, 8, head_dim, device="cuda", dtype=dtype)
    k = torch.randn(2, 2, 8, head_dim, device="cuda", dtype=dtype)
    v = torch.randn(2, 2, 8, head_dim_v or head_dim, device="cuda", dtype=dtype)
    return q, k, v


@pytest.mark.parametrize(
    "make_args, message",
    [
        (lambda: (*_qkv(), None, False, 0, 0.1, 0.1, 0), "dropout is not supported by native CUDA attention"),
        (lambda: (*_qkv(head_dim=96), None, False, 0, 0.1, 0.0, 0), "head dims 64 and 128"),
        (lambda: (*_qkv(dtype=torch.float32), None, False, 0, 0.1, 0.0, 0), "float16 or bfloat16"),
        (lambda: (*_qkv(head_dim_v=128), None, False, 0, 0.1, 0.0, 0), "v's head dim equal to q's"),
        (
            lambda: (*_qkv(), torch.rand(2, 2, 8, 8, device="cuda") > 0.5, False, 0, 0.1, 0.0, 0),
            "only boolean key-padding masks",
        ),
        (
            lambda: (*_qkv(), torch.zeros(2, 1, 1, 8, device="cuda").expand(2, 2, 8, 8), False, 0, 0.1, 0.0, 0),
            "only boolean key-padding masks",
        ),
    ],
    ids=["dropout", "head_dim_96", "float32", "value_head_dim", "general_bool_mask", "additive_mask"],
)
def test_unsupported_cases_raise_clear_errors(make_args, message):
    with pytest.raises(RuntimeError, match=message):
        torch.ops.lmkern.attention_fwd(*make_args())


def test_the_public_api_sends_what_native_cannot_run_to_triton():
    q, k, v = _qkv(head_dim=96)
    with pytest.raises(lmkern.BackendUnavailableError, match="head dims"):
        lmkern.scaled_dot_product_attention(q, k, v, backend="native")
    expected = lmkern.scaled_dot_product_attention(q, k, v, backend="triton")
    torch.testing.assert_close(lmkern.scaled_dot_product_attention(q, k, v), expected)
