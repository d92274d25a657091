"""GPT on lmkern's kernels: every backend against kernels="torch" under the tolerance rule
(logits, loss, every gradient), kernels="torch" against transformers' GPT2LMHeadModel with
the same weights (logits, loss, gradients, greedy and sampled generation, EOS and
min_new_tokens), the sampling filters against transformers' warpers, a short training run
on real text, Hugging Face checkpoints in and out, checkpoints of the parameter names
before the fused MLP, parameter and FLOP counts, dropout, and bad input. Models come from
small random configs; nothing is downloaded."""

import dataclasses
import itertools
import json

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES
from causal_lm import (AUTOCAST_IDS, AUTOCAST_RUNS, batch_of_tokens, check_autocast_step_matches_the_reference,
                       check_kernels_match_the_reference, left_padded, make_model, require_model, step)

from lmkern.models import corpus, generation, gpt, gpt_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # random configs' special tokens and padding notes

MODEL_OPS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")
CONFIG = gpt.GPTConfig(vocab_size=96, context_length=64, n_layer=2, n_head=4, n_embd=32)


pytestmark = pytest.mark.usefixtures("one_thread")


# -- Pretraining: the kernels against the reference, the reference against transformers ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_match_the_reference_model(device, backend, dtype):
    require_model(MODEL_OPS, backend, device, dtype)
    check_kernels_match_the_reference(gpt.GPT, dataclasses.replace(CONFIG, context_length=16), 8, backend, device, dtype)


@pytest.mark.parametrize("backend, half", AUTOCAST_RUNS, ids=AUTOCAST_IDS)
def test_kernels_under_autocast_match_the_reference_model(backend, half):
    require_model(MODEL_OPS, backend, "cpu", half)
    check_autocast_step_matches_the_reference(gpt.GPT, dataclasses.replace(CONFIG, context_length=16), 8, backend, half)


def hf_model(tie_embeddings=True):
    """A random GPT2LMHeadModel of CONFIG's sizes, weights scaled up (initializer_range 0.2)
    so that greedy decoding wanders instead of repeating one token."""
    torch.manual_seed(0)
    config = transformers.GPT2Config(
        vocab_size=CONFIG.vocab_size, n_positions=CONFIG.context_length, n_layer=CONFIG.n_layer,
        n_head=CONFIG.n_head, n_embd=CONFIG.n_embd, initializer_range=0.2, tie_word_embeddings=tie_embeddings,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    return transformers.GPT2LMHeadModel(config).eval()


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_reference_model_matches_transformers(tie_embeddings):
    theirs = hf_model(tie_embeddings)
    ours = gpt.GPT.from_hf(theirs.state_dict(), kernels="torch", n_head=CONFIG.n_head).double()
    theirs.double()  # after loading ours: float32 weights, the same in both
    assert ours.config == dataclasses.replace(CONFIG, kernels="torch", tie_embeddings=tie_embeddings)
    input_ids, _ = batch_of_tokens(CONFIG, 3, 20)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)  # HF shifts the labels
    logits, loss, grads = step(ours, input_ids, targets)
    expected = theirs(input_ids, labels=input_ids)
    torch.testing.assert_close(logits, expected.logits)
    torch.testing.assert_close(loss.float(), expected.loss)  # theirs casts the logits to float32 for the loss
    F.cross_entropy(expected.logits[:, :-1].flatten(0, 1), input_ids[:, 1:].flatten()).backward()  # in float64
    their_grads = dict((name, p.grad) for name, p in theirs.named_parameters())
    assert {gpt_hf.hf_name(name) for name in grads} == their_grads.keys()
    for name, grad in grads.items():
        hf_name = gpt_hf.hf_name(name)
        torch.testing.assert_close(gpt_hf.hf_layout(hf_name, grad), their_grads[hf_name], msg=name)


# -- Generation ------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_matches_transformers(device, backend, use_cache):
    require_model(MODEL_OPS, backend, device, torch.float32)
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and not use_cache:
        pytest.skip("the Triton interpreter is slow: triton decodes with the cache only, a few tokens")
    new_tokens = 4 if interpreted else 32
    theirs = hf_model().to(device)
    ours = gpt.GPT.from_hf(theirs.state_dict(), kernels=backend, n_head=CONFIG.n_head).to(device)
    input_ids, attention_mask = (t.to(device) for t in left_padded(PROMPTS))
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[:, input_ids.shape[1]:]
    assert len(set(expected.flatten().tolist())) > 6  # the model does not just repeat one token
    actual = ours.generate(input_ids, new_tokens, attention_mask=attention_mask, use_cache=use_cache)
    assert torch.equal(actual, expected)


def test_generation_stops_at_eos_per_sequence_as_transformers():
    theirs = hf_model()
    ours = gpt.GPT.from_hf(theirs.state_dict(), kernels="native", n_head=CONFIG.n_head)
    input_ids, attention_mask = left_padded(PROMPTS)
    free = ours.generate(input_ids, 24, attention_mask=attention_mask)
    eos = int(free[1, 3])  # the second sequence stops after 4 tokens, the others when (if) they reach it
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=24, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos)[:, input_ids.shape[1]:]
    for use_cache in (True, False):
        actual = ours.generate(input_ids, 24, attention_mask=attention_mask, eos_token_id=eos, use_cache=use_cache)
        assert torch.equal(actual, expected)
    first = (actual == eos).int().argmax(1)
    assert first[1] <= 3 and (actual[1, first[1]:] == eos).all()


def test_min_new_tokens_holds_back_eos_as_transformers():
    theirs = hf_model()
    ours = gpt.GPT.from_hf(theirs.state_dict(), kernels="native", n_head=CONFIG.n_head)
    input_ids, attention_mask = left_padded(PROMPTS)
    eos = int(ours.generate(input_ids, 2, attention_mask=attention_mask)[1, 1])  # the second sequence's second
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, do_sample=False,
                               eos_token_id=eos, pad_token_id=eos, min_new_tokens=6)[:, input_ids.shape[1]:]
    actual = ours.generate(input_ids, 16, attention_mask=attention_mask, eos_token_id=eos, min_new_tokens=6)
    assert torch.equal(actual, expected)
    assert (actual[:, :6] != eos).all()


@pytest.mark.parametrize("top_k, top_p, temperature", [(5, None, 1.0), (None, 0.8, 0.7), (20, 0.9, 1.3)])
def test_sampling_matches_transformers_for_the_same_seed(top_k, top_p, temperature):
    """Without `seed` our sampling draws from torch's generator as transformers does: the
    same filtered probabilities give the same tokens."""
    theirs = hf_model()
    ours = gpt.GPT.from_hf(theirs.state_dict(), kernels="native", n_head=CONFIG.n_head)
    input_ids, attention_mask = left_padded(PROMPTS)
    torch.manual_seed(7)  # their top_k 0 and top_p 1.0 are off, as our None
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=16, pad_token_id=0,
                               do_sample=True, top_k=top_k or 0, top_p=top_p or 1.0, temperature=temperature)
    torch.manual_seed(7)
    actual = ours.generate(input_ids, 16, attention_mask=attention_mask, do_sample=True, top_k=top_k, top_p=top_p,
                           temperature=temperature)
    assert torch.equal(actual, expected[:, input_ids.shape[1]:])


def test_sampling_is_reproducible_for_a_seed_and_leaves_torch_generator_alone():
    model = gpt.GPT.from_hf(hf_model().state_dict(), kernels="native", n_head=CONFIG.n_head)
    input_ids, attention_mask = left_padded(PROMPTS)
    state = torch.get_rng_state()
    runs = [model.generate(input_ids, 12, attention_mask=attention_mask, do_sample=True, top_p=0.95, seed=seed)
            for seed in (3, 3, 4)]
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    greedy = model.generate(input_ids, 12, attention_mask=attention_mask)
    assert torch.equal(model.generate(input_ids, 12, attention_mask=attention_mask, do_sample=True, top_k=1), greedy)
    assert model.generate(input_ids, 0).shape == (3, 0)


@pytest.mark.parametrize("top_k, top_p", [(1, None), (7, None), (500, None), (None, 0.05), (None, 0.5), (None, 0.9),
                                          (None, 1.0), (12, 0.6)])
def test_filter_logits_matches_transformers_warpers(top_k, top_p):
    warpers = transformers.generation.logits_process
    logits = torch.randn(6, 200) * 3
    logits[0, :10] = logits[0].max()  # ties at the k-th value all stay, as in theirs
    expected = logits.clone()
    if top_k is not None:
        expected = warpers.TopKLogitsWarper(top_k)(None, expected)
    if top_p is not None:
        expected = warpers.TopPLogitsWarper(top_p)(None, expected)
    assert torch.equal(generation.filter_logits(logits, top_k, top_p), expected)


def test_padding_on_either_side_gives_the_same_tokens():
    model = gpt.GPT.from_hf(hf_model().state_dict(), kernels="native", n_head=CONFIG.n_head)
    input_ids, attention_mask = left_padded(PROMPTS)
    right_ids = torch.stack([torch.cat([row[mask], row[~mask]]) for row, mask in zip(input_ids, attention_mask)])
    right_mask = attention_mask.sort(dim=1, descending=True, stable=True).values
    one_by_one = torch.cat([model.generate(torch.tensor([p]), 10) for p in PROMPTS])
    assert torch.equal(model.generate(input_ids, 10, attention_mask=attention_mask), one_by_one)
    assert torch.equal(model.generate(right_ids, 10, attention_mask=right_mask), one_by_one)


# -- Training on real text -------------------------------------------------------------------


def training_run(steps):
    """(config, initial state, (steps, B, T + 1) token windows) of a byte-level model on
    standard-library docstrings."""
    text = "\n\n".join(itertools.islice(corpus.standard_library_docstrings(), 500)).encode()
    data = torch.tensor(list(text), dtype=torch.int64)  # bytes: a 256-token vocabulary
    config = gpt.GPTConfig(vocab_size=256, context_length=32, n_layer=2, n_head=4, n_embd=64)
    starts = torch.randint(0, len(data) - config.context_length - 1, (steps, 16),
                           generator=torch.Generator().manual_seed(0))
    return config, gpt.GPT(config).state_dict(), data[starts[..., None] + torch.arange(config.context_length + 1)]


def logged_losses(run, kernels, every, precision=torch.float32, lr=3e-3):
    """The loss of every `every`-th AdamW step and of the last, training on `run` with
    fp32 weights, under torch.autocast for a half precision (fp16 with loss scaling)."""
    config, state, windows = run
    model = make_model(gpt.GPT, config, state, kernels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.1)
    scaler = torch.amp.GradScaler("cpu", enabled=precision == torch.float16)
    losses = []
    for window in windows:
        with torch.autocast("cpu", dtype=precision, enabled=precision != torch.float32):
            loss = model(window[:, :-1], window[:, 1:]).loss
        optimizer.zero_grad()
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        losses.append(loss.item())
    return torch.tensor(losses[::every] + losses[-1:])


def test_training_with_fused_kernels_follows_the_reference():
    """A few hundred AdamW steps: the native kernels' loss stays within 1% of the
    reference's at every logged step."""
    run = training_run(200)
    reference, fused = logged_losses(run, "torch", 20), logged_losses(run, "native", 20)
    assert ((fused - reference).abs() / reference).max() < 0.01, (fused, reference)
    assert fused[-1] < 0.5 * fused[0]  # from ln(256) = 5.5 to about 2.4


def test_training_under_autocast_follows_fp32():
    """100 steps under bf16 autocast, and under fp16 autocast with loss scaling, over fp32
    weights on the native kernels: the loss stays within 2% of the fp32 run's at every
    logged step. (At the 3e-3 of the test above, any two runs that differ in rounding,
    torch's own bf16 among them, part ways after some 30 steps; 1e-3 trains as far in 100.)"""
    run = training_run(100)
    fp32 = logged_losses(run, "native", 10, lr=1e-3)
    for precision in (torch.bfloat16, torch.float16):
        half = logged_losses(run, "native", 10, precision, lr=1e-3)
        assert ((half - fp32).abs() / fp32).max() < 0.02, (precision, half, fp32)
    assert fp32[-1] < 0.6 * fp32[0]


# -- Dropout ---------------------------------------------------------------------------------


@pytest.mark.parametrize("device", DEVICES)
def test_dropout_draws_the_same_masks_on_every_backend(device):
    require_model(MODEL_OPS, "native", device, torch.float32)
    config = dataclasses.replace(CONFIG, context_length=16)
    state = gpt.GPT(config).state_dict()
    input_ids, targets = batch_of_tokens(config, 2, 16)
    runs = {}
    for kernels, seed in (("torch", 5), ("native", 5), ("native", 6)):
        torch.manual_seed(seed)
        runs[kernels, seed] = step(make_model(gpt.GPT, config, state, kernels, device, dropout=0.2), input_ids, targets)
    (_, reference, reference_grads), (_, fused, fused_grads) = runs["torch", 5], runs["native", 5]
    torch.testing.assert_close(fused, reference)
    for name in reference_grads:
        torch.testing.assert_close(fused_grads[name], reference_grads[name], msg=name)
    assert not torch.equal(runs["native", 6][1], fused)  # another seed, other masks
    model = make_model(gpt.GPT, config, state, "native", device, dropout=0.2).eval()
    assert model(input_ids.to(device), targets.to(device)).loss != fused  # dropout only in training


# -- Checkpoints: Hugging Face's, and ours of older names -----------------------------------


def assert_same_weights(model, other):
    assert model.state_dict().keys() == other.state_dict().keys()
    for name, tensor in model.state_dict().items():
        assert torch.equal(tensor, other.state_dict()[name]), name


def test_hf_state_dict_round_trips_and_loads_into_transformers():
    model = gpt.GPT(dataclasses.replace(CONFIG, kernels="torch"))
    theirs = hf_model()
    theirs.load_state_dict(model.to_hf_state_dict(), strict=True)
    input_ids, _ = batch_of_tokens(CONFIG, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, theirs(input_ids).logits)
    assert_same_weights(gpt.GPT.from_hf(model.to_hf_state_dict(), kernels="torch", n_head=CONFIG.n_head), model)
    # A GPT2Model's names (no "transformer." prefix, no LM head) with the mask buffers of old checkpoints.
    bare = {name.removeprefix("transformer."): t for name, t in theirs.state_dict().items() if name != "lm_head.weight"}
    bare["h.0.attn.bias"], bare["h.0.attn.masked_bias"] = torch.ones(1, 1, 64, 64), torch.tensor(-1e4)
    assert_same_weights(gpt.GPT.from_hf(bare, CONFIG), model)


@pytest.mark.parametrize("weights", ["model.safetensors", "pytorch_model.bin"])
def test_loads_a_hugging_face_directory_offline(tmp_path, weights):
    theirs = hf_model()
    theirs.save_pretrained(tmp_path)
    if weights == "pytorch_model.bin":
        (tmp_path / "model.safetensors").unlink()
        torch.save(theirs.state_dict(), tmp_path / weights)
    ours = gpt.GPT.from_hf(tmp_path, kernels="native", dropout=0.1)
    assert ours.config == dataclasses.replace(CONFIG, kernels="native", dropout=0.1)
    input_ids, _ = batch_of_tokens(CONFIG, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours.eval()(input_ids).logits, theirs(input_ids).logits)


@pytest.mark.parametrize("tie_embeddings", [True, False], ids=["tied", "untied"])
def test_save_hf_writes_a_directory_transformers_reads(tmp_path, tie_embeddings):
    model = gpt.GPT(dataclasses.replace(CONFIG, kernels="torch", tie_embeddings=tie_embeddings)).eval()
    model.save_hf(tmp_path)
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path).eval()
    input_ids, _ = batch_of_tokens(CONFIG, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(model(input_ids).logits, theirs(input_ids).logits)
    again = gpt.GPT.from_hf(tmp_path, kernels="torch")
    assert again.config == model.config
    assert_same_weights(again, model)


# Block parameters as checkpoints saved before the MLP owned its LayerNorm name them, in their order then.
OLD_BLOCK_NAMES = ["ln_1.weight", "ln_1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
                   "ln_2.weight", "ln_2.bias", "mlp.fc.weight", "mlp.fc.bias", "mlp.proj.weight", "mlp.proj.bias"]
NEW_NAMES = {"mlp.norm.": "ln_2.", "mlp.fc1.": "mlp.fc.", "mlp.fc2.": "mlp.proj."}  # new -> old


def old_name(name):
    for new, old in NEW_NAMES.items():
        name = name.replace(new, old)
    return name


def test_checkpoints_of_the_names_before_the_fused_mlp_load_and_resume(tmp_path):
    model = gpt.GPT(CONFIG)
    old = {old_name(name): tensor for name, tensor in model.state_dict().items()}
    assert {"blocks.1.ln_2.bias", "blocks.1.mlp.fc.weight", "blocks.1.mlp.proj.bias"} <= old.keys()
    loaded = gpt.GPT(CONFIG)
    loaded.load_state_dict(old)
    assert_same_weights(loaded, model)
    # As lmkern's checkpoints store them: safetensors, the tied LM head once.
    safetensors.torch.save_file({name: t for name, t in old.items() if name != "lm_head.weight"}, tmp_path / "old")
    loaded = gpt.GPT(CONFIG)
    safetensors.torch.load_model(loaded, tmp_path / "old")  # strict: every name is matched
    assert_same_weights(loaded, model)
    # The parameters keep their order, so that an optimizer's state saved before resumes.
    assert [old_name(name) for name, _ in loaded.blocks[0].named_parameters()] == OLD_BLOCK_NAMES


def bad_checkpoints(tmp_path):
    good = gpt.GPT(CONFIG).to_hf_state_dict()
    wide = gpt.GPT(dataclasses.replace(CONFIG, n_embd=48)).to_hf_state_dict()
    deeper = gpt.GPT(dataclasses.replace(CONFIG, n_layer=3)).to_hf_state_dict()
    missing = {name: t for name, t in good.items() if name != "transformer.h.1.mlp.c_fc.bias"}
    untied = {**good, "lm_head.weight": torch.zeros_like(good["lm_head.weight"])}
    (tmp_path / "no_weights").mkdir()
    (tmp_path / "no_weights" / "config.json").write_text("{}")
    (tmp_path / "relu").mkdir()
    (tmp_path / "relu" / "config.json").write_text(json.dumps(dict(
        vocab_size=96, n_positions=64, n_layer=2, n_head=4, n_embd=32, activation_function="relu")))
    torch.save(good, tmp_path / "relu" / "pytorch_model.bin")
    return [
        (lambda: gpt.GPT.from_hf(wide, CONFIG),
         r"wrong shape: transformer\.wte\.weight \(96, 48\) \(expected \(96, 32\)"),
        (lambda: gpt.GPT.from_hf(missing, CONFIG), r"missing: transformer\.h\.1\.mlp\.c_fc\.bias"),
        (lambda: gpt.GPT.from_hf(deeper, CONFIG), r"unexpected: transformer\.h\.2\.ln_1\.weight"),
        (lambda: gpt.GPT.from_hf(untied, CONFIG), r"lm_head\.weight differs from its transformer\.wte\.weight"),
        (lambda: gpt.GPT.from_hf({"wte.weight": good["transformer.wte.weight"]}), r"must hold transformer\.wpe"),
        (lambda: gpt.GPT.from_hf(tmp_path / "no_weights"), r"neither model\.safetensors nor pytorch_model\.bin"),
        (lambda: gpt.GPT.from_hf(tmp_path), r"no config\.json"),
        (lambda: gpt.GPT.from_hf(tmp_path / "relu"), r"activation_function must be .*gelu_new.*got 'relu'"),
        (lambda: gpt.GPT(dataclasses.replace(CONFIG, bias=False)).to_hf_state_dict(), r"needs config\.bias=True"),
    ]


def test_mismatched_checkpoints_raise_naming_the_key(tmp_path):
    for load, message in bad_checkpoints(tmp_path):
        with pytest.raises((ValueError, FileNotFoundError), match=message):
            load()


# -- Sizes -----------------------------------------------------------------------------------


@pytest.mark.parametrize("name, parameters", [("gpt2", 124_439_808), ("gpt2-medium", 354_823_168),
                                              ("gpt2-large", 774_030_080), ("gpt2-xl", 1_557_611_200)])
def test_presets_have_gpt2s_parameter_counts(name, parameters):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = gpt.GPT(gpt.preset(name))
    assert model.num_parameters(non_embedding=False) == parameters  # transformers' count, the tied head once
    assert model.num_parameters() == parameters - 1024 * model.config.n_embd


@pytest.mark.parametrize("length", [64, 16])
def test_flops_per_token_is_three_forwards_as_torch_counts_them(length):
    """The estimate against torch's own count of a forward's matmul FLOPs, times 3 (the
    backward's two matmuls per forward one). Without biases, the estimate's only excess is
    the LayerNorms' weights (0.5% here), which do no matmul."""
    from torch.utils.flop_counter import FlopCounterMode

    model = gpt.GPT(dataclasses.replace(CONFIG, bias=False, kernels="torch"))
    input_ids, _ = batch_of_tokens(CONFIG, 2, length)
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        model(input_ids)
    counted = 3 * counter.get_total_flops() / input_ids.numel()
    assert model.flops_per_token(length) == pytest.approx(counted, rel=1e-2)
    peak = 1e12
    assert model.estimate_mfu(peak / model.flops_per_token(length), peak, length) == pytest.approx(1.0)


# -- Bad input -------------------------------------------------------------------------------


def bad_calls():
    model = gpt.GPT(dataclasses.replace(CONFIG, context_length=16, kernels="torch"))
    ids = torch.randint(0, CONFIG.vocab_size, (2, 8))
    return [
        (lambda: model(ids.clone().fill_(96)), ValueError, r"input_ids must hold values in \[0, 96\), got 96"),
        (lambda: model(torch.full_like(ids, -1)), ValueError, r"input_ids must hold values in \[0, 96\), got -1"),
        (lambda: model(ids.int()), TypeError, "input_ids must be an int64 tensor, got torch.int32"),
        (lambda: model(ids[0]), ValueError, r"input_ids must have shape \(batch, length\), got \(8,\)"),
        (lambda: model(torch.zeros(1, 17, dtype=torch.int64)), ValueError,
         "input_ids reach 17 tokens per sequence: more than context_length 16"),
        (lambda: model(ids, ids.index_fill(1, torch.tensor([3]), 96)), ValueError,
         r"targets must hold values in \[0, 96\) or -100, got 96"),
        (lambda: model(ids, ids[:, :4]), ValueError,
         r"targets must have shape \(2, 8\), got \(2, 4\)"),
        (lambda: model.generate(ids.clone().fill_(200), 2), ValueError, "input_ids must hold values.*got 200"),
        (lambda: model.generate(torch.zeros(1, 17, dtype=torch.int64), 1), ValueError,
         "input_ids reach 17 tokens per sequence: more than context_length 16"),
        (lambda: model.generate(ids, 9), ValueError,
         r"the longest prompt \(8 tokens\) and max_new_tokens \(9\) reach 17 tokens: more than context_length 16"),
        (lambda: model.generate(ids, -1), ValueError, "max_new_tokens must be an int >= 0, got -1"),
        (lambda: model.generate(ids, 2, attention_mask=ids[:, :3]), ValueError,
         r"attention_mask must have input_ids' shape \(2, 8\), got \(2, 3\)"),
        (lambda: model.generate(ids, 2, attention_mask=torch.zeros_like(ids)), ValueError,
         r"attention_mask has a row without tokens \(row 0\)"),
        (lambda: model.generate(ids, 2, do_sample=True, temperature=0), ValueError, "temperature must be > 0, got 0"),
        (lambda: model.generate(ids, 2, do_sample=True, top_k=0), ValueError,
         "top_k must be None or an int >= 1, got 0"),
        (lambda: model.generate(ids, 2, do_sample=True, top_p=1.5), ValueError, r"top_p must be None or in \(0, 1\]"),
        (lambda: gpt.GPTConfig(n_embd=30, n_head=4), ValueError, r"n_embd \(30\) must be a multiple of n_head \(4\)"),
        (lambda: gpt.GPTConfig(kernels="cuda"), ValueError, "kernels must be one of"),
        (lambda: gpt.GPTConfig(n_layer=0), ValueError, "n_layer must be a positive int, got 0"),
        (lambda: gpt.preset("gpt3"), ValueError, "unknown GPT preset 'gpt3': choose one of tiny, gpt2"),
    ]


@pytest.mark.parametrize("index", range(len(bad_calls())))
def test_bad_input_names_the_argument(index):
    call, error, message = bad_calls()[index]
    with pytest.raises(error, match=message):
        call()
