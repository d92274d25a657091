"""lmkern.scaled_dot_product_attention(..., relative_bias=...): a bias per distance
(H | 1, Lq + Lk - 1), as T5's relative position bias, read in place by the native CPU and
Triton kernels and its gradient summed along the diagonals of dS. Against the reference
(which materialises it) under the tolerance rule (3x for gradients), and the reference
against torch with the bias materialised as attn_mask; with Lq != Lk, a bias shared by the
heads, key padding (a sequence whose rows see no key), a learned per-key bias with its
gradient, an element-wise mask (Triton), causal, windows, GQA and dropout; determinism;
the torch.library registration of the ops; which backend runs what.

Shapes are small: the Triton interpreter runs them on CPU.
"""

import pytest
import torch
import torch.nn.functional as F
from conftest import DEVICES, require
from numerics import assert_close_to_truth, truth_dtype
from op_check import at_thread_counts, outputs_and_grads

import lmkern
from lmkern.backend import Call
from lmkern.ops.attention import reference
from lmkern.ops.attention.backends import ATTENTION, native_limit, triton_limit

# id -> shape (B, H, H_kv, Lq, Lk, D), the bias's heads ("H" or "1") and keyword arguments;
# "padding" adds a boolean key-padding mask (B, 1, 1, Lk) whose last sequence is all padded,
# "key bias" a float one that requires grad, "element-wise" a boolean (B, 1, Lq, Lk) one.
CASES = {
    "lq_lt_lk": ((2, 3, 3, 33, 47, 16), "H", {}),
    "shared_by_heads_lq_gt_lk": ((2, 3, 3, 47, 33, 16), "1", {}),
    "causal": ((2, 2, 2, 40, 40, 16), "H", dict(is_causal=True)),
    "window": ((2, 2, 2, 50, 50, 16), "H", dict(window_size=(7, 4))),
    "gqa_dropout": ((2, 4, 2, 33, 40, 16), "H", dict(enable_gqa=True, dropout_p=0.2)),
    "key_padding": ((3, 2, 2, 33, 40, 16), "H", dict(fill="padding")),
    "key_bias": ((2, 2, 2, 33, 40, 16), "1", dict(fill="key bias", window_size=(9, 3))),
}
# Native's CPU kernels take no element-wise mask beside the bias (Triton materialises both).
TRITON_CASES = {**CASES, "elementwise_mask": ((2, 2, 2, 33, 40, 16), "H", dict(fill="element-wise"))}
DTYPES = (torch.float32, torch.float16)


def make_case(case, dtype=torch.float32, device="cpu"):
    """(q, k, v, relative_bias, keyword arguments) for a case, on `device`."""
    (batch, heads, kv_heads, seqlen_q, seqlen_k, dim), bias_heads, kwargs = TRITON_CASES[case]
    kwargs = dict(kwargs)
    generator = torch.Generator().manual_seed(7)
    q = torch.randn(batch, heads, seqlen_q, dim, generator=generator)
    k, v = (torch.randn(batch, kv_heads, seqlen_k, dim, generator=generator) for _ in range(2))
    bias = torch.randn(heads if bias_heads == "H" else 1, seqlen_q + seqlen_k - 1, generator=generator)
    fill = kwargs.pop("fill", None)
    if fill == "padding":
        keep = torch.rand(batch, 1, 1, seqlen_k, generator=generator) > 0.3
        keep[-1] = False
        kwargs["attn_mask"] = keep
    elif fill == "key bias":
        kwargs["attn_mask"] = torch.randn(batch, 1, 1, seqlen_k, generator=generator)
    elif fill == "element-wise":
        kwargs["attn_mask"] = torch.rand(batch, 1, seqlen_q, seqlen_k, generator=generator) > 0.3
    if "attn_mask" in kwargs:
        kwargs["attn_mask"] = kwargs["attn_mask"].to(device)
    return (*(x.to(device, dtype) for x in (q, k, v, bias)), kwargs)


def outputs_and_bias_grads(backend, q, k, v, bias, kwargs, dtype=None):
    """[out, dq, dk, dv, d relative_bias] (and d attn_mask for a float one) for a fixed
    random upstream gradient, in `dtype`."""
    kwargs = dict(kwargs)
    mask = kwargs.pop("attn_mask", None)
    if mask is not None and mask.is_floating_point():
        mask = mask.detach().requires_grad_()
    inputs = [*(x.detach().requires_grad_() for x in (q, k, v, bias)), mask]

    def attention(q, k, v, bias, mask):
        return lmkern.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, relative_bias=bias, backend=backend, **kwargs
        )

    results = outputs_and_grads(attention, inputs, dtype)
    return results if results[-1] is not None else results[:-1]


def assert_matches_reference(backend, case, dtype, device="cpu"):
    q, k, v, bias, kwargs = make_case(case, dtype, device)
    actual = outputs_and_bias_grads(backend, q, k, v, bias, kwargs)
    truth = outputs_and_bias_grads("torch", q, k, v, bias, kwargs, truth_dtype(dtype))
    baseline = outputs_and_bias_grads("torch", q, k, v, bias, kwargs)
    assert len(actual) == len(truth) == len(baseline)
    for name, a, t, b in zip(("out", "dq", "dk", "dv", "dbias", "dmask"), actual, truth, baseline):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, expected {b.dtype}"
        assert_close_to_truth(a, t, b, factor=2.0 if name == "out" else 3.0, name=name)
    if case == "key_padding":  # the last sequence sees no key: zeros, never NaN
        out, dq, dk, dv, dbias = actual
        assert not out[-1].any() and not dq[-1].any() and not dk[-1].any() and not dv[-1].any()
        assert dbias.isfinite().all()


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_native_matches_reference(dtype, case):
    require("native", "cpu", dtype, "attention")
    assert_matches_reference("native", case, dtype)


@pytest.mark.parametrize("case", TRITON_CASES)
@pytest.mark.parametrize("dtype", (*DTYPES, torch.bfloat16), ids=str)
@pytest.mark.parametrize("device", DEVICES)
def test_triton_matches_reference(device, dtype, case):
    """On a GPU too (the GPU check's second command), in bf16 there: T5 trains in it."""
    require("triton", device, dtype, "attention")
    assert_matches_reference("triton", case, dtype, device)


@pytest.mark.parametrize("case", ["shared_by_heads_lq_gt_lk", "key_padding"])
def test_reference_matches_torch_with_the_bias_materialised(case):
    """The oracle itself: relative_bias against torch's attention with the (1, H | 1, Lq, Lk)
    bias it stands for as attn_mask (T5's former path), gradients through autograd's gather."""
    q, k, v, bias, kwargs = make_case(case)
    padding = kwargs.pop("attn_mask", None)
    if padding is not None:  # without the sequence that sees no key, where torch gives NaN
        q, k, v, padding = q[:-1], k[:-1], v[:-1], padding[:-1]
    ours, theirs = (bias.clone().requires_grad_() for _ in range(2))
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=padding, relative_bias=ours, backend="torch")
    mask = reference.relative_bias_mask(theirs, q.shape[2], k.shape[2])
    if padding is not None:
        mask = mask.masked_fill(~padding, float("-inf"))
    expected = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
    torch.testing.assert_close(out, expected)
    out.square().sum().backward()
    expected.square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_gradients_are_deterministic(backend):
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, bias, kwargs = make_case("gqa_dropout")
    first = outputs_and_bias_grads(backend, q, k, v, bias, kwargs)
    second = outputs_and_bias_grads(backend, q, k, v, bias, kwargs)
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_native_gradient_does_not_depend_on_the_thread_count():
    """Each key block's diagonal sums have one task, and are added in a fixed order."""
    require("native", "cpu", torch.float32, "attention")
    q, k, v, bias, kwargs = make_case("key_padding")
    one, two = at_thread_counts(lambda: outputs_and_bias_grads("native", q, k, v, bias, kwargs)[-1])
    assert torch.equal(one, two)


@pytest.mark.parametrize("bias_heads", [1, 2])
def test_native_ops_pass_opcheck(bias_heads):
    require("native", "cpu", torch.float32, "attention")
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(2, 2, 17, 32, generator=generator)
    k, v = (torch.randn(2, 2, 29, 32, generator=generator) for _ in range(2))
    bias = torch.randn(bias_heads, 17 + 29 - 1, generator=generator)
    args = (True, 3, 0.25, 0.2, 1234, 8)  # causal aligned 3 keys right, a window, dropout
    # No key-padding mask here: opcheck copies its arguments, and a copied (B, H, Lq, Lk)
    # mask no longer shows (by its strides) that it depends on the key only.
    fwd_args = (q, k, v, None, *args, bias)
    torch.library.opcheck(torch.ops.lmkern.attention_fwd.default, fwd_args)
    out, lse = torch.ops.lmkern.attention_fwd(*fwd_args)
    saved = (torch.randn_like(out), q, k, v, out, lse)
    torch.library.opcheck(torch.ops.lmkern.attention_bwd.default, (*saved, None, *args, bias))
    bias_args = (*saved, None, bias, *args)
    torch.library.opcheck(torch.ops.lmkern.attention_relative_bias_bwd.default, bias_args)
    expected = reference.attention_bwd_with_bias_grads(*saved, None, *args, bias)[4]
    torch.testing.assert_close(torch.ops.lmkern.attention_relative_bias_bwd(*bias_args), expected)


def test_native_op_checks_the_bias():
    require("native", "cpu", torch.float32, "attention")
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(RuntimeError, match=r"relative_bias must have shape \(H \| 1, Lq \+ Lk - 1\)"):
        torch.ops.lmkern.attention_fwd(q, q, q, None, False, 0, 0.25, 0.0, 0, -1, torch.zeros(2, 16))
    with pytest.raises(RuntimeError, match="relative_bias takes a mask that depends on the key only"):
        torch.ops.lmkern.attention_fwd(q, q, q, torch.zeros(1, 2, 8, 8), False, 0, 0.25, 0.0, 0, -1, torch.zeros(2, 15))


def test_public_function_checks_the_bias():
    q = torch.randn(1, 2, 8, 16)
    with pytest.raises(ValueError, match=r"relative_bias must have shape \(H \| 1, Lq \+ Lk - 1\) = \(2 \| 1, 15\)"):
        lmkern.scaled_dot_product_attention(q, q, q, relative_bias=torch.zeros(2, 8, 8))
    with pytest.raises(TypeError, match="relative_bias must be float32 or query's dtype"):
        lmkern.scaled_dot_product_attention(q, q, q, relative_bias=torch.zeros(2, 15, dtype=torch.float64))


def relative_call(device_type, dtype, mask=None):
    return Call(device_type, dtype, head_dims=(64, 64), mask=mask, mask_grad=False, dropout_p=0.0, relative_bias=True,
                windowed=False, backward=True)


def test_which_backends_take_the_bias():
    """Native on CPU beside a key-only mask; Triton beside any; not native on CUDA (auto
    then picks Triton there)."""
    padding = torch.ones(2, 1, 1, 8, dtype=torch.bool).expand(2, 4, 8, 8)
    assert native_limit(relative_call("cpu", torch.float32, padding)) is None
    assert "key-padding" in native_limit(relative_call("cpu", torch.float32, torch.zeros(1, 4, 8, 8)))
    assert "no relative_bias" in native_limit(relative_call("cuda", torch.float16))
    assert triton_limit(relative_call("cuda", torch.float16)) is None
    assert triton_limit(relative_call("cuda", torch.float16, padding)) is None
    require("native", "cpu", torch.float32, "attention")
    assert ATTENTION.resolve(relative_call("cpu", torch.float32, padding)) == "native"


@pytest.mark.parametrize("case", ["key_padding", "key_bias"])
def test_triton_reads_the_bias_in_place_beside_a_key_mask(monkeypatch, case):
    """A mask that depends on the key only is read beside the bias: no (B, H, Lq, Lk) mask
    is built (only an element-wise mask is materialised with the bias)."""
    require("triton", "cpu", torch.float32, "attention")

    def refuse(*args):
        raise AssertionError("the relative bias was materialised")

    q, k, v, bias, kwargs = make_case(case)
    monkeypatch.setattr(reference, "relative_bias_mask", refuse)
    outputs_and_bias_grads("triton", q, k, v, bias, kwargs)
