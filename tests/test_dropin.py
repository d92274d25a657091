"""Drop-in fidelity: the same calls through torch (torch.nn.functional, torch.nn) and through
lmkern (lmkern.functional, lmkern.nn), over grids of arguments torch accepts — layouts and
leading shapes, masks (boolean, additive, torch's causal bias objects), dtypes, reductions,
class weights, label smoothing, ignore_index, uint8 targets, zero sizes, strided inputs —
on every backend that runs here: values and gradients equal under the tolerance rule
(truth: torch in fp64, or fp32 for half inputs; baseline: torch in the input dtype), with
torch's dtypes and shapes; and where torch raises, an exception of torch's class. Then
zero-size calls of the ops torch has no twin for, and second derivatives: torch's where
lmkern differentiates its gradients, an error naming the op where it does not."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, require
from numerics import truth_dtype
from op_check import assert_all_close_to_truth, outputs_and_grads
from torch.nn.attention import SDPBackend, sdpa_kernel
from torch.nn.attention import bias as attention_bias

import lmkern
import lmkern.functional as LF

HALF = torch.float16  # the half precision the Triton interpreter computes right (bf16 runs on GPU)


def make_randn(seed=0):
    """randn(*shape, dtype): values drawn in fp64 from one generator, then cast, so that every
    dtype of a case sees the same numbers."""
    generator = torch.Generator().manual_seed(seed)

    def randn(*shape, dtype=torch.float32):
        return torch.randn(shape, generator=generator, dtype=torch.float64).to(dtype)

    return randn


def grad_leaf(tensor):
    return tensor.detach().requires_grad_()


def assert_matches_torch(ours, theirs, make_inputs, dtype, names, grad_factor=2.0):
    """ours(*inputs) against theirs(*inputs), outputs and input gradients, under the
    tolerance rule; make_inputs(dtype) gives the inputs in a dtype (the same values)."""
    actual = outputs_and_grads(ours, make_inputs(dtype))
    truth = outputs_and_grads(theirs, make_inputs(truth_dtype(dtype)))
    baseline = outputs_and_grads(theirs, make_inputs(dtype))
    outputs = len(actual) - len(names)
    assert_all_close_to_truth(actual[:outputs], truth[:outputs], baseline[:outputs], ["output"] * outputs)
    assert_all_close_to_truth(actual[outputs:], truth[outputs:], baseline[outputs:], names, grad_factor)


# -- scaled_dot_product_attention --------------------------------------------------------------

# id -> (query shape, key shape, value shape, keyword arguments). "mask" names a mask made
# by attention_mask, "strided" makes q, k, v (B, L, H, D) tensors viewed as (B, H, L, D).
ATTENTION_CASES = {
    "4d": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {}),
    "4d_strided": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"strided": True}),
    "3d": ((3, 5, 8), (3, 7, 8), (3, 7, 8), {}),
    "2d": ((5, 8), (7, 8), (7, 8), {}),
    "5d_broadcast": ((2, 2, 3, 5, 8), (2, 1, 3, 7, 8), (1, 2, 3, 7, 8), {}),
    "mixed_rank": ((2, 3, 5, 8), (3, 7, 8), (3, 7, 8), {}),
    "broadcast_heads": ((2, 4, 5, 8), (2, 1, 7, 8), (2, 1, 7, 8), {}),
    "gqa": ((2, 4, 5, 8), (2, 2, 7, 8), (2, 2, 7, 8), {"enable_gqa": True}),
    "value_dim": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 4), {}),
    "scale": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"scale": 0.3}),
    "is_causal": ((2, 3, 6, 8), (2, 3, 6, 8), (2, 3, 6, 8), {"is_causal": True}),
    "is_causal_fewer_queries": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"is_causal": True}),
    "key_padding_mask": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"mask": "key_padding"}),
    "bool_mask": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"mask": "bool"}),
    "additive_mask": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"mask": "additive"}),
    "5d_bool_mask": ((2, 2, 3, 5, 8), (2, 2, 3, 7, 8), (2, 2, 3, 7, 8), {"mask": "bool"}),
    "causal_upper_left": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"mask": "causal_upper_left"}),
    "causal_lower_right": ((2, 3, 5, 8), (2, 3, 7, 8), (2, 3, 7, 8), {"mask": "causal_lower_right"}),
    "causal_lower_right_gqa": ((2, 4, 5, 8), (2, 2, 9, 8), (2, 2, 9, 8),
                               {"mask": "causal_lower_right", "enable_gqa": True}),
    "empty_queries": ((2, 3, 0, 8), (2, 3, 7, 8), (2, 3, 7, 8), {}),
    "empty_keys": ((2, 3, 5, 8), (2, 3, 0, 8), (2, 3, 0, 8), {}),
    "empty_batch": ((0, 3, 5, 8), (0, 3, 7, 8), (0, 3, 7, 8), {}),
}


def attention_mask(kind, q_shape, k_shape, dtype, randn):
    """A mask every query row sees a key through (torch's own backends disagree on rows
    that see none; lmkern gives zeros there, tested in test_attention.py)."""
    seqlen_q, seqlen_k = q_shape[-2], k_shape[-2]
    if kind.startswith("causal_"):
        return getattr(attention_bias, kind)(seqlen_q, seqlen_k)
    if kind == "key_padding":
        keep = randn(q_shape[0], 1, 1, seqlen_k) > -0.5
        keep[..., 0] = True
        return keep
    if kind == "bool":
        keep = randn(seqlen_q, seqlen_k) > 0
        keep[:, 0] = True
        return keep
    return randn(1, q_shape[-3], seqlen_q, seqlen_k, dtype=dtype)  # additive


def attention_inputs(case, dtype):
    """([query, key, value] as gradient leaves, keyword arguments) of a case in dtype."""
    q_shape, k_shape, v_shape, options = ATTENTION_CASES[case]
    randn = make_randn()
    options = dict(options)
    strided = options.pop("strided", False)
    tensors = []
    for shape in (q_shape, k_shape, v_shape):
        tensor = randn(*shape, dtype=dtype)
        if strided:  # (B, L, H, D) memory seen as (B, H, L, D)
            tensor = randn(shape[0], shape[2], shape[1], shape[3], dtype=dtype).transpose(1, 2)
        tensors.append(grad_leaf(tensor))
    if "mask" in options:
        options["attn_mask"] = attention_mask(options.pop("mask"), q_shape, k_shape, dtype, randn)
    return tensors, options


@pytest.mark.parametrize("case", ATTENTION_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, HALF), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_scaled_dot_product_attention_matches_torch(backend, dtype, case):
    require(backend, "cpu", dtype, "attention")
    _, kwargs = attention_inputs(case, dtype)

    def make_inputs(dtype):
        return attention_inputs(case, dtype)[0]

    def keywords(q):  # an additive mask in the inputs' dtype, as torch takes it
        mask = kwargs.get("attn_mask")
        if isinstance(mask, torch.Tensor) and type(mask) is torch.Tensor and mask.is_floating_point():
            return dict(kwargs, attn_mask=mask.to(q.dtype))
        return kwargs

    assert_matches_torch(
        lambda q, k, v: LF.scaled_dot_product_attention(q, k, v, **keywords(q), backend=backend),
        lambda q, k, v: F.scaled_dot_product_attention(q, k, v, **keywords(q)),
        make_inputs, dtype, ["dq", "dk", "dv"], grad_factor=3.0,
    )


# -- cross_entropy ---------------------------------------------------------------------------

CLASSES = 11
# id -> (input shape, options): "target" uint8 or probabilities, "weight", "ignore" (a
# share of targets set to ignore_index), "strided" (classes not contiguous), and
# keyword arguments passed as they are.
CROSS_ENTROPY_CASES = {
    "1d": ((CLASSES,), {}),
    "2d": ((6, CLASSES), {}),
    "3d": ((3, CLASSES, 4), {}),
    "4d": ((2, CLASSES, 3, 2), {}),
    "2d_strided": ((6, CLASSES), {"strided": True}),
    "uint8_targets": ((6, CLASSES), {"target": "uint8"}),
    "weights": ((6, CLASSES), {"weight": True}),
    "label_smoothing": ((6, CLASSES), {"label_smoothing": 0.1}),
    "weights_smoothing_ignored": ((3, CLASSES, 4), {"weight": True, "label_smoothing": 0.2, "ignore": 0.3}),
    "ignored": ((8, CLASSES), {"ignore": 0.3}),
    "custom_ignore_index": ((8, CLASSES), {"ignore": 0.3, "ignore_index": 2}),
    "all_ignored": ((4, CLASSES), {"ignore": 1.0}),
    "empty": ((0, CLASSES), {}),
    "probabilities": ((6, CLASSES), {"target": "probabilities", "label_smoothing": 0.1}),
}


def cross_entropy_inputs(case, dtype):
    """([logits as a gradient leaf], target, keyword arguments) of a case in dtype."""
    shape, options = CROSS_ENTROPY_CASES[case]
    options = dict(options)
    randn = make_randn(1)
    logits = randn(*shape, dtype=dtype)
    if options.pop("strided", False):
        logits = randn(*reversed(shape), dtype=dtype).T
    target_shape = shape[:1] + shape[2:] if len(shape) > 1 else ()
    kind = options.pop("target", "int64")
    if kind == "probabilities":
        target = randn(*shape, dtype=dtype).softmax(1 if len(shape) > 1 else 0)
    else:
        target = (randn(*target_shape).abs() * 10).long() % CLASSES
        share = options.pop("ignore", 0.0)
        ignored = make_randn(2)(*target_shape).abs() < share * 3  # |N(0, 1)| < 3 almost always
        target = target.masked_fill(ignored if share < 1 else torch.ones_like(ignored), options.get("ignore_index", -100))
        target = target.to(torch.uint8 if kind == "uint8" else torch.int64)
    if options.pop("weight", False):
        options["weight"] = randn(CLASSES, dtype=dtype).abs() + 0.5
    return [grad_leaf(logits)], target, options


@pytest.mark.parametrize("case", CROSS_ENTROPY_CASES)
@pytest.mark.parametrize("reduction", ("mean", "sum", "none"))
@pytest.mark.parametrize("dtype", (torch.float32, HALF), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_matches_torch(backend, dtype, reduction, case):
    require(backend, "cpu", dtype, "cross_entropy")
    if case == "probabilities" and backend != "torch":
        pytest.skip("class-probability targets run on torch's own cross_entropy (backend torch or auto)")
    _, target, kwargs = cross_entropy_inputs(case, dtype)

    def keywords(logits):
        cast = {name: value.to(logits.dtype) for name, value in kwargs.items() if isinstance(value, torch.Tensor)}
        return dict(kwargs, reduction=reduction, **cast)

    def target_for(logits):
        return target.to(logits.dtype) if target.is_floating_point() else target

    assert_matches_torch(
        lambda x: LF.cross_entropy(x, target_for(x), **keywords(x), backend=backend),
        lambda x: F.cross_entropy(x, target_for(x), **keywords(x)),
        lambda dtype: cross_entropy_inputs(case, dtype)[0], dtype, ["d input"],
    )


@pytest.mark.parametrize("backend", BACKENDS)
def test_cross_entropy_loss_module_matches_torch(backend):
    require(backend, "cpu", torch.float32, "cross_entropy")
    (logits,), target, kwargs = cross_entropy_inputs("weights_smoothing_ignored", torch.float64)
    arguments = dict(weight=kwargs["weight"], ignore_index=-100, reduction="sum", label_smoothing=0.2)
    ours = lmkern.nn.CrossEntropyLoss(**arguments, backend=backend).float()
    theirs = torch.nn.CrossEntropyLoss(**arguments)
    assert ours.state_dict().keys() == theirs.state_dict().keys()

    def make_inputs(dtype):
        return [grad_leaf(logits.to(dtype))]

    assert_matches_torch(
        lambda x: ours(x, target), lambda x: theirs.to(x.dtype)(x, target), make_inputs, torch.float32, ["d input"]
    )


# -- layer_norm --------------------------------------------------------------------------------

# id -> (input shape, normalized_shape, options): "affine" "both", "weight" or "none";
# "fp32_params": weight and bias stay fp32 for half input (torch's mixed precision);
# "strided": the input a transposed view; eps passed as it is.
LAYER_NORM_CASES = {
    "2d": ((6, 10), (10,), {}),
    "3d": ((2, 3, 10), (10,), {}),
    "1d": ((10,), (10,), {}),
    "two_normalized_dims": ((3, 4, 5), (4, 5), {}),
    "no_affine": ((6, 10), (10,), {"affine": "none"}),
    "weight_only": ((6, 10), (10,), {"affine": "weight"}),
    "strided": ((6, 10), (10,), {"strided": True}),
    "eps": ((6, 10), (10,), {"eps": 1e-2}),
    "fp32_params": ((6, 10), (10,), {"fp32_params": True}),
    "empty_rows": ((0, 10), (10,), {}),
    "empty_width": ((3, 0), (0,), {}),
}


def layer_norm_inputs(case, dtype):
    """([input, weight, bias] (None where absent), normalized_shape, eps) of a case in dtype."""
    shape, normalized_shape, options = LAYER_NORM_CASES[case]
    randn = make_randn(3)
    x = randn(*shape, dtype=dtype)
    if options.get("strided"):
        x = randn(*reversed(shape), dtype=dtype).T
    param_dtype = torch.float32 if options.get("fp32_params") and dtype != torch.float64 else dtype
    affine = options.get("affine", "both")
    weight = 1 + 0.3 * randn(*normalized_shape, dtype=param_dtype) if affine != "none" else None
    bias = randn(*normalized_shape, dtype=param_dtype) if affine == "both" else None
    leaves = [grad_leaf(x), *(None if p is None else grad_leaf(p) for p in (weight, bias))]
    return leaves, normalized_shape, options.get("eps", 1e-5)


@pytest.mark.parametrize("case", LAYER_NORM_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, HALF), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_matches_torch(backend, dtype, case):
    require(backend, "cpu", dtype, "layer_norm")
    _, normalized_shape, eps = layer_norm_inputs(case, dtype)
    assert_matches_torch(
        lambda x, w, b: LF.layer_norm(x, normalized_shape, w, b, eps, backend=backend),
        lambda x, w, b: F.layer_norm(x, normalized_shape, w, b, eps),
        lambda dtype: layer_norm_inputs(case, dtype)[0], dtype, ["d input", "d weight", "d bias"],
    )


@pytest.mark.parametrize("affine, bias", [(True, True), (True, False), (False, False)])
@pytest.mark.parametrize("backend", BACKENDS)
def test_layer_norm_module_matches_torch(backend, affine, bias):
    require(backend, "cpu", torch.float32, "layer_norm")
    theirs = torch.nn.LayerNorm((4, 5), eps=1e-4, elementwise_affine=affine, bias=bias)
    ours = lmkern.nn.LayerNorm((4, 5), eps=1e-4, elementwise_affine=affine, bias=bias, backend=backend)
    assert_norm_module_matches_torch(ours, theirs)


def assert_norm_module_matches_torch(ours, theirs):
    """A norm module over (4, 5) against torch's, with theirs' parameters perturbed and
    loaded into ours: the same forward and input gradient, and repr."""
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.add_(0.1 * make_randn(4)(*parameter.shape))
    ours.load_state_dict(theirs.state_dict())
    x = make_randn(5)(3, 4, 5)
    assert_matches_torch(
        lambda x: ours.to(x.dtype)(x), lambda x: theirs.to(x.dtype)(x), lambda dtype: [grad_leaf(x.to(dtype))],
        torch.float32, ["d input"],
    )
    assert repr(ours).startswith(repr(theirs)[:-1])


# -- rms_norm ----------------------------------------------------------------------------------

# LayerNorm's cases without a bias ("no_affine": no weight); eps None (torch's default)
# unless the case gives one.
RMS_NORM_CASES = [case for case in LAYER_NORM_CASES if case != "weight_only"]


def rms_norm_inputs(case, dtype):
    """([input, weight] (None where absent), normalized_shape, eps) of a case in dtype."""
    (x, weight, _), normalized_shape, _ = layer_norm_inputs(case, dtype)
    return [x, weight], normalized_shape, LAYER_NORM_CASES[case][2].get("eps")


@pytest.mark.parametrize("case", RMS_NORM_CASES)
@pytest.mark.parametrize("dtype", (torch.float32, HALF), ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_matches_torch(backend, dtype, case):
    require(backend, "cpu", dtype, "rms_norm")
    _, normalized_shape, eps = rms_norm_inputs(case, dtype)
    assert_matches_torch(
        lambda x, w: LF.rms_norm(x, normalized_shape, w, eps, backend=backend),
        lambda x, w: F.rms_norm(x, normalized_shape, w, eps),
        lambda dtype: rms_norm_inputs(case, dtype)[0], dtype, ["d input", "d weight"],
    )


@pytest.mark.parametrize("affine", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_rms_norm_module_matches_torch(backend, affine):
    require(backend, "cpu", torch.float32, "rms_norm")
    theirs = torch.nn.RMSNorm((4, 5), elementwise_affine=affine)
    ours = lmkern.nn.RMSNorm((4, 5), elementwise_affine=affine, backend=backend)
    assert_norm_module_matches_torch(ours, theirs)


# -- errors: where torch raises, lmkern raises an exception of torch's class ---------------------


def _bad_calls():
    """id -> call(f), f being torch.nn.functional or lmkern.functional."""
    q, k, k_heads = torch.randn(1, 4, 5, 8), torch.randn(1, 4, 7, 8), torch.randn(1, 2, 7, 8)
    x, t = torch.randn(4, CLASSES), torch.tensor([1, 2, 3, 4])
    rows = torch.randn(3, 10)
    return {
        "attention_query_1d": lambda f: f.scaled_dot_product_attention(q[0, 0, 0], k, k),
        "attention_integer_inputs": lambda f: f.scaled_dot_product_attention(q.long(), k.long(), k.long()),
        "attention_dtype_mismatch": lambda f: f.scaled_dot_product_attention(q, k.double(), k),
        "attention_head_dim_mismatch": lambda f: f.scaled_dot_product_attention(q, k[..., :6], k),
        "attention_heads_without_gqa": lambda f: f.scaled_dot_product_attention(q, k_heads, k_heads),
        "attention_gqa_heads_not_dividing": lambda f: f.scaled_dot_product_attention(
            q, k[:, :3], k[:, :3], enable_gqa=True),
        "attention_integer_mask": lambda f: f.scaled_dot_product_attention(
            q, k, k, attn_mask=torch.ones(5, 7, dtype=torch.int64)),
        "attention_float64_mask": lambda f: f.scaled_dot_product_attention(
            q, k, k, attn_mask=torch.zeros(5, 7, dtype=torch.float64)),
        "attention_mask_shape": lambda f: f.scaled_dot_product_attention(
            q, k, k, attn_mask=torch.ones(5, 5, dtype=torch.bool)),
        "attention_causal_bias_with_is_causal": lambda f: f.scaled_dot_product_attention(
            q, k, k, attn_mask=attention_bias.causal_lower_right(5, 7), is_causal=True),
        "attention_dropout_p": lambda f: f.scaled_dot_product_attention(q, k, k, dropout_p=1.5),
        "cross_entropy_target_out_of_range": lambda f: f.cross_entropy(x, torch.tensor([1, 2, 3, CLASSES])),
        "cross_entropy_negative_target": lambda f: f.cross_entropy(x, torch.tensor([1, -5, 3, 4])),
        "cross_entropy_uint8_target_out_of_range": lambda f: f.cross_entropy(x, torch.tensor([1, 200, 3, 4]).byte()),
        "cross_entropy_target_shape": lambda f: f.cross_entropy(x, t[:3]),
        "cross_entropy_target_list": lambda f: f.cross_entropy(x, [1, 2, 3, 4]),
        "cross_entropy_target_int16": lambda f: f.cross_entropy(x, t.short()),
        "cross_entropy_integer_input": lambda f: f.cross_entropy(x.long(), t),
        "cross_entropy_reduction": lambda f: f.cross_entropy(x, t, reduction="avg"),
        "cross_entropy_label_smoothing": lambda f: f.cross_entropy(x, t, label_smoothing=1.5),
        "cross_entropy_weight_size": lambda f: f.cross_entropy(x, t, weight=torch.ones(3)),
        "cross_entropy_ignore_index_float": lambda f: f.cross_entropy(x, t, ignore_index=1.5),
        "layer_norm_shape": lambda f: f.layer_norm(rows, (9,)),
        "layer_norm_weight_shape": lambda f: f.layer_norm(rows, (10,), torch.ones(9)),
        "layer_norm_integer_input": lambda f: f.layer_norm(rows.long(), (10,)),
        "rms_norm_shape": lambda f: f.rms_norm(rows, (9,)),
        "rms_norm_weight_shape": lambda f: f.rms_norm(rows, (10,), torch.ones(9)),
        "rms_norm_integer_input": lambda f: f.rms_norm(rows.long(), (10,)),
    }


@pytest.mark.parametrize("case", _bad_calls())
@pytest.mark.parametrize("backend", BACKENDS)
def test_lmkern_raises_what_torch_raises(backend, case):
    op = next(op for op in ("attention", "cross_entropy", "layer_norm", "rms_norm") if case.startswith(op))
    require(backend, "cpu", torch.float32, op)
    call = _bad_calls()[case]
    with pytest.raises(Exception) as raised_by_torch:
        call(F)
    expected = type(raised_by_torch.value)
    with lmkern.use_backend(backend), pytest.raises(expected) as raised:
        call(LF)
    assert type(raised.value).__module__ == "lmkern.errors", f"not lmkern's own check: {raised.value!r}"


# -- zero sizes of the ops torch has no twin for: as the torch ops they stand for ------------------


def _zero_size_cases():
    """id -> (lmkern call(inputs, backend), the same in torch ops(inputs), op, input shapes)."""
    eps = 1e-5

    def ffn_torch(x, w1, b1, w2, b2):
        return x + F.linear(F.gelu(F.linear(F.layer_norm(x, x.shape[-1:], eps=eps), w1, b1)), w2, b2)

    return {
        "add_layer_norm_rows": (
            lambda x, r, w, b, backend: lmkern.add_layer_norm(x, r, w, b, eps, backend=backend),
            lambda x, r, w, b: (F.layer_norm(x + r, x.shape[-1:], w, b, eps), x + r),
            "layer_norm", [(2, 0, 8), (2, 0, 8), (8,), (8,)],
        ),
        "add_rms_norm_rows": (
            lambda x, r, w, backend: lmkern.add_rms_norm(x, r, w, eps, backend=backend),
            lambda x, r, w: (F.rms_norm(x + r, x.shape[-1:], w, eps), x + r),
            "add_rms_norm", [(2, 0, 8), (2, 0, 8), (8,)],
        ),
        "linear_gelu_rows": (
            lambda x, w, b, backend: lmkern.linear_gelu(x, w, b, backend=backend),
            lambda x, w, b: F.gelu(F.linear(x, w, b)), "linear_gelu", [(0, 8), (5, 8), (5,)],
        ),
        "linear_gelu_in_features": (  # gelu(bias) on every row
            lambda x, w, b, backend: lmkern.linear_gelu(x, w, b, backend=backend),
            lambda x, w, b: F.gelu(F.linear(x, w, b)), "linear_gelu", [(3, 0), (5, 0), (5,)],
        ),
        "ffn_rows": (
            lambda x, w1, b1, w2, b2, backend: lmkern.ffn(x, None, None, w1, b1, w2, b2, backend=backend),
            ffn_torch, "linear_gelu", [(0, 8), (16, 8), (16,), (8, 16), (8,)],
        ),
        "linear_cross_entropy_rows": (
            lambda h, w, backend: lmkern.linear_cross_entropy(h, w, torch.zeros(0, dtype=torch.int64), backend=backend,
                                                              reduction="sum"),
            lambda h, w: F.cross_entropy(h @ w.T, torch.zeros(0, dtype=torch.int64), reduction="sum"),
            "cross_entropy", [(0, 8), (11, 8)],
        ),
    }


@pytest.mark.parametrize("case", _zero_size_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_zero_sizes_behave_as_the_torch_ops_they_stand_for(backend, case):
    ours, theirs, op, shapes = _zero_size_cases()[case]
    require(backend, "cpu", torch.float32, op)
    assert_matches_torch_on_random_inputs(lambda *inputs: ours(*inputs, backend), theirs, shapes)


def assert_matches_torch_on_random_inputs(ours, theirs, shapes, grad_factor=2.0):
    """assert_matches_torch in fp32 on random inputs of these shapes."""
    values = [make_randn(6)(*shape, dtype=torch.float64) for shape in shapes]
    names = [f"d input {index}" for index in range(len(shapes))]
    assert_matches_torch(ours, theirs, lambda dtype: [grad_leaf(value.to(dtype)) for value in values],
                         torch.float32, names, grad_factor)


@pytest.mark.parametrize("shape", [(0, 4, 1, 16), (2, 4, 0, 16)], ids=["no_sequences", "no_new_queries"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_attention_with_kv_cache_takes_zero_sizes(backend, shape):
    require(backend, "cpu", torch.float32, "attention_with_kv_cache")
    batch, heads, seqlen_q, dim = shape
    k_cache, v_cache = torch.randn(2, batch, 2, 10, dim)
    caches = (k_cache.clone(), v_cache.clone())
    new = torch.randn(2, batch, 2, seqlen_q, dim)
    with torch.no_grad():
        out = lmkern.attention_with_kv_cache(torch.randn(shape), k_cache, v_cache, torch.full((batch,), 3), *new,
                                             backend=backend)
    assert out.shape == shape and out.dtype == torch.float32
    assert torch.equal(k_cache, caches[0]) and torch.equal(v_cache, caches[1])  # nothing new to write


# -- second derivatives ----------------------------------------------------------------------------


def _penalty_cases():
    """id -> (op(inputs, backend), the same in torch ops, op, input shapes): functions whose
    gradient penalty (the squared norm of the gradient of a weighted sum of the output)
    needs second derivatives through the op."""
    mask = torch.tensor([[True] * 6 + [False]] * 5)

    def math_attention(*args, **kwargs):  # torch's CPU flash attention has no double backward
        with sdpa_kernel(SDPBackend.MATH):
            return F.scaled_dot_product_attention(*args, **kwargs)

    return {
        "scaled_dot_product_attention": (
            lambda q, k, v, backend: LF.scaled_dot_product_attention(q, k, v, attn_mask=mask, backend=backend),
            lambda q, k, v: math_attention(q, k, v, attn_mask=mask),
            "attention", [(1, 2, 5, 8), (1, 2, 7, 8), (1, 2, 7, 8)],
        ),
        "scaled_dot_product_attention_causal": (
            lambda q, k, v, backend: LF.scaled_dot_product_attention(q, k, v, is_causal=True, backend=backend),
            lambda q, k, v: math_attention(q, k, v, is_causal=True),
            "attention", [(1, 2, 6, 8), (1, 2, 6, 8), (1, 2, 6, 8)],
        ),
        "layer_norm": (
            lambda x, w, b, backend: LF.layer_norm(x, (10,), w, b, backend=backend),
            lambda x, w, b: F.layer_norm(x, (10,), w, b), "layer_norm", [(4, 10), (10,), (10,)],
        ),
        "add_layer_norm_without_residual": (
            lambda x, w, b, backend: lmkern.add_layer_norm(x, None, w, b, backend=backend),
            lambda x, w, b: (F.layer_norm(x, (10,), w, b), x), "layer_norm", [(4, 10), (10,), (10,)],
        ),
        "rms_norm": (
            lambda x, w, backend: LF.rms_norm(x, (10,), w, backend=backend),
            lambda x, w: F.rms_norm(x, (10,), w), "rms_norm", [(4, 10), (10,)],
        ),
        "linear_gelu": (
            lambda x, w, b, backend: lmkern.linear_gelu(x, w, b, "tanh", backend=backend),
            lambda x, w, b: F.gelu(F.linear(x, w, b), approximate="tanh"), "linear_gelu", [(4, 6), (5, 6), (5,)],
        ),
        "ffn_postnorm": (
            lambda x, nw, nb, w1, b1, w2, b2, backend: lmkern.ffn(x, nw, nb, w1, b1, w2, b2, prenorm=False,
                                                                  backend=backend),
            lambda x, nw, nb, w1, b1, w2, b2: F.layer_norm(x + F.linear(F.gelu(F.linear(x, w1, b1)), w2, b2), (6,),
                                                           nw, nb),
            "linear_gelu", [(4, 6), (6,), (6,), (12, 6), (12,), (6, 12), (6,)],
        ),
        "swiglu": (
            lambda x, wg, wu, wd, backend: lmkern.swiglu(x, wg, wu, wd, backend=backend),
            lambda x, wg, wu, wd: F.linear(F.silu(F.linear(x, wg)) * F.linear(x, wu), wd),
            "swiglu", [(4, 6), (10, 6), (10, 6), (5, 10)],
        ),
    }


def gradient_penalty(fn, inputs):
    """sum over inputs of |d(sum(u * fn(inputs)))/d input|^2, u fixed: differentiable only
    if fn's backward is."""
    outputs = fn(*inputs)
    outputs = outputs if isinstance(outputs, tuple) else (outputs,)
    generator = torch.Generator().manual_seed(7)
    weighted = sum((out * torch.randn(out.shape, generator=generator).to(out.dtype)).sum() for out in outputs)
    grads = torch.autograd.grad(weighted, inputs, create_graph=True)
    return sum(grad.square().sum() for grad in grads)


@pytest.mark.parametrize("case", _penalty_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_second_derivatives_match_torch(backend, case):
    ours, theirs, op, shapes = _penalty_cases()[case]
    require(backend, "cpu", torch.float32, op)
    assert_matches_torch_on_random_inputs(
        lambda *inputs: gradient_penalty(lambda *a: ours(*a, backend), inputs),
        lambda *inputs: gradient_penalty(theirs, inputs), shapes, grad_factor=3.0,
    )


@pytest.mark.parametrize("case", ["scaled_dot_product_attention_causal", "layer_norm", "rms_norm", "linear_gelu",
                                  "ffn_postnorm", "swiglu"])
def test_gradgradcheck_on_the_reference(case):
    ours, _, _, shapes = _penalty_cases()[case]
    randn = make_randn(9)
    inputs = [grad_leaf(randn(*shape, dtype=torch.float64)) for shape in shapes]
    assert torch.autograd.gradgradcheck(lambda *a: ours(*a, "torch"), inputs)


def _first_order_only_cases():
    """id -> (op name in the error, loss(x, w) through the op)."""
    t = torch.tensor([1, 0, 3, 2])
    return {
        "cross_entropy": ("cross_entropy", lambda x, w, backend: lmkern.cross_entropy(x @ w, t, backend=backend)),
        "linear_cross_entropy": ("linear_cross_entropy",
                                 lambda x, w, backend: lmkern.linear_cross_entropy(x, w.T, t, backend=backend)),
        "add_layer_norm": ("add_layer_norm",
                           lambda x, w, backend: lmkern.add_layer_norm(x @ w, x @ w, None, None, backend=backend)[0]
                           .square().sum()),
        "add_rms_norm": ("add_rms_norm",
                         lambda x, w, backend: lmkern.add_rms_norm(x @ w, x @ w, None, backend=backend)[0]
                         .square().sum()),
    }


@pytest.mark.parametrize("case", _first_order_only_cases())
@pytest.mark.parametrize("backend", BACKENDS)
def test_create_graph_through_a_first_order_op_raises_naming_it(backend, case):
    """A gradient penalty through these ops would silently lose their second-order terms
    (a penalty through linear_cross_entropy gave d(w) off by a quarter): it raises instead."""
    name, loss = _first_order_only_cases()[case]
    require(backend, "cpu", torch.float32, name if name.startswith("add_") else "cross_entropy")
    randn = make_randn(10)
    x, w = grad_leaf(randn(4, 6)), grad_leaf(randn(6, 6))
    with pytest.raises(RuntimeError, match=f"lmkern.{name} has no double backward"):
        torch.autograd.grad(loss(x, w, backend), (x, w), create_graph=True)
    torch.autograd.grad(loss(x, w, backend), (x, w))  # first derivatives as ever
