"""The gradient of an additive attention mask (a learned bias, as T5's relative position
bias) in lmkern.scaled_dot_product_attention: the native CPU and Triton kernels against the
reference under the tolerance rule (3x for gradients), for biases broadcast over the batch,
the heads or both, with key padding as -inf, causal, windows, GQA, dropout and rows that see
no key; determinism; the torch.library registration of lmkern::attention_mask_bwd; and
which backend "auto" picks.

Shapes are small: the Triton interpreter runs them on CPU.
"""

from unittest import mock

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, assert_compiles_like_eager, require
from numerics import assert_close_to_truth, truth_dtype
from op_check import at_thread_counts, outputs_and_grads

import lmkern
from lmkern.backend import Call
from lmkern.ops.attention import reference
from lmkern.ops.attention.backends import ATTENTION, native_limit, triton_limit

KERNEL_BACKENDS = ("native", "triton")
DTYPES = (torch.float32, torch.float16)

# id -> shape (B, H, H_kv, Lq, Lk, D), the bias's shape as the caller holds it (names of
# dimensions, 1 where it broadcasts) and keyword arguments; "padding" puts -inf on padded
# keys, the last sequence all padded (its rows see no key), "empty_row" -inf on query row 3.
CASES = {
    "over_batch": ((2, 3, 3, 33, 47, 16), ("1", "H", "Lq", "Lk"), {}),
    "over_heads": ((2, 3, 3, 33, 47, 16), ("B", "1", "Lq", "Lk"), {}),
    "over_batch_and_heads_2d": ((2, 3, 3, 33, 47, 16), ("Lq", "Lk"), {}),
    "full": ((2, 2, 2, 33, 47, 16), ("B", "H", "Lq", "Lk"), {}),
    "per_key": ((2, 2, 2, 33, 47, 16), ("B", "1", "1", "Lk"), {}),
    "per_query": ((2, 2, 2, 33, 47, 16), ("1", "H", "Lq", "1"), {}),
    "key_padding_as_inf": ((3, 2, 2, 33, 40, 32), ("B", "1", "Lq", "Lk"), dict(fill="padding")),
    "empty_row": ((2, 2, 2, 33, 40, 16), ("1", "H", "Lq", "Lk"), dict(fill="empty_row")),
    "causal": ((2, 2, 2, 40, 40, 16), ("1", "H", "Lq", "Lk"), dict(window_size=(-1, 0))),
    "window": ((2, 2, 2, 50, 50, 16), ("1", "H", "Lq", "Lk"), dict(window_size=(7, 4))),
    "gqa_causal_window": ((2, 4, 2, 40, 40, 16), ("1", "H", "Lq", "Lk"),
                          dict(enable_gqa=True, window_size=(9, 0))),
    "dropout": ((2, 2, 2, 33, 47, 16), ("1", "H", "Lq", "Lk"), dict(dropout_p=0.2)),
}


def make_bias(dims, batch, heads, seqlen_q, seqlen_k, fill, generator):
    """A random bias of the named dimensions, -inf where `fill` says."""
    sizes = dict(B=batch, H=heads, Lq=seqlen_q, Lk=seqlen_k)
    shape = [sizes.get(dim, 1) for dim in dims]
    bias = torch.randn(shape, generator=generator)
    if fill == "padding":  # (B, 1, Lq, Lk): random keys padded, the last sequence all of them
        padded = torch.rand(batch, 1, 1, seqlen_k, generator=generator) < 0.3
        padded[-1] = True
        bias = bias.masked_fill(padded, float("-inf"))
    elif fill == "empty_row":
        bias[..., 3, :] = float("-inf")
    return bias


def make_case(case, dtype=torch.float32, device="cpu"):
    """(q, k, v, bias, keyword arguments) for a case."""
    (batch, heads, kv_heads, seqlen_q, seqlen_k, dim), dims, kwargs = CASES[case]
    kwargs = dict(kwargs)
    generator = torch.Generator().manual_seed(5)
    q = torch.randn(batch, heads, seqlen_q, dim, generator=generator)
    k = torch.randn(batch, kv_heads, seqlen_k, dim, generator=generator)
    v = torch.randn(batch, kv_heads, seqlen_k, dim, generator=generator)
    bias = make_bias(dims, batch, heads, seqlen_q, seqlen_k, kwargs.pop("fill", None), generator)
    return (*(x.to(device, dtype) for x in (q, k, v, bias)), kwargs)


def attention_outputs_and_grads(backend, q, k, v, bias, kwargs, dtype=None):
    """[out, dq, dk, dv, dbias] for a fixed random upstream gradient, inputs in `dtype`."""
    inputs = [x.detach().requires_grad_() for x in (q, k, v, bias)]

    def attention(q, k, v, bias):
        return lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend=backend, **kwargs)

    return outputs_and_grads(attention, inputs, dtype)


def assert_bias_matches_reference(backend, q, k, v, bias, kwargs):
    actual = attention_outputs_and_grads(backend, q, k, v, bias, kwargs)
    truth = attention_outputs_and_grads("torch", q, k, v, bias, kwargs, truth_dtype(q.dtype))
    baseline = attention_outputs_and_grads("torch", q, k, v, bias, kwargs)
    for name, a, t, b in zip(("out", "dq", "dk", "dv", "dbias"), actual, truth, baseline):
        assert a.dtype == b.dtype, f"{name}: dtype {a.dtype}, expected {b.dtype}"
        assert_close_to_truth(a, t, b, factor=2.0 if name == "out" else 3.0, name=name)
    return actual


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bias_gradient_matches_reference(backend, dtype, case):
    require(backend, "cpu", dtype, "attention")
    q, k, v, bias, kwargs = make_case(case, dtype)
    out, dq, dk, dv, dbias = assert_bias_matches_reference(backend, q, k, v, bias, kwargs)
    assert dbias.shape == bias.shape
    assert all(x.isfinite().all() for x in (out, dq, dk, dv, dbias))
    if case == "key_padding_as_inf":  # the last sequence sees no key, and padded keys get no gradient
        assert not out[-1].any() and not dq[-1].any() and not dbias[-1].any()
        assert not dbias[bias.isinf()].any()
    if case == "empty_row":
        assert not out[:, :, 3].any() and not dq[:, :, 3].any() and not dbias[..., 3, :].any()


def test_bias_with_float32_mask_and_half_inputs():
    """A float32 bias beside float16 queries: its gradient comes back in float32."""
    require("native", "cpu", torch.float16, "attention")
    q, k, v, bias, kwargs = make_case("over_batch", torch.float16)
    bias = bias.float().requires_grad_()
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="native")
    out.backward(torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half())
    expected = bias.detach().clone().requires_grad_()
    wide = [x.float() for x in (q, k, v)]
    F.scaled_dot_product_attention(*wide, attn_mask=expected).backward(
        torch.randn(out.shape, generator=torch.Generator().manual_seed(1)).half().float()
    )
    assert bias.grad.dtype == torch.float32
    torch.testing.assert_close(bias.grad, expected.grad, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("backend", BACKENDS)
def test_bias_gradient_matches_torch(backend):
    """Against torch's own attention, T5's layout: a (1, H, Lq, Lk) bias over the batch."""
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, bias, _ = make_case("over_batch")
    ours, theirs = (bias.clone().requires_grad_() for _ in range(2))
    lmkern.scaled_dot_product_attention(q, k, v, attn_mask=ours, backend=backend).square().sum().backward()
    F.scaled_dot_product_attention(q, k, v, attn_mask=theirs).square().sum().backward()
    torch.testing.assert_close(ours.grad, theirs.grad)


def test_bias_over_some_of_several_batch_dimensions():
    """(2, 3, H, L, D) queries and a (3, 1, Lq, Lk) bias: the batch dimensions merge (the
    bias is copied to (6, 1, Lq, Lk)) and autograd sums its gradient back."""
    require("native", "cpu", torch.float32, "attention")
    generator = torch.Generator().manual_seed(2)
    q, k, v = (torch.randn(2, 3, 2, 20, 16, generator=generator) for _ in range(3))
    bias = torch.randn(3, 1, 20, 20, generator=generator)
    assert_bias_matches_reference("native", q, k, v, bias, {})


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_bias_gradient_is_deterministic(backend):
    require(backend, "cpu", torch.float32, "attention")
    q, k, v, bias, kwargs = make_case("gqa_causal_window")
    first = attention_outputs_and_grads(backend, q, k, v, bias, dict(kwargs, dropout_p=0.1))
    second = attention_outputs_and_grads(backend, q, k, v, bias, dict(kwargs, dropout_p=0.1))
    assert all(torch.equal(a, b) for a, b in zip(first, second))


def test_native_bias_gradient_does_not_depend_on_the_thread_count():
    """Each element of dbias is summed by one task in a fixed order."""
    require("native", "cpu", torch.float32, "attention")
    q, k, v, bias, kwargs = make_case("over_batch")
    one, two = at_thread_counts(lambda: attention_outputs_and_grads("native", q, k, v, bias, kwargs)[-1])
    assert torch.equal(one, two)


def test_bias_double_backward_runs_through_the_reference():
    require("native", "cpu", torch.float32, "attention")
    q, k, v, bias, _ = make_case("over_batch")
    grads = []
    for backend in ("native", "torch"):
        leaf = bias.clone().requires_grad_()
        out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=leaf, backend=backend)
        (grad,) = torch.autograd.grad(out.square().sum(), leaf, create_graph=True)
        (second,) = torch.autograd.grad(grad.square().sum(), leaf)
        grads.append((grad.detach(), second))
    torch.testing.assert_close(grads[0], grads[1])


# id -> (B, H, H_kv, Lq, Lk) and the mask's shape as attention_mask_bwd takes it.
OPCHECK_CASES = {
    "over_batch": ((2, 2, 2, 17, 29), (1, 2, 17, 29)),
    "per_key": ((2, 2, 2, 17, 29), (2, 1, 1, 29)),
    "shared": ((2, 4, 2, 17, 29), (1, 1, 17, 29)),
    "per_query": ((2, 2, 2, 17, 29), (2, 2, 17, 1)),
}


@pytest.mark.parametrize("dropout_p", [0.0, 0.2])
@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_native_mask_op_passes_opcheck(case, dropout_p):
    require("native", "cpu", torch.float32, "attention")
    (batch, heads, kv_heads, seqlen_q, seqlen_k), mask_shape = OPCHECK_CASES[case]
    generator = torch.Generator().manual_seed(0)
    q = torch.randn(batch, heads, seqlen_q, 32, generator=generator)
    k, v = (torch.randn(batch, kv_heads, seqlen_k, 32, generator=generator) for _ in range(2))
    mask = torch.randn(mask_shape, generator=generator)
    args = (True, 3, 0.25, dropout_p, 1234, 8)  # causal aligned 3 keys right, a window of 8 keys left
    out, lse = torch.ops.lmkern.attention_fwd(q, k, v, mask.expand(batch, heads, seqlen_q, seqlen_k), *args)
    mask_args = (torch.randn_like(out), q, k, v, out, lse, mask, *args)
    torch.library.opcheck(torch.ops.lmkern.attention_mask_bwd.default, mask_args)
    dmask = torch.ops.lmkern.attention_mask_bwd(*mask_args)
    expected = reference.attention_bwd_with_bias_grads(*mask_args)[3]
    torch.testing.assert_close(dmask, expected, atol=1e-5, rtol=1e-4)


def test_native_mask_op_checks_its_mask():
    require("native", "cpu", torch.float32, "attention")
    q = torch.randn(2, 2, 8, 16)
    out, lse = torch.ops.lmkern.attention_fwd(q, q, q, None, False, 0, 0.25, 0.0, 0)
    mask_bwd = torch.ops.lmkern.attention_mask_bwd
    with pytest.raises(RuntimeError, match=r"mask must broadcast to \(B, H, Lq, Lk\)"):
        mask_bwd(out, q, q, q, out, lse, torch.zeros(2, 2, 8, 7), False, 0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="mask must be a 4-D float tensor"):
        mask_bwd(out, q, q, q, out, lse, torch.zeros(8, 8), False, 0, 0.25, 0.0, 0)
    with pytest.raises(RuntimeError, match="mask must be a 4-D float tensor"):
        mask_bwd(out, q, q, q, out, lse, torch.ones(2, 2, 8, 8, dtype=torch.bool), False, 0, 0.25, 0.0, 0)


def test_bias_gradient_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "attention")
    q, k, v, bias, kwargs = make_case("causal")

    def step(bias):
        return lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias, backend="native", **kwargs).square().sum()

    assert_compiles_like_eager(step, bias)


def bias_call(device_type, dtype, head_dim, mask):
    return Call(device_type, dtype, head_dims=(head_dim, head_dim), mask=mask, mask_grad=True, dropout_p=0.0,
                relative_bias=False, windowed=False, backward=True)


def test_which_backends_compute_the_bias_gradient():
    """Native on CPU and Triton anywhere; not native on CUDA, whose kernels take boolean
    key-padding masks only (auto then goes to Triton there)."""
    bias = torch.zeros(1, 4, 8, 8)
    assert native_limit(bias_call("cpu", torch.float32, 64, bias)) is None
    assert triton_limit(bias_call("cuda", torch.float16, 64, bias)) is None
    assert "no additive mask" in native_limit(bias_call("cuda", torch.float16, 64, bias))


def test_auto_picks_native_on_cpu_for_a_bias_that_requires_grad():
    require("native", "cpu", torch.float32, "attention")
    q, k, v, bias, _ = make_case("over_batch")
    assert ATTENTION.resolve(bias_call("cpu", torch.float32, q.shape[3], bias)) == "native"
    bias.requires_grad_()
    out = lmkern.scaled_dot_product_attention(q, k, v, attn_mask=bias)
    native = ATTENTION.implementation("native")
    with mock.patch.object(native, "attention_bwd_with_bias_grads", wraps=native.attention_bwd_with_bias_grads) as spy:
        out.sum().backward()
    assert spy.call_count == 1 and bias.grad.shape == bias.shape
