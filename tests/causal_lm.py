"""What the decoder-only models' tests (test_gpt.py, test_llama.py) share: models of one
state on any backend, batches of tokens, one training step's outputs and gradients, their
comparison under the tolerance rule (a backend against the reference, with and without
autocast), and left-padded prompts."""

import dataclasses

import torch
import torch.nn.functional as F
from conftest import require
from numerics import assert_close_to_truth, assert_mean_loss_close_to_truth, truth_dtype


def require_model(ops, backend, device, dtype):
    """Skip (or fail, see conftest.require) unless `backend` runs every kernel family of ops."""
    for op in ops:
        require(backend, device, dtype, op)


def make_model(model_class, config, state, kernels, device="cpu", dtype=torch.float32, **overrides):
    model = model_class(dataclasses.replace(config, kernels=kernels, **overrides))
    model.load_state_dict(state)
    return model.to(device, dtype)


def batch_of_tokens(config, batch, length, seed=1):
    """(input_ids, targets) (B, T) int64: random tokens and the next ones, a few ignored (-100)."""
    tokens = torch.randint(0, config.vocab_size, (batch, length + 1), generator=torch.Generator().manual_seed(seed))
    targets = tokens[:, 1:].clone()
    targets[0, -2:] = -100
    return tokens[:, :-1], targets


def step(model, input_ids, targets, autocast=None):
    """(logits, loss, {parameter name: gradient}) of one forward and backward of the loss,
    under torch.autocast in the dtype `autocast` if given."""
    device = model.lm_head.weight.device
    with torch.autocast(device.type, dtype=autocast, enabled=autocast is not None):
        output = model(input_ids.to(device), targets.to(device), return_logits=True)
    output.loss.backward()
    return output.logits.detach(), output.loss.detach(), {name: p.grad for name, p in model.named_parameters()}


def assert_step_close(actual, truth, baseline, targets):
    """Logits, loss and every gradient of step()'s `actual` within the tolerance rule of
    `truth`, `baseline` being the reference in actual's dtype."""
    assert_close_to_truth(actual[0], truth[0], baseline[0], name="logits")
    truth_rows, baseline_rows = (F.cross_entropy(logits.flatten(0, 1), targets.flatten().to(logits.device),
                                                 reduction="none")[targets.flatten() != -100]
                                 for logits in (truth[0], baseline[0]))
    assert_mean_loss_close_to_truth(actual[1], truth[1], baseline_rows, truth_rows)
    assert actual[2].keys() == truth[2].keys()
    for name in actual[2]:  # every gradient goes through attention's backward: its factor
        assert_close_to_truth(actual[2][name], truth[2][name], baseline[2][name], factor=3.0, name=f"grad {name}")


def check_kernels_match_the_reference(model_class, config, length, backend, device, dtype):
    """One training step of a model with kernels=backend against kernels="torch" (truth:
    the reference in truth_dtype(dtype)), on two sequences of `length` tokens."""
    state = model_class(config).state_dict()
    input_ids, targets = batch_of_tokens(config, 2, length)
    actual = step(make_model(model_class, config, state, backend, device, dtype), input_ids, targets)
    truth = step(make_model(model_class, config, state, "torch", device, truth_dtype(dtype)), input_ids, targets)
    baseline = step(make_model(model_class, config, state, "torch", device, dtype), input_ids, targets)
    assert_step_close(actual, truth, baseline, targets)


def check_autocast_step_matches_the_reference(model_class, config, length, backend, half):
    """One training step under torch.autocast over fp32 weights, as on a GPU: logits in the
    autocast dtype, the loss and every gradient in fp32, all within the tolerance rule of
    the reference model under the same autocast (truth: the reference in fp64)."""
    state = model_class(config).state_dict()
    input_ids, targets = batch_of_tokens(config, 2, length)
    actual = step(make_model(model_class, config, state, backend), input_ids, targets, autocast=half)
    baseline = step(make_model(model_class, config, state, "torch"), input_ids, targets, autocast=half)
    truth = step(make_model(model_class, config, state, "torch", dtype=torch.float64), input_ids, targets)
    assert actual[0].dtype == half and actual[1].dtype == torch.float32
    assert all(grad.dtype == torch.float32 for grad in actual[2].values())
    assert_step_close(actual, truth, baseline, targets)


# (backend, autocast dtype) of the autocast checks: bf16 only where the Triton interpreter does not run.
AUTOCAST_RUNS = [("native", torch.bfloat16), ("native", torch.float16), ("triton", torch.float16)]
AUTOCAST_IDS = [f"{backend}-{str(dtype)[6:]}" for backend, dtype in AUTOCAST_RUNS]


def left_padded(prompts, pad=0):
    """(input_ids, attention_mask) (B, T) of prompts of different lengths, padded on the
    left as transformers wants for decoder-only generation."""
    width = max(map(len, prompts))
    input_ids = torch.tensor([[pad] * (width - len(p)) + p for p in prompts])
    attention_mask = torch.tensor([[False] * (width - len(p)) + [True] * len(p) for p in prompts])
    return input_ids, attention_mask
