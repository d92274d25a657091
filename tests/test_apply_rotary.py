"""Rotary position embeddings (lmkern.apply_rotary, lmkern.rotary_cache): every backend
against the reference under the tolerance rule (output and x's gradient), both layouts,
partial rotary, odd head dims, strided inputs, each form of position_ids, in place, under
autocast; the reference against Hugging Face's apply_rotary_pos_emb (half-split) and a
GPT-J rotate_every_two (interleaved); the caches against transformers' rope init functions;
out-of-range positions; the torch.library registration; and bad input."""

import pytest
import torch
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from numerics import assert_close_to_truth
from op_check import assert_all_close_to_truth, assert_matches_reference, bad_call_test, outputs_and_grads

import lmkern
from lmkern.errors import ArgumentError
from lmkern.ops.apply_rotary import reference

NAMES = ["out", "grad_x", "grad_cos", "grad_sin", "grad_position_ids"]

# id -> ((B, H, L, D), rotary_dim): full and partial rotary, odd head dims, an odd number of pairs.
SHAPES = {
    "full_16": ((2, 3, 5, 16), 16),
    "partial_20_of_8": ((2, 2, 7, 20), 8),
    "odd_head_13": ((1, 3, 4, 13), 6),
    "odd_pairs_10": ((2, 1, 3, 10), 10),
}


def rotary_op(x, cos, sin, position_ids=None, *, interleaved=False, backend=None):
    return lmkern.apply_rotary(x, cos, sin, position_ids=position_ids, interleaved=interleaved, backend=backend)


def make(shape, rotary_dim, device, max_positions=32, dtype=torch.float32):
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    cos, sin = lmkern.rotary_cache(rotary_dim, max_positions, device=device)
    return x, cos, sin


@pytest.mark.parametrize("interleaved", [False, True], ids=["half_split", "interleaved"])
@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_apply_rotary_matches_reference(device, backend, dtype, shape, interleaved):
    require(backend, device, dtype, "apply_rotary")
    x, cos, sin = make(*SHAPES[shape], device)
    op = lambda x, cos, sin, backend: rotary_op(x, cos, sin, interleaved=interleaved, backend=backend)  # noqa: E731
    assert_matches_reference(op, (x.to(dtype), cos, sin), backend, NAMES[:4])


def position_forms(batch, seqlen, device):
    """id -> position_ids: int64 and int32 offsets, full positions, one row shared."""
    offsets = torch.tensor([3, 0, 9][:batch], device=device)
    full = torch.randint(0, 32, (batch, seqlen), generator=torch.Generator().manual_seed(2)).to(device)
    return {
        "offsets_int64": offsets,
        "offsets_int32": offsets.int(),
        "positions": full,
        "positions_int32": full.int(),
        "shared_row": full[:1],
    }


@pytest.mark.parametrize("form", ["offsets_int64", "offsets_int32", "positions", "positions_int32", "shared_row"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_position_ids(device, backend, form):
    require(backend, device, torch.float32, "apply_rotary")
    x, cos, sin = make((3, 2, 6, 12), 8, device)
    position_ids = position_forms(3, 6, device)[form]
    for interleaved in (False, True):
        op = lambda x, cos, sin, backend: rotary_op(x, cos, sin, position_ids, interleaved=interleaved,  # noqa: E731
                                                    backend=backend)
        assert_matches_reference(op, (x, cos, sin), backend, NAMES[:4])
    # The positions meant: token l of sequence b at position_ids[b] + l, or position_ids[b, l].
    if position_ids.dim() == 1:
        explicit = position_ids.long()[:, None] + torch.arange(6, device=device)
    else:
        explicit = position_ids.long().expand(3, 6)
    expected = torch.empty_like(x)
    for b in range(3):
        for l in range(6):
            one = rotary_op(x[b:b + 1, :, l:l + 1], cos[explicit[b, l]:], sin[explicit[b, l]:], backend="torch")
            expected[b, :, l] = one[0, :, 0]
    torch.testing.assert_close(rotary_op(x, cos, sin, position_ids, backend=backend), expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_strided_inputs(backend):
    require(backend, "cpu", torch.float32, "apply_rotary")
    qkv = torch.randn(2, 5, 3, 4, 16)  # (B, L, 3, H, D), as a fused qkv projection gives
    cos, sin = lmkern.rotary_cache(12, 16)
    q = qkv[:, :, 0].transpose(1, 2)  # (B, H, L, D), strided
    every_other = torch.randn(2, 4, 5, 32)[..., ::2]  # a last dimension with stride 2
    for view in (q, every_other, torch.randn(5, 4, 2, 16).permute(2, 1, 0, 3)):
        x = view.requires_grad_()
        for interleaved in (False, True):
            op = lambda x, cos, sin, backend: rotary_op(x, cos, sin, interleaved=interleaved,  # noqa: E731
                                                        backend=backend)
            assert_matches_reference(op, (x, cos, sin), backend, NAMES[:4])


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_inplace(backend, dtype):
    require(backend, "cpu", dtype, "apply_rotary")
    cos, sin = lmkern.rotary_cache(12, 16)
    offsets = torch.tensor([2, 4])
    for interleaved in (False, True):
        leaf = torch.randn(2, 3, 5, 16).to(dtype).requires_grad_()
        expected = rotary_op(leaf, cos, sin, offsets, interleaved=interleaved, backend=backend)
        expected.backward(torch.ones_like(expected))
        expected_grad, leaf.grad = leaf.grad, None
        x = leaf * 1  # a non-leaf: autograd can take it in place
        out = lmkern.apply_rotary(x, cos, sin, position_ids=offsets, interleaved=interleaved, inplace=True,
                                  backend=backend)
        assert out is x and out.data_ptr() == x.data_ptr()
        assert torch.equal(out, expected)
        out.backward(torch.ones_like(out))
        assert torch.equal(leaf.grad, expected_grad)
    # In place on q sliced from a packed qkv: only q's part of qkv changes.
    qkv = torch.randn(2, 5, 3, 4, 16).to(dtype)
    before = qkv.clone()
    q = qkv[:, :, 0].transpose(1, 2)
    expected = rotary_op(q, cos, sin, backend=backend)
    lmkern.apply_rotary(q, cos, sin, inplace=True, backend=backend)
    assert torch.equal(qkv[:, :, 0].transpose(1, 2), expected)
    assert torch.equal(qkv[:, :, 1:], before[:, :, 1:])


def hf_rotate(x, cos, sin, positions):
    """Hugging Face Llama's apply_rotary_pos_emb with caches in its (B, L, D) layout."""
    from transformers.models.llama.modeling_llama import apply_rotary_pos_emb

    cos_full, sin_full = torch.cat((cos, cos), dim=-1)[positions], torch.cat((sin, sin), dim=-1)[positions]
    q, _ = apply_rotary_pos_emb(x, x, cos_full, sin_full)
    return q


def gptj_rotate(x, cos, sin, positions):
    """GPT-J's rotate_every_two, with the rotary part first and the rest passed through."""
    rotary_dim = 2 * cos.shape[1]
    c = cos[positions].repeat_interleave(2, dim=-1)[:, None]
    s = sin[positions].repeat_interleave(2, dim=-1)[:, None]
    rot = x[..., :rotary_dim]
    every_two = torch.stack((-rot[..., 1::2], rot[..., ::2]), dim=-1).flatten(-2)
    return torch.cat((rot * c + every_two * s, x[..., rotary_dim:]), dim=-1)


@pytest.mark.parametrize("backend", BACKENDS)
def test_matches_hugging_face_and_gptj(backend):
    require(backend, "cpu", torch.float32, "apply_rotary")
    pytest.importorskip("transformers")
    x = torch.randn(2, 4, 6, 64, dtype=torch.float64)
    cos, sin = lmkern.rotary_cache(64, 128, dtype=torch.float64)
    positions = torch.tensor([[0, 1, 2, 3, 4, 5], [7, 20, 33, 64, 100, 127]])
    truth = hf_rotate(x, cos, sin, positions)
    torch.testing.assert_close(rotary_op(x, cos, sin, positions, backend="torch"), truth)
    theirs = hf_rotate(x.float(), cos.float(), sin.float(), positions)
    ours = rotary_op(x.float(), cos.float(), sin.float(), positions, backend=backend)
    assert_close_to_truth(ours, truth, theirs, name="half-split")
    x, (cos, sin) = torch.randn(2, 4, 6, 40, dtype=torch.float64), lmkern.rotary_cache(32, 128, dtype=torch.float64)
    truth = gptj_rotate(x, cos, sin, positions)
    torch.testing.assert_close(rotary_op(x, cos, sin, positions, interleaved=True, backend="torch"), truth)
    theirs = gptj_rotate(x.float(), cos.float(), sin.float(), positions)
    ours = rotary_op(x.float(), cos.float(), sin.float(), positions, interleaved=True, backend=backend)
    assert_close_to_truth(ours, truth, theirs, name="interleaved")


@pytest.mark.parametrize("backend", BACKENDS)
def test_backward_rotates_back(backend):
    """The gradient of sum(out * g) is g rotated back: rotating it forward gives g again."""
    require(backend, "cpu", torch.float32, "apply_rotary")
    x = torch.randn(2, 3, 4, 16, dtype=torch.float64, requires_grad=True)
    cos, sin = lmkern.rotary_cache(16, 8, dtype=torch.float64)
    g = torch.randn(2, 3, 4, 16, dtype=torch.float64)
    (grad,) = torch.autograd.grad(rotary_op(x, cos, sin, backend="torch"), x, g)
    torch.testing.assert_close(rotary_op(grad, cos, sin, backend="torch"), g)
    assert torch.autograd.gradcheck(lambda x: rotary_op(x, cos, sin, backend="torch"), (x,))
    assert torch.autograd.gradgradcheck(lambda x: rotary_op(x, cos, sin, backend="torch") ** 2, (x,))


@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives(backend):
    require(backend, "cpu", torch.float32, "apply_rotary")
    x = torch.randn(1, 2, 3, 8, requires_grad=True)
    cos, sin = lmkern.rotary_cache(8, 4)
    (grad,) = torch.autograd.grad(rotary_op(x, cos, sin, backend=backend).pow(2).sum(), x, create_graph=True)
    (second,) = torch.autograd.grad(grad.sum(), x)
    plain = x.detach().requires_grad_()  # the same through the reference's own autograd graph
    positions = torch.arange(3).expand(1, 3)
    out = reference.apply_rotary_fwd(plain, cos, sin, positions, False, False)
    (grad,) = torch.autograd.grad(out.pow(2).sum(), plain, create_graph=True)
    (expected,) = torch.autograd.grad(grad.sum(), plain)
    torch.testing.assert_close(second, expected)


@pytest.mark.parametrize("backend", BACKENDS)
def test_under_autocast_and_with_fp32_caches(backend):
    """Nothing is cast: fp16 x with fp32 caches (as under autocast) gives fp16, computed in fp32."""
    require(backend, "cpu", torch.float16, "apply_rotary")
    x = torch.randn(2, 3, 5, 16, requires_grad=True)
    cos, sin = lmkern.rotary_cache(16, 8)

    def op(backend):
        def run(x):
            with torch.autocast("cpu", dtype=torch.bfloat16):
                return lmkern.apply_rotary(x, cos, sin, backend=backend)

        return run

    actual = outputs_and_grads(op(backend), (x.half().requires_grad_(),))
    baseline = outputs_and_grads(op("torch"), (x.half().requires_grad_(),))
    truth = outputs_and_grads(lambda x: lmkern.apply_rotary(x, cos.double(), sin.double(), backend="torch"),
                              (x.double().requires_grad_(),))
    assert actual[0].dtype == torch.float16 and actual[1].dtype == torch.float16
    assert_all_close_to_truth(actual, truth, baseline, ["out", "grad_x"])
    assert op(backend)(x.detach()).dtype == torch.float32


@pytest.mark.parametrize("backend", BACKENDS)
def test_out_of_range_positions(backend):
    require(backend, "cpu", torch.float32, "apply_rotary")
    x = torch.randn(2, 2, 4, 8)
    cos, sin = lmkern.rotary_cache(8, 10)
    with pytest.raises(ArgumentError, match=r"position_ids \(offsets\) must put every token in \[0, 10\).*got "
                                            r"position 10 for sequence 1, token 3"):
        rotary_op(x, cos, sin, torch.tensor([0, 7]), backend=backend)
    with pytest.raises(ArgumentError, match=r"position_ids \(positions\).*got position -1 for sequence 0, token 2"):
        rotary_op(x, cos, sin, torch.tensor([[0, 1, -1, 2], [0, 1, 2, 3]]), backend=backend)
    with pytest.raises(ArgumentError, match=r"x has 4 tokens \(positions 0..3\), more than the 3 positions"):
        rotary_op(x, cos[:3], sin[:3], backend=backend)
    kept = x.clone()
    with pytest.raises(ArgumentError, match="position_ids"):
        lmkern.apply_rotary(x, cos, sin, position_ids=torch.tensor([9, 0]), inplace=True, backend=backend)
    assert torch.equal(x, kept)


def test_kernels_never_read_out_of_bounds():
    """Below the public checks (as on CUDA), an out-of-range position gives NaN in the
    reference and the Triton kernel; the C++ kernels refuse it before writing anything."""
    x = torch.randn(1, 2, 3, 8)
    cos, sin = lmkern.rotary_cache(4, 5)
    positions = torch.tensor([[0, 5, -1]])
    names = ["torch"]
    if not lmkern.backend.unavailable_reason("triton", "apply_rotary", "cpu"):
        names.append("triton")
    for name in names:
        impl = lmkern.backend.OPS["apply_rotary"].implementation(name)
        out = impl.apply_rotary_fwd(x, cos, sin, positions, False, False)
        assert torch.isnan(out[..., 1:, :4]).all() and torch.equal(out[..., 4:], x[..., 4:]), name
        assert torch.equal(out[..., 0, :], reference.apply_rotary_fwd(x, cos, sin, positions, False, False)[..., 0, :])
    require("native", "cpu", torch.float32, "apply_rotary")
    kept = x.clone()
    with pytest.raises(ValueError, match=r"apply_rotary: positions must lie in \[0, 5\).*got 5 for sequence 0, token 1"):
        torch.ops.lmkern.apply_rotary_(x, cos, sin, positions, False, False)
    assert torch.equal(x, kept)


@pytest.mark.parametrize("backend", BACKENDS)
def test_empty(backend):
    require(backend, "cpu", torch.float32, "apply_rotary")
    cos, sin = lmkern.rotary_cache(8, 4)
    for shape in ((0, 2, 3, 8), (2, 0, 3, 8), (2, 2, 0, 8)):
        x = torch.randn(shape, requires_grad=True)
        out = rotary_op(x, cos, sin, torch.zeros(shape[0], dtype=torch.long), backend=backend)
        out.sum().backward()
        assert out.shape == x.shape and x.grad.shape == x.shape


def test_float64_runs_on_torch_under_auto_and_is_refused_by_kernels():
    x = torch.randn(1, 2, 3, 8, dtype=torch.float64)
    cos, sin = lmkern.rotary_cache(8, 4, dtype=torch.float64)
    torch.testing.assert_close(lmkern.apply_rotary(x, cos, sin), rotary_op(x, cos, sin, backend="torch"))
    with pytest.raises(lmkern.BackendUnavailableError, match="float32, float16 or bfloat16"):
        lmkern.apply_rotary(x, cos, sin, backend="native")
    # float64 caches with float32 x: the kernels read them as float32.
    require("native", "cpu", torch.float32, "apply_rotary")
    torch.testing.assert_close(lmkern.apply_rotary(x.float(), cos, sin, backend="native"),
                               lmkern.apply_rotary(x, cos, sin).float())


def test_triton_refuses_wide_heads():
    require("triton", "cpu", torch.float32, "apply_rotary")
    x = torch.randn(1, 1, 1, 4098)
    cos, sin = lmkern.rotary_cache(8, 4)
    with pytest.raises(lmkern.BackendUnavailableError, match="heads of up to 4096 elements, got head_dim 4098"):
        lmkern.apply_rotary(x, cos, sin, backend="triton")


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device):
    require("native", device, torch.float32, "apply_rotary")
    x = torch.randn(2, 3, 4, 10, device=device)
    cos, sin = (t.to(device) for t in lmkern.rotary_cache(6, 8))
    positions = torch.randint(0, 8, (2, 4), device=device)
    for interleaved, conjugate in ((False, False), (True, True)):
        torch.library.opcheck(torch.ops.lmkern.apply_rotary.default, (x, cos, sin, positions, interleaved, conjugate))
        torch.library.opcheck(torch.ops.lmkern.apply_rotary_.default,
                              (x.clone(), cos.half(), sin.half(), positions, interleaved, conjugate))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "apply_rotary")
    cos, sin = lmkern.rotary_cache(16, 32)
    offsets = torch.tensor([3, 0])

    def step(x):
        q = lmkern.apply_rotary(x, cos, sin, position_ids=offsets)
        k = lmkern.apply_rotary(x * 2, cos, sin, interleaved=True)
        return (q * k).square().sum()

    assert_compiles_like_eager(step, torch.randn(2, 3, 5, 24))


def hf_config(rotary_dim, base, scaling, max_positions):
    """A Llama config whose rope init functions give the frequencies of these arguments
    (transformers 5: rope_parameters; 4: rope_theta and rope_scaling). Dynamic NTK reads
    the original context from max_position_embeddings."""
    from transformers import LlamaConfig

    if scaling is not None and scaling["rope_type"] == "dynamic":
        max_positions = scaling["original_max_position_embeddings"]
    config = LlamaConfig(hidden_size=rotary_dim * 2, num_attention_heads=2, max_position_embeddings=max_positions)
    if hasattr(config, "rope_parameters"):
        config.rope_parameters = {"rope_type": "default", "rope_theta": base, **(scaling or {})}
    else:
        config.rope_theta, config.rope_scaling = base, scaling
    return config


SCALINGS = {
    "default": None,
    "linear": {"rope_type": "linear", "factor": 4.0},
    "dynamic": {"rope_type": "dynamic", "factor": 2.0, "original_max_position_embeddings": 256},
    "llama3": {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
               "original_max_position_embeddings": 256},
}


@pytest.mark.parametrize("scaling", SCALINGS)
def test_rotary_cache_matches_hugging_face(scaling):
    rope_utils = pytest.importorskip("transformers.modeling_rope_utils")
    rotary_dim, base, max_positions = 64, 500000.0, 1024
    config = hf_config(rotary_dim, base, SCALINGS[scaling], max_positions)
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    kind = "default" if scaling == "default" else SCALINGS[scaling]["rope_type"]
    init = rope_utils.ROPE_INIT_FUNCTIONS.get(kind, LlamaRotaryEmbedding.compute_default_rope_parameters)
    kwargs = {"seq_len": max_positions} if scaling == "dynamic" else {}
    inv_freq, attention_factor = init(config, device="cpu", **kwargs)
    assert attention_factor == 1.0
    cos, sin = lmkern.rotary_cache(rotary_dim, max_positions, base=base, scaling=SCALINGS[scaling],
                                   dtype=torch.float64)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), inv_freq.double())
    torch.testing.assert_close(cos, angles.cos(), rtol=0, atol=1e-12)
    torch.testing.assert_close(sin, angles.sin(), rtol=0, atol=1e-12)
    if scaling != "dynamic":  # Llama's rotary module (dynamic grows its base with the sequence)
        positions = torch.arange(max_positions)[None]
        hf_cos, hf_sin = LlamaRotaryEmbedding(config)(torch.zeros(1, dtype=torch.float32), positions)
        torch.testing.assert_close(hf_cos[0, :, : rotary_dim // 2], cos.float(), rtol=0, atol=2e-3)
        torch.testing.assert_close(hf_sin[0, :, : rotary_dim // 2], sin.float(), rtol=0, atol=2e-3)


def test_rotary_cache_shapes_and_dtype():
    cos, sin = lmkern.rotary_cache(6, 5, dtype=torch.float16)
    assert cos.shape == sin.shape == (5, 3) and cos.dtype == torch.float16
    theta = 10000.0 ** (-torch.arange(0, 6, 2, dtype=torch.float64) / 6)
    torch.testing.assert_close(cos.double(), torch.cos(torch.arange(5.0, dtype=torch.float64)[:, None] * theta),
                               atol=1e-3, rtol=0)
    # Dynamic scaling does nothing within the original context.
    unscaled = lmkern.rotary_cache(8, 100)
    dynamic = lmkern.rotary_cache(8, 100, scaling={"type": "dynamic", "factor": 4, "original_max_position_embeddings": 100})
    assert torch.equal(unscaled[0], dynamic[0])


def _bad_calls():
    x = torch.randn(2, 3, 4, 16)
    cos, sin = lmkern.rotary_cache(8, 10)
    ar, cache = lmkern.apply_rotary, lmkern.rotary_cache
    return [
        (lambda: ar(x[0], cos, sin), ValueError, r"x must be 4-D, got shape \(3, 4, 16\)"),
        (lambda: ar(x.long(), cos, sin), TypeError, "x must be a floating-point tensor, got torch.int64"),
        (lambda: ar(x, cos[0], sin), ValueError, r"cos must be 2-D, got shape \(4,\)"),
        (lambda: ar(x, cos, sin[:5]), ValueError, r"cos and sin must have one shape and dtype, got \(10, 4\)"),
        (lambda: ar(x, cos, sin.half()), ValueError, "cos and sin must have one shape and dtype"),
        (lambda: ar(x[..., :6], cos, sin), ValueError, r"rotary_dim <= head_dim 6, got shape \(10, 4\) \(rotary_dim 8\)"),
        (lambda: ar(x, cos.requires_grad_(), sin), ValueError, "cos must not require grad"),
        (lambda: ar(x, cos, sin, position_ids=torch.zeros(3, dtype=torch.long)), ValueError,
         r"position_ids must be None, per-sequence offsets \(2,\) or positions \(2, 4\), got shape \(3,\)"),
        (lambda: ar(x, cos, sin, position_ids=torch.zeros(2)), TypeError,
         "position_ids must be None or an int32 or int64 tensor, got torch.float32"),
        (lambda: ar(x, cos, sin, position_ids=[0, 1]), TypeError, "position_ids must be None or .* got list"),
        (lambda: ar(x.requires_grad_(), cos, sin, inplace=True), ValueError,
         "x must not be a leaf that requires grad when inplace=True"),
        (lambda: ar(x[:1].expand(2, 3, 4, 16), cos, sin, inplace=True), ValueError,
         r"x must not overlap itself when inplace=True \(an expanded tensor\), got strides \(0, 64, 16, 1\)"),
        (lambda: cache(7, 10), ValueError, "rotary_dim must be an even int >= 2, got 7"),
        (lambda: cache(8, 0), ValueError, "max_positions must be an int >= 1, got 0"),
        (lambda: cache(8, 10, base=0), ValueError, "base must be > 0, got 0"),
        (lambda: cache(8, 10, scaling={"rope_type": "yarn", "factor": 2}), ValueError,
         "scaling must have rope_type .* got 'yarn'"),
        (lambda: cache(8, 10, scaling={"rope_type": "dynamic", "factor": 2}), ValueError,
         r"needs factor, original_max_position_embeddings, missing \['original_max_position_embeddings'\]"),
        (lambda: cache(8, 10, scaling={"rope_type": "linear", "factor": 0}), ValueError,
         "scaling's factor must be > 0, got 0"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "apply_rotary")
    x = torch.randn(2, 3, 4, 16)
    cos, sin = lmkern.rotary_cache(8, 10)
    positions = torch.zeros(2, 4, dtype=torch.long)
    with pytest.raises(RuntimeError, match=r"apply_rotary: positions must be an int64 tensor of shape \(2, 4\)"):
        torch.ops.lmkern.apply_rotary(x, cos, sin, positions.int(), False, False)
    with pytest.raises(RuntimeError, match="apply_rotary: cos and sin must be contiguous"):
        torch.ops.lmkern.apply_rotary(x, cos.t(), sin.t(), positions, False, False)
    with pytest.raises(RuntimeError, match=r"apply_rotary: the rotary dim 2 \* 4 must lie in \[2, head dim 6\]"):
        torch.ops.lmkern.apply_rotary(x[..., :6], cos, sin, positions, False, False)
    with pytest.raises(RuntimeError, match="apply_rotary_: x must not overlap itself"):
        torch.ops.lmkern.apply_rotary_(x[:1].expand(2, 3, 4, 16), cos, sin, positions, False, False)
