"""Attention over a KV cache (lmkern.attention_with_kv_cache): every backend against the
reference's full recomputation under the tolerance rule, token by token and with a long
cache split across programs, queries before the cache, caches that would overflow, the
torch.library registration, torch.compile, and bad input; on CUDA the native kernels'
cases (prefill, speculative tokens, GQA/MQA, int32 and int64 lengths)."""

import math

import pytest
import torch
from conftest import BACKENDS, DEVICES, DTYPES, require
from numerics import assert_close_to_truth, truth_dtype
from op_check import bad_call_test

import lmkern
from lmkern.ops.attention import reference
from lmkern.ops.attention_with_kv_cache.backends import ATTENTION_WITH_KV_CACHE
from lmkern.backend import Call


def require_call(backend, q, v_cache, caches_aligned=True):
    """Skip, saying why, where `backend` has a limit on this call (e.g. head dims the native
    CUDA kernels do not take)."""
    call = Call.of(q, head_dims=(q.shape[3], v_cache.shape[3]), caches_aligned=caches_aligned)
    reason = ATTENTION_WITH_KV_CACHE.unavailable(backend, call)
    if reason is not None:
        pytest.skip(f"{backend}: {reason}")


def full_attention(q, k, v, length, scale=None):
    """The reference for one sequence: q (H, Lq, D) attending over keys (H_kv, length, D),
    the last query seeing the last key (bottom-right causal alignment)."""
    _, seqlen_q, dim = q.shape
    scale = dim**-0.5 if scale is None else scale
    keys, values = k[None, :, :length], v[None, :, :length]
    out, _ = reference.attention_fwd(q[None], keys, values, None, True, length - seqlen_q, scale, 0.0, None)
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
        from lmkern.ops.attention_with_kv_cache.triton_kernels import decode_splits

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


# ------------------------------------------------------------------------------------------
# Rotary embeddings fused into the step (rotary_cos, rotary_sin, rotary_interleaved).
# id -> (H, H_kv, Lq, L_new): a decode step, speculative/prefill tokens, and queries over a
# cache that already holds their (rotated) keys. Cached lengths are ragged.
ROTARY_CASES = {
    "decode": (4, 2, 1, 1),
    "tokens": (4, 2, 3, 3),
    "no_new_keys": (4, 4, 2, 0),
}
ROTARY_LENGTHS = [0, 5, 17]


def unfused_rotary_step(q, k_cache, v_cache, seqlens, k_new, v_new, cos, sin, interleaved, dtype):
    """The step as its parts, through the reference in `dtype` (cos and sin as given):
    lmkern.apply_rotary of q and k_new at their positions, then attention_with_kv_cache
    without rotary, on copies of the caches. Returns the output and the caches after it."""
    q, k_cache, v_cache = (t.to(dtype, copy=True) for t in (q, k_cache, v_cache))
    lengths, new_len = seqlens.long(), 0 if k_new is None else k_new.shape[2]
    query_positions = (lengths + new_len)[:, None] - q.shape[2] + torch.arange(q.shape[2], device=q.device)
    q = lmkern.apply_rotary(q, cos, sin, position_ids=query_positions.clamp(min=0), interleaved=interleaved,
                            backend="torch")
    if k_new is not None:
        k_new = lmkern.apply_rotary(k_new.to(dtype), cos, sin, position_ids=seqlens, interleaved=interleaved,
                                    backend="torch")
        v_new = v_new.to(dtype)
    out = lmkern.attention_with_kv_cache(q, k_cache, v_cache, seqlens, k_new, v_new, backend="torch")
    return out, k_cache, v_cache


@pytest.mark.parametrize("case", ROTARY_CASES.values(), ids=ROTARY_CASES.keys())
@pytest.mark.parametrize("rotary_dim", ["full", "partial"])
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_rotary_matches_apply_rotary_then_attention(device, backend, dtype, interleaved, rotary_dim, case):
    """The fused step against lmkern.apply_rotary of q and k_new at their positions, then
    attention without rotary (the reference), under the tolerance rule: its output and the
    caches it leaves (rotated keys, values as given; q unchanged)."""
    require(backend, device, dtype, "attention_with_kv_cache")
    heads, kv_heads, seqlen_q, new_len = case
    dim = 64 if device == "cuda" else 16  # the native CUDA kernels take head dims 64 and 128
    capacity, batch = 24, len(ROTARY_LENGTHS)
    require_call(backend, torch.empty(batch, heads, 1, dim, dtype=dtype, device=device), torch.empty(1, 1, 1, dim))
    generator = torch.Generator().manual_seed(7)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to(device, dtype)

    q = randn(batch, heads, seqlen_q, dim)
    k_cache, v_cache = randn(batch, kv_heads, capacity, dim), randn(batch, kv_heads, capacity, dim)
    k_new, v_new = (randn(batch, kv_heads, new_len, dim), randn(batch, kv_heads, new_len, dim)) if new_len else (None,) * 2
    cos, sin = lmkern.rotary_cache(dim if rotary_dim == "full" else dim // 2, 32, dtype=torch.float64, device=device)
    seqlens = torch.tensor(ROTARY_LENGTHS, dtype=torch.int32, device=device)
    step = (q, k_cache, v_cache, seqlens, k_new, v_new)
    truth, truth_k, _ = unfused_rotary_step(*step, cos, sin, interleaved, truth_dtype(dtype))
    cos, sin = cos.float(), sin.float()
    baseline, baseline_k, baseline_v = unfused_rotary_step(*step, cos, sin, interleaved, dtype)
    q_before = q.clone()
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(
            *step, backend=backend, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=interleaved
        )
    assert torch.equal(q, q_before)
    assert_close_to_truth(out, truth, baseline, name="output")
    assert_close_to_truth(k_cache, truth_k, baseline_k, name="k_cache")
    assert torch.equal(v_cache, baseline_v)
    for b, length in enumerate(ROTARY_LENGTHS):  # outside the new keys' positions nothing changed
        untouched = torch.ones(capacity, dtype=torch.bool, device=device)
        untouched[length : length + new_len] = False
        assert torch.equal(k_cache[b, :, untouched], baseline_k[b, :, untouched])


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_decode_step_matches_hugging_face(backend):
    """One decode step of a Llama layout (GQA, half-split rotary) against Hugging Face's
    apply_rotary_pos_emb of q and k at each sequence's position, then attention without rotary."""
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    pytest.importorskip("transformers")
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    generator = torch.Generator().manual_seed(8)
    batch, heads, kv_heads, dim, capacity = 3, 4, 2, 32, 40
    q = torch.randn(batch, heads, 1, dim, generator=generator)
    k_new, v_new = torch.randn(2, batch, kv_heads, 1, dim, generator=generator)
    k_cache, v_cache = torch.randn(2, batch, kv_heads, capacity, dim, generator=generator)
    seqlens = torch.tensor([3, 0, 38])
    cos, sin = lmkern.rotary_cache(dim, 64)
    # Hugging Face's caches are (B, L, D): each sequence's one row at its position.
    cos_hf, sin_hf = torch.cat((cos, cos), -1)[seqlens][:, None], torch.cat((sin, sin), -1)[seqlens][:, None]
    q_hf, _ = apply_rotary_pos_emb(q, q, cos_hf, sin_hf)
    k_hf, _ = apply_rotary_pos_emb(k_new, k_new, cos_hf, sin_hf)
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    expected = lmkern.attention_with_kv_cache(q_hf, expected_k, expected_v, seqlens, k_hf, v_new, backend="torch")
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(
            q, k_cache, v_cache, seqlens, k_new, v_new, backend=backend, rotary_cos=cos, rotary_sin=sin
        )
    torch.testing.assert_close(k_cache, expected_k)
    torch.testing.assert_close(v_cache, expected_v)
    torch.testing.assert_close(out, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_under_autocast_follows_the_caches_dtype(backend):
    """Under autocast q, k_new and v_new are cast to the caches' dtype, as without rotary;
    fp32 rotary caches are read as they are: the same step as with half inputs outside it."""
    require(backend, "cpu", torch.float16, "attention_with_kv_cache")
    generator = torch.Generator().manual_seed(9)
    q = torch.randn(2, 4, 2, 16, generator=generator)
    k_new, v_new = torch.randn(2, 2, 2, 2, 16, generator=generator)
    caches = [torch.randn(2, 2, 12, 16, generator=generator).half() for _ in range(2)]
    seqlens = torch.tensor([0, 7])
    cos, sin = lmkern.rotary_cache(8, 12)
    rotary = dict(rotary_cos=cos, rotary_sin=sin, rotary_interleaved=True, backend=backend)
    expected_caches = [cache.clone() for cache in caches]
    with torch.no_grad():
        expected = lmkern.attention_with_kv_cache(q.half(), *expected_caches, seqlens, k_new.half(), v_new.half(),
                                                  **rotary)
        with torch.autocast("cpu", dtype=torch.float16):
            out = lmkern.attention_with_kv_cache(q, *caches, seqlens, k_new, v_new, **rotary)
    assert out.dtype == torch.float16
    torch.testing.assert_close(out, expected, rtol=0, atol=0)
    torch.testing.assert_close(caches, expected_caches, rtol=0, atol=0)


@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_position_past_the_caches_raises_on_cpu_and_writes_nothing(backend):
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    q, k_new = torch.randn(2, 2, 2, 2, 16)
    k_cache = torch.zeros(2, 2, 16, 16)
    cos, sin = lmkern.rotary_cache(16, 10)
    message = r"cache_seqlens\[1\] = 9: with 2 new keys the sequence reaches position 10, past the 10 positions"
    with torch.no_grad(), pytest.raises(ValueError, match=message):
        lmkern.attention_with_kv_cache(q, k_cache, k_cache.clone(), torch.tensor([8, 9]), k_new, k_new,
                                       backend=backend, rotary_cos=cos, rotary_sin=sin)
    assert (k_cache == 0).all()


def _bad_cache_calls():
    q = torch.randn(2, 4, 1, 16)
    cache = torch.zeros(2, 2, 8, 16)
    lens = torch.tensor([0, 1])
    new = torch.randn(2, 2, 1, 16)
    cos, sin = lmkern.rotary_cache(16, 32)
    wide = torch.zeros(32, 9)  # rotary_dim 18 > D
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
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos), ValueError,
         "rotary_cos and rotary_sin must be given together"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos, rotary_sin=sin[:, :4]), ValueError,
         r"rotary_cos and rotary_sin must have one shape and dtype, got \(32, 8\)"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=wide, rotary_sin=wide), ValueError,
         r"rotary_cos and rotary_sin must be \(max_positions, rotary_dim / 2\) with 2 <= rotary_dim <= head_dim 16"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos[0], rotary_sin=sin[0]), ValueError, "rotary_cos must be 2-D"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos.long(), rotary_sin=sin.long()), TypeError,
         "rotary_cos must be a floating-point tensor"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos.requires_grad_(), rotary_sin=sin), ValueError,
         "rotary_cos must not require grad"),
        (lambda: kv(q, cache, cache, lens, rotary_cos=cos, rotary_sin=sin, rotary_interleaved=1), TypeError,
         "rotary_interleaved must be a bool"),
        (lambda: kv(q.requires_grad_(), cache, cache, lens), RuntimeError, "call it under torch.no_grad"),
    ]


test_bad_cache_arguments_name_the_argument = bad_call_test(_bad_cache_calls)

# ------------------------------------------------------------------------------------------
# The native CUDA kernels, through the op itself.
# id -> (H, H_kv, Lq, L_new, L_max, cache lengths before the call, one per sequence). Split
# counts chosen by the launcher on an H100 (132 multiprocessors): one_token 4, long_cache 16
# (most of them empty for the 101-key sequence), mqa_long_cache 8, the others 1.
CUDA_CASES = {
    "one_token": (8, 2, 1, 1, 1023, [0, 16, 500, 1022]),
    "long_cache": (4, 1, 1, 1, 4096, [4095, 100]),
    "mqa_long_cache": (16, 1, 1, 1, 2000, [1999]),
    "speculative": (4, 4, 3, 3, 300, [0, 17, 297]),
    "no_new_keys": (2, 1, 2, 0, 255, [1, 255]),  # sequence 0's first query sees no key
    "prefill": (8, 2, 113, 113, 256, [0, 100]),
}


@pytest.mark.gpu
@pytest.mark.parametrize("seqlens_dtype", [torch.int32, torch.int64], ids=str)
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("dtype", (torch.float16, torch.bfloat16), ids=str)
@pytest.mark.parametrize("case", CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_native_cuda_op_matches_full_recomputation(case, dtype, head_dim, seqlens_dtype):
    require("native", "cuda", dtype, "attention_with_kv_cache")
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
    expected_k, expected_v = k_cache.clone(), v_cache.clone()
    for b, length in enumerate(lengths):
        expected_k[b, :, length : length + seqlen_new] = k_new[b]
        expected_v[b, :, length : length + seqlen_new] = v_new[b]
    cache_seqlens = torch.tensor(lengths, dtype=seqlens_dtype, device="cuda")
    scale = 1.0 / math.sqrt(head_dim)

    out = torch.ops.lmkern.attention_with_kv_cache_fwd(q, k_cache, v_cache, cache_seqlens, k_new, v_new, scale)
    torch.testing.assert_close(k_cache, expected_k, rtol=0, atol=0, equal_nan=True)
    torch.testing.assert_close(v_cache, expected_v, rtol=0, atol=0, equal_nan=True)
    assert cache_seqlens.tolist() == lengths  # the caller advances the lengths
    for b, length in enumerate(lengths):
        total = length + seqlen_new
        truth = full_attention(q[b].float(), expected_k[b].float(), expected_v[b].float(), total, scale)
        baseline = full_attention(q[b], expected_k[b], expected_v[b], total, scale)
        assert_close_to_truth(out[b], truth, baseline, name=f"out of sequence {b}")


@pytest.mark.gpu
def test_native_cuda_sequence_that_does_not_fit_gets_nan_and_no_write():
    require("native", "cuda", torch.float16, "attention_with_kv_cache")
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


@pytest.mark.gpu
@pytest.mark.parametrize("backend", BACKENDS)
def test_rotary_position_past_the_caches_gives_nan_on_gpu(backend):
    """On CUDA no check stalls the stream: a key or query past the rotary caches gets NaN
    in its rotated part (no cache row read out of bounds), the rest of the batch is intact."""
    require(backend, "cuda", torch.float16, "attention_with_kv_cache")
    q = torch.randn(2, 4, 2, 64, device="cuda", dtype=torch.float16)
    require_call(backend, q, q)
    k_new, v_new = torch.randn(2, 2, 2, 2, 64, device="cuda", dtype=torch.float16)
    k_cache, v_cache = torch.zeros(2, 2, 2, 16, 64, device="cuda", dtype=torch.float16)
    cos, sin = lmkern.rotary_cache(32, 9, device="cuda")  # positions 0..8
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(q, k_cache, v_cache, torch.tensor([3, 8], device="cuda"), k_new, v_new,
                                             backend=backend, rotary_cos=cos, rotary_sin=sin)
    assert out[0].isfinite().all() and k_cache[0].isfinite().all()
    assert out[1, :, 0].isfinite().all() and out[1, :, 1].isnan().all()  # queries at positions 8 and 9
    assert k_cache[1, :, 8].isfinite().all() and k_cache[1, :, 9, :32].isnan().all()
    assert torch.equal(k_cache[1, :, 9, 32:], k_new[1, :, 1, 32:])  # past rotary_dim: as given


@pytest.mark.gpu
@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("head_dim", (64, 128))
@pytest.mark.parametrize("case", CUDA_CASES.values(), ids=CUDA_CASES.keys())
def test_native_cuda_rotary_matches_apply_rotary_then_attention(case, head_dim, interleaved):
    """The native CUDA kernels' shapes (split caches, prefill, MQA) with fused rotary
    (partial: half of each head) against apply_rotary then attention, bf16."""
    require("native", "cuda", torch.bfloat16, "attention_with_kv_cache")
    heads, kv_heads, seqlen_q, seqlen_new, capacity, lengths = case
    batch = len(lengths)
    generator = torch.Generator().manual_seed(1)

    def randn(*shape):
        return torch.randn(*shape, generator=generator).to("cuda", torch.bfloat16)

    q = randn(batch, heads, seqlen_q, head_dim)
    k_cache, v_cache = randn(batch, kv_heads, capacity, head_dim), randn(batch, kv_heads, capacity, head_dim)
    k_new, v_new = (randn(batch, kv_heads, seqlen_new, head_dim), randn(batch, kv_heads, seqlen_new, head_dim)) \
        if seqlen_new else (None, None)
    cos, sin = lmkern.rotary_cache(head_dim // 2, capacity, dtype=torch.float64, device="cuda")
    seqlens = torch.tensor(lengths, dtype=torch.int32, device="cuda")
    step = (q, k_cache, v_cache, seqlens, k_new, v_new)
    truth, truth_k, _ = unfused_rotary_step(*step, cos, sin, interleaved, torch.float32)
    cos, sin = cos.float(), sin.float()
    baseline, baseline_k, _ = unfused_rotary_step(*step, cos, sin, interleaved, torch.bfloat16)
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(*step, backend="native", rotary_cos=cos, rotary_sin=sin,
                                             rotary_interleaved=interleaved)
    assert_close_to_truth(out, truth, baseline, name="output")
    assert_close_to_truth(k_cache, truth_k, baseline_k, name="k_cache")


# ------------------------------------------------------------------------------------------
# The torch.library registration, and torch.compile.
NATIVE_TEST_DTYPE = {"cpu": torch.float32, "cuda": torch.float16}


@pytest.mark.parametrize("device", DEVICES)
def test_native_kv_cache_op_passes_opcheck(device):
    dtype = NATIVE_TEST_DTYPE[device]
    require("native", device, dtype, "attention_with_kv_cache")
    q = torch.randn(2, 4, 3, 64, device=device, dtype=dtype)
    k_cache, v_cache = torch.randn(2, 2, 2, 12, 64, device=device, dtype=dtype)
    k_new, v_new = torch.randn(2, 2, 2, 3, 64, device=device, dtype=dtype)
    lens = torch.tensor([0, 5], device=device)
    op = torch.ops.lmkern.attention_with_kv_cache_fwd.default
    torch.library.opcheck(op, (q, k_cache, v_cache, lens, k_new, v_new, 0.25))
    cos, sin = lmkern.rotary_cache(32, 16, device=device)  # partial rotary, interleaved
    torch.library.opcheck(op, (q, k_cache, v_cache, lens, k_new, v_new, 0.25, cos, sin, True))


def test_kv_cache_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "attention_with_kv_cache")
    q = torch.randn(2, 4, 1, 16)
    k_cache, v_cache = torch.randn(2, 2, 2, 12, 16)
    k_new, v_new = torch.randn(2, 2, 2, 1, 16)
    lens = torch.tensor([0, 5])

    cos, sin = lmkern.rotary_cache(16, 16)

    def step(k_cache, v_cache):
        return lmkern.attention_with_kv_cache(q, k_cache, v_cache, lens, k_new, v_new, backend="native",
                                              rotary_cos=cos, rotary_sin=sin)

    eager_caches = (k_cache.clone(), v_cache.clone())
    with torch.no_grad():
        expected = step(*eager_caches)
        out = torch.compile(step, fullgraph=True)(k_cache, v_cache)
    torch.testing.assert_close(out, expected)
    torch.testing.assert_close((k_cache, v_cache), eager_caches)
