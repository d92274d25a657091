"""Mixed precision: every op under torch.autocast on CPU (bf16 on the torch and native
backends; fp16 on those and on Triton in its interpreter, which gets bf16 wrong), forward
and backward, against the reference under the same autocast (the baseline) and the
reference in fp64 without it (the truth), under the tolerance rule; the dtypes of the
outputs and of every gradient by the autocast contract (README, "Mixed precision");
half-precision activations beside fp32 parameters outside autocast; and a training step
with fp16 loss scaling (torch.amp.GradScaler) that skips a step whose gradients overflow."""

import pytest
import torch
from conftest import BACKENDS, require
from numerics import assert_mean_loss_close_to_truth
from op_check import assert_all_close_to_truth, outputs_and_grads

import lmkern

# (backend, autocast dtype): bf16 only where the Triton interpreter does not run.
RUNS = [(name, dtype) for name in BACKENDS for dtype in (torch.bfloat16, torch.float16)
        if not (name == "triton" and dtype == torch.bfloat16)]
RUN_IDS = [f"{name}-{str(dtype)[6:]}" for name, dtype in RUNS]
HALF = object()  # in a case's input dtypes: the autocast dtype (a half-precision activation)


def randn(*shape, seed):
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed), dtype=torch.float64)


def make_inputs(dtypes, shapes, half):
    """Gradient leaves of the given shapes, each in its dtype (HALF: the autocast dtype)."""
    return [randn(*shape, seed=index).to(half if dtype is HALF else dtype).requires_grad_()
            for index, (dtype, shape) in enumerate(zip(dtypes, shapes))]


def under_autocast(fn, dtype):
    def run(*inputs):
        with torch.autocast("cpu", dtype=dtype):
            return fn(*inputs)

    return run


def assert_autocast_matches_reference(op, backend, half, dtypes, shapes, output_dtypes, factor, rows_op=None):
    """op(*inputs, backend) under autocast against the reference under autocast and in fp64;
    outputs in output_dtypes (HALF: the autocast dtype), gradients in their inputs' dtypes.
    rows_op: for an op whose output is a mean loss, the op with reduction="none", whose
    rows give the loss's baseline error (see numerics.assert_mean_loss_close_to_truth)."""
    inputs = make_inputs(dtypes, shapes, half)
    actual = outputs_and_grads(under_autocast(lambda *a: op(*a, backend), half), inputs)
    baseline = outputs_and_grads(under_autocast(lambda *a: op(*a, "torch"), half), inputs)
    wide_inputs = [x.double().requires_grad_() for x in inputs]
    truth = outputs_and_grads(lambda *a: op(*a, "torch"), wide_inputs)
    expected = [half if dtype is HALF else dtype for dtype in output_dtypes] + [x.dtype for x in inputs]
    assert [value.dtype for value in actual] == expected
    names = [f"output {i}" for i in range(len(output_dtypes))] + [f"d input {i}" for i in range(len(inputs))]
    if rows_op is not None:
        with torch.autocast("cpu", dtype=half):
            baseline_rows = rows_op(*inputs, "torch").detach()
        truth_rows = rows_op(*wide_inputs, "torch").detach()
        assert_mean_loss_close_to_truth(actual[0], truth[0], baseline_rows, truth_rows)
        actual, truth, baseline, names = actual[1:], truth[1:], baseline[1:], names[1:]
    assert_all_close_to_truth(actual, truth, baseline, names, factor)


MASK = randn(1, 2, 9, 11, seed=9).float()  # an fp32 additive mask, cast with the inputs


def attention_additive_mask(q, k, v, backend):
    return lmkern.scaled_dot_product_attention(q, k, v, attn_mask=MASK, backend=backend)


def attention_gqa_dropout(q, k, v, backend):
    return lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, dropout_p=0.2,
                                               backend=backend)


def layer_norm(x, weight, bias, backend):
    return lmkern.layer_norm(x, x.shape[-1:], weight, bias, backend=backend)


def add_layer_norm(x, residual, weight, bias, backend):
    return lmkern.add_layer_norm(x, residual, weight, bias, dropout_p=0.1, backend=backend)


def rms_norm(x, weight, backend):
    return lmkern.rms_norm(x, x.shape[-1:], weight, backend=backend)


def add_rms_norm(x, residual, weight, backend):
    return lmkern.add_rms_norm(x, residual, weight, dropout_p=0.1, weight_offset=1.0, backend=backend)


def linear_gelu(x, weight, bias, backend):
    return lmkern.linear_gelu(x, weight, bias, "tanh", backend=backend)


def swiglu(x, w_gate, w_up, w_down, backend):
    return lmkern.swiglu(x, w_gate, w_up, w_down, activation="gelu_tanh", backend=backend)


def ffn(prenorm, residual):
    def run(x, norm_weight, norm_bias, w1, b1, w2, b2, backend):
        return lmkern.ffn(x, norm_weight, norm_bias, w1, b1, w2, b2, prenorm=prenorm, residual=residual,
                          dropout_p=0.1, backend=backend)

    return run


TARGETS = torch.tensor([3, 0, -100, 7, 2, 9])


def cross_entropy(reduction):
    def run(logits, backend):
        return lmkern.cross_entropy(logits, TARGETS, label_smoothing=0.1, reduction=reduction, backend=backend)

    return run


def linear_cross_entropy(reduction):
    def run(hidden, weight, bias, backend):
        return lmkern.linear_cross_entropy(hidden, weight, TARGETS, bias, reduction=reduction, chunk_size=4,
                                           backend=backend)

    return run


F32 = torch.float32
# id -> (op, kernel op that the backend must run, input dtypes, shapes, output dtypes[, the
# op per row, for a mean loss])
CASES = {
    "attention_additive_mask": (attention_additive_mask, "attention", [F32, F32, F32],
                                [(2, 2, 9, 16), (2, 2, 11, 16), (2, 2, 11, 16)], [HALF]),
    "attention_gqa_causal_dropout": (attention_gqa_dropout, "attention", [F32, HALF, F32],
                                     [(1, 4, 12, 16), (1, 2, 12, 16), (1, 2, 12, 16)], [HALF]),
    "layer_norm_half_input": (layer_norm, "layer_norm", [HALF, F32, F32], [(6, 24), (24,), (24,)], [HALF]),
    "layer_norm_fp32_input": (layer_norm, "layer_norm", [F32, F32, F32], [(6, 24), (24,), (24,)], [F32]),
    "add_layer_norm_fp32_residual": (add_layer_norm, "layer_norm", [HALF, F32, F32, F32],
                                     [(6, 24), (6, 24), (24,), (24,)], [F32, F32]),
    "add_layer_norm_half_residual": (add_layer_norm, "layer_norm", [HALF, HALF, F32, F32],
                                     [(6, 24), (6, 24), (24,), (24,)], [HALF, HALF]),
    "rms_norm_half_input": (rms_norm, "rms_norm", [HALF, F32], [(6, 24), (24,)], [HALF]),
    "rms_norm_fp32_input": (rms_norm, "rms_norm", [F32, F32], [(6, 24), (24,)], [F32]),
    "add_rms_norm_fp32_residual": (add_rms_norm, "add_rms_norm", [HALF, F32, F32], [(6, 24), (6, 24), (24,)],
                                   [F32, F32]),
    "add_rms_norm_half_residual": (add_rms_norm, "add_rms_norm", [HALF, HALF, F32], [(6, 24), (6, 24), (24,)],
                                   [HALF, HALF]),
    "linear_gelu": (linear_gelu, "linear_gelu", [F32, F32, F32], [(6, 24), (40, 24), (40,)], [HALF]),
    "ffn_prenorm_fp32_stream": (ffn(True, True), "linear_gelu", [F32] * 7,
                                [(6, 24), (24,), (24,), (40, 24), (40,), (24, 40), (24,)], [F32]),
    "ffn_prenorm_branch": (ffn(True, False), "linear_gelu", [F32] * 7,
                           [(6, 24), (24,), (24,), (40, 24), (40,), (24, 40), (24,)], [HALF]),
    "ffn_postnorm_fp32_stream": (ffn(False, True), "linear_gelu", [F32] * 7,
                                 [(6, 24), (24,), (24,), (40, 24), (40,), (24, 40), (24,)], [F32]),
    "ffn_postnorm_half_stream": (ffn(False, True), "linear_gelu", [HALF] + [F32] * 6,
                                 [(6, 24), (24,), (24,), (40, 24), (40,), (24, 40), (24,)], [HALF]),
    "swiglu": (swiglu, "swiglu", [F32] * 4, [(6, 24), (40, 24), (40, 24), (24, 40)], [HALF]),
    "swiglu_half_input": (swiglu, "swiglu", [HALF, F32, F32, F32], [(2, 3, 24), (40, 24), (40, 24), (20, 40)], [HALF]),
    "cross_entropy_half_logits": (cross_entropy("mean"), "cross_entropy", [HALF], [(6, 10)], [F32],
                                  cross_entropy("none")),
    "cross_entropy_fp32_logits": (cross_entropy("sum"), "cross_entropy", [F32], [(6, 10)], [F32]),
    "linear_cross_entropy": (linear_cross_entropy("mean"), "cross_entropy", [F32, F32, F32],
                             [(6, 24), (10, 24), (10,)], [F32], linear_cross_entropy("none")),
    "linear_cross_entropy_per_row": (linear_cross_entropy("none"), "cross_entropy", [HALF, F32, F32],
                                     [(6, 24), (10, 24), (10,)], [F32]),
}


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend, half", RUNS, ids=RUN_IDS)
def test_op_under_autocast_matches_the_reference(backend, half, case):
    op, kernel_op, dtypes, shapes, output_dtypes, *rows_op = CASES[case]
    require(backend, "cpu", half, kernel_op)
    factor = 3.0 if kernel_op == "attention" else 2.0  # attention's gradients: its factor
    assert_autocast_matches_reference(op, backend, half, dtypes, shapes, output_dtypes, factor, *rows_op)


# id -> (op, kernel op, input dtypes (HALF: fp16 here), shapes, output dtypes): half
# activations beside fp32 parameters or an fp32 stream, outside autocast.
MIXED_CASES = {
    "layer_norm_fp32_parameters": (layer_norm, "layer_norm", [HALF, F32, F32], [(6, 24), (24,), (24,)], [HALF]),
    "add_layer_norm_fp32_stream": (add_layer_norm, "layer_norm", [HALF, F32, F32, F32],
                                   [(6, 24), (6, 24), (24,), (24,)], [F32, F32]),
    "rms_norm_fp32_parameters": (rms_norm, "rms_norm", [HALF, F32], [(6, 24), (24,)], [HALF]),
    "add_rms_norm_fp32_stream": (add_rms_norm, "add_rms_norm", [HALF, F32, F32], [(6, 24), (6, 24), (24,)],
                                 [F32, F32]),
}


@pytest.mark.parametrize("case", MIXED_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_half_activations_beside_fp32_parameters_outside_autocast(backend, case):
    op, kernel_op, dtypes, shapes, output_dtypes = MIXED_CASES[case]
    require(backend, "cpu", torch.float16, kernel_op)
    inputs = make_inputs(dtypes, shapes, torch.float16)
    actual = outputs_and_grads(lambda *a: op(*a, backend), inputs)
    baseline = outputs_and_grads(lambda *a: op(*a, "torch"), inputs)
    truth = outputs_and_grads(lambda *a: op(*a, "torch"), [x.double().requires_grad_() for x in inputs])
    expected = [torch.float16 if dtype is HALF else dtype for dtype in output_dtypes] + [x.dtype for x in inputs]
    assert [value.dtype for value in actual] == expected
    names = [f"output {i}" for i in range(len(output_dtypes))] + [f"d input {i}" for i in range(len(inputs))]
    assert_all_close_to_truth(actual, truth, baseline, names)


@pytest.mark.parametrize("backend", ["native", "triton"])
def test_fp16_loss_scaling_steps_and_skips_an_overflowing_step(backend):
    """torch.amp.GradScaler over fp16 autocast: a step updates the weights; a step whose
    gradients overflow fp16 leaves them as they were and halves the scale, as torch's own
    layers would."""
    require(backend, "cpu", torch.float16, "linear_gelu")
    torch.manual_seed(0)
    block = lmkern.nn.FusedFFN(16, 32, backend=backend)
    head = torch.nn.Linear(16, 10)
    parameters = [*block.parameters(), *head.parameters()]
    optimizer = torch.optim.SGD(parameters, lr=0.1)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    targets = torch.randint(0, 10, (8,))

    def step(x):
        before = [p.detach().clone() for p in parameters]
        with torch.autocast("cpu", dtype=torch.float16):
            loss = lmkern.linear_cross_entropy(block(x), head.weight, targets, head.bias, backend=backend)
        assert loss.dtype == torch.float32
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        optimizer.zero_grad()
        return [not torch.equal(p.detach(), old) for p, old in zip(parameters, before)]

    x = torch.randn(8, 16)
    assert all(step(x)) and scaler.get_scale() == 2.0**10
    assert not any(step(x * 6e4)) and scaler.get_scale() == 2.0**9  # fp16's range ends at 65504
    assert all(step(x))
