"""The T5 model on lmkern's kernels: kernels="torch" against transformers'
T5ForConditionalGeneration, v1.0 (ReLU, tied head) and v1.1 (gated GELU, untied head),
with padding in the encoder input and ignored labels (logits, loss, every gradient; greedy
generation with and without the caches); the other backends against kernels="torch";
Hugging Face directories in and out; the presets' parameter counts; bad input. Models
come from small random configs; nothing is downloaded."""

import dataclasses
import itertools

import numpy as np
import pytest
import torch
from causal_lm import assert_step_close, make_model, require_model
from conftest import BACKENDS

from lmkern.backend import BackendUnavailableError, Call
from lmkern.models import corpus, t5, t5_data, t5_hf
from lmkern.ops.attention.backends import ATTENTION

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # random configs' notes, the untied head's warning

MODEL_OPS = ("attention", "add_rms_norm", "swiglu", "linear_cross_entropy")
# Few buckets over a short max_distance, so that short sequences reach the logarithmic ones;
# more decoder blocks than encoder blocks; heads * d_kv != d_model.
CONFIG = t5.T5Config(vocab_size=96, d_model=32, d_kv=6, d_ff=48, num_layers=2, num_decoder_layers=3, num_heads=4,
                     relative_attention_num_buckets=8, relative_attention_max_distance=12)
VERSIONS = {"v1.0": dict(feed_forward="relu", tie_word_embeddings=True),
            "v1.1": dict(feed_forward="gated-gelu", tie_word_embeddings=False)}

# transformers 5.24's generate sizes its decoder cache by the encoder's blocks (IndexError
# with more decoder blocks): generation is compared with as many of each.
SYMMETRIC = CONFIG.num_layers

pytestmark = pytest.mark.usefixtures("one_thread")


def config_of(version, **overrides):
    return dataclasses.replace(CONFIG, **{**VERSIONS[version], **overrides})


def hf_model(version, initializer_factor=1.0, **overrides):
    """A random transformers T5ForConditionalGeneration of CONFIG's sizes (but overrides)
    in `version`'s layout, with random norm weights (which start as ones) and the other
    weights initializer_factor times as large as T5's initialisation (4: greedy decoding
    wanders instead of repeating one token)."""
    hf_config = {**t5_hf.config_to_hf(config_of(version, **overrides)), "initializer_factor": initializer_factor}
    torch.manual_seed(0)
    theirs = transformers.T5ForConditionalGeneration(transformers.T5Config(**hf_config)).eval()
    with torch.no_grad():
        for name, parameter in theirs.named_parameters():
            if name.endswith("layer_norm.weight"):
                parameter.add_(0.3 * torch.randn_like(parameter))
        if not hf_config["tie_word_embeddings"]:  # transformers 5 ties the head at construction whatever the config says
            theirs.lm_head.weight = torch.nn.Parameter(torch.randn_like(theirs.shared.weight))
    return theirs


def batch(seed=1):
    """(input_ids (3, 9), attention_mask (3, 9) with padding on the right, on the left and
    none, labels (3, 7) with -100 at the ends of two rows)."""
    generator = torch.Generator().manual_seed(seed)
    input_ids = torch.randint(2, CONFIG.vocab_size, (3, 9), generator=generator)
    attention_mask = torch.ones(3, 9, dtype=torch.int64)
    attention_mask[0, 6:] = 0
    attention_mask[1, :4] = 0
    labels = torch.randint(2, CONFIG.vocab_size, (3, 7), generator=generator)
    labels[0, 5:] = -100
    labels[2, 3:] = -100
    return input_ids, attention_mask, labels


def step(model, inputs):
    """(logits, loss, {parameter name: gradient}) of one forward and backward of the loss."""
    input_ids, attention_mask, labels = inputs
    output = model(input_ids, attention_mask, labels=labels, return_logits=True)
    output.loss.backward()
    return output.logits.detach(), output.loss.detach(), {name: p.grad for name, p in model.named_parameters()
                                                         if p.requires_grad}


# -- The reference model against transformers ------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_reference_model_matches_transformers(version):
    theirs = hf_model(version).double()
    ours = t5.T5.from_hf(theirs, kernels="torch").double()
    assert ours.config == config_of(version, kernels="torch")
    inputs = batch()
    logits, loss, grads = step(ours, inputs)
    input_ids, attention_mask, labels = inputs
    expected = theirs(input_ids, attention_mask=attention_mask, labels=labels)
    expected.loss.backward()
    # Both in fp64, but transformers computes its norms' statistics in fp32 whatever the
    # model's dtype: fp32's tolerances (at T5's initialisation: larger weights amplify
    # those differences through the blocks).
    close = dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, **close)
    torch.testing.assert_close(loss, expected.loss, **close)
    their_grads = {name: p.grad for name, p in theirs.named_parameters()}
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], **close, msg=name)


def test_labels_shift_right_as_transformers_does():
    theirs, ours = hf_model("v1.0"), t5.T5(CONFIG)
    labels = batch()[2]
    assert torch.equal(ours.shift_right(labels), theirs._shift_right(labels))


def test_position_buckets_match_transformers():
    relative = torch.arange(-300, 300)
    for bidirectional in (True, False):
        for buckets, distance in ((32, 128), (8, 12), (6, 20)):
            expected = transformers.models.t5.modeling_t5.T5Attention._relative_position_bucket(
                relative, bidirectional, buckets, distance)
            assert torch.equal(t5.relative_position_bucket(relative, bidirectional, buckets, distance), expected)


# -- The kernels against the reference -------------------------------------------------------


def takes_bias_gradient(backend):
    """Whether `backend`'s attention takes the encoder's call: relative_bias, with its
    gradient, beside a boolean key-padding mask ("auto" runs it on a backend that does)."""
    if backend == "auto":
        return True
    padding = torch.ones(1, 1, 1, 9, dtype=torch.bool)
    call = Call("cpu", torch.float32, head_dims=(CONFIG.d_kv, CONFIG.d_kv), mask=padding, mask_grad=False,
                dropout_p=0.0, relative_bias=True, windowed=False, backward=True)
    return ATTENTION.unavailable(backend, call) is None


def check_step_matches_the_reference(backend, version, autocast=None):
    """One training step of kernels=backend against kernels="torch" (truth: the reference
    in fp64; with autocast, a half dtype, the baseline runs under the same autocast over
    fp32 weights). Where the backend does not compute the position bias's gradient,
    forcing it must say so, and the steps are compared with the position-bias tables
    frozen (every other gradient)."""
    state = t5.T5(config_of(version)).state_dict()
    inputs = batch()
    frozen = not takes_bias_gradient(backend)

    def run(kernels, dtype=torch.float32, autocast=None, frozen=frozen):
        model = t5.T5(config_of(version, kernels=kernels))
        model.load_state_dict(state)
        for name, parameter in model.named_parameters():
            parameter.requires_grad_(not (frozen and "relative_attention_bias" in name))
        with torch.autocast("cpu", dtype=autocast, enabled=autocast is not None):
            return step(model.to(dtype), inputs)

    if frozen:
        with pytest.raises(BackendUnavailableError, match="relative_bias"):
            run(backend, frozen=False)
    actual = run(backend, autocast=autocast)
    truth = run("torch", torch.float64)
    baseline = run("torch", autocast=autocast)
    if autocast is not None:
        assert actual[0].dtype == autocast and actual[1].dtype == torch.float32
        assert all(grad.dtype == torch.float32 for grad in actual[2].values())
    assert_step_close(actual, truth, baseline, inputs[2])


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "torch"] + ["auto"])
def test_kernels_match_the_reference_model(backend, version):
    if backend != "auto":
        require_model(MODEL_OPS, backend, "cpu", torch.float32)
    check_step_matches_the_reference(backend, version)


# Triton in fp16: the interpreter gets bf16 wrong (tests/conftest.py).
@pytest.mark.parametrize("backend, half", [("torch", torch.bfloat16), ("native", torch.bfloat16),
                                           ("triton", torch.float16)],
                         ids=["torch-bfloat16", "native-bfloat16", "triton-float16"])
def test_kernels_under_autocast_match_the_reference_model(backend, half):
    require_model(MODEL_OPS, backend, "cpu", half)
    check_step_matches_the_reference(backend, "v1.1", autocast=half)


def test_a_query_that_sees_no_key_gives_zeros_not_nan():
    """An encoder row of padding only (which T5.forward refuses): -inf on every key."""
    model = t5.T5(config_of("v1.1", kernels="torch"))
    input_ids = batch()[0]
    padding = torch.zeros_like(input_ids, dtype=torch.bool)
    padding[1] = True
    assert torch.isfinite(model.encoder(input_ids, padding)).all()


# -- Generation ------------------------------------------------------------------------------


# The Triton interpreter is slow: triton decodes with the caches only, a few tokens, in the
# version that uses every kernel.
GENERATION_RUNS = [
    *((version, backend, use_cache) for version in VERSIONS for backend in ("torch", "native")
      for use_cache in (True, False)),
    ("v1.1", "triton", True),
]


@pytest.mark.parametrize("version, backend, use_cache", GENERATION_RUNS,
                         ids=[f"{v}-{b}-{'cache' if c else 'no_cache'}" for v, b, c in GENERATION_RUNS])
def test_greedy_generation_matches_transformers(version, backend, use_cache):
    require_model(MODEL_OPS, backend, "cpu", torch.float32)
    interpreted = backend == "triton"
    new_tokens = 6 if interpreted else 32
    theirs = hf_model(version, 4.0, num_decoder_layers=SYMMETRIC)
    ours = t5.T5.from_hf(theirs, kernels=backend)
    input_ids, attention_mask, _ = batch(seed=2)
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                               num_beams=1)
    assert (expected[:, 0] == CONFIG.decoder_start_token_id).all()
    expected = expected[:, 1:]
    if not interpreted:
        assert len(set(expected.flatten().tolist())) > 5  # the model does not just repeat one token
    actual = ours.generate(input_ids, new_tokens, attention_mask=attention_mask, use_cache=use_cache)
    assert torch.equal(actual, expected)


def test_generation_stops_at_eos_and_pads_after_it_as_transformers_does():
    """An EOS made likely (its LM-head row scaled up): sequences end at
    different steps, padded after their EOS, and the loop stops when all have."""
    theirs = hf_model("v1.1", 4.0, num_decoder_layers=SYMMETRIC)
    with torch.no_grad():
        theirs.lm_head.weight[CONFIG.eos_token_id] *= 4
    ours = t5.T5.from_hf(theirs, kernels="torch")
    input_ids, attention_mask, _ = batch(seed=3)
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False)[:, 1:]
    assert expected.shape[1] < 32 and (expected == CONFIG.eos_token_id).any(1).all()
    assert len({int(row.eq(CONFIG.eos_token_id).nonzero()[0, 0]) for row in expected}) > 1
    assert torch.equal(ours.generate(input_ids, 32, attention_mask=attention_mask), expected)
    # min_new_tokens holds the EOS back, as transformers' MinNewTokensLengthLogitsProcessor.
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=32, do_sample=False,
                               min_new_tokens=6)[:, 1:]
    assert not (expected[:, :6] == CONFIG.eos_token_id).any() and expected.shape[1] < 32
    assert torch.equal(ours.generate(input_ids, 32, attention_mask=attention_mask, min_new_tokens=6), expected)


def test_generation_under_autocast_caches_in_the_autocast_dtype():
    model = t5.T5(config_of("v1.1", kernels="torch"))
    input_ids, attention_mask, _ = batch()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        cache = model.new_cache(model.encode(input_ids, attention_mask == 0), 4)
        tokens = model.generate(input_ids, 4, attention_mask=attention_mask)
    assert cache.keys.dtype == cache.cross[0][0].dtype == torch.bfloat16
    assert tokens.shape == (3, 4) and tokens.dtype == torch.int64


def test_sampling_is_seeded_and_cache_independent():
    model = t5.T5(config_of("v1.1", kernels="torch"))
    input_ids, attention_mask, _ = batch()
    runs = [model.generate(input_ids, 8, attention_mask=attention_mask, do_sample=True, top_k=20, top_p=0.9,
                           temperature=0.8, seed=5, use_cache=use_cache) for use_cache in (True, False, True)]
    assert runs[0].shape == (3, 8) and torch.equal(runs[0], runs[1]) and torch.equal(runs[0], runs[2])



# -- Training on span-corrupted text ---------------------------------------------------------


def test_span_corruption_training_with_fused_kernels_follows_the_reference():
    """Sixty AdamW steps of a small tiny preset on span-corrupted windows of standard-library
    docstrings (bytes): kernels="native" (the position bias's gradient too) stays within 1%
    of the reference's loss at every tenth step, and the loss falls."""
    text = "\n\n".join(itertools.islice(corpus.standard_library_docstrings(), 300)).encode()
    tokens = np.frombuffer(text, dtype=np.uint8).astype(np.uint16) + 2  # <pad> 0, </s> 1, then the bytes
    config = t5.preset("tiny", vocab_size=384, num_layers=2, d_model=64, d_kv=16, d_ff=128)
    specials = t5_data.T5SpecialIds(pad=0, eos=1, sentinels=torch.arange(383, 283, -1))  # <extra_id_0> the highest
    spans = t5_data.SpanCorruption(tokens, specials, input_length=32)
    batches = [spans.batch([torch.Generator().manual_seed(16 * step + row) for row in range(16)]) for step in range(60)]
    torch.manual_seed(0)
    state = t5.T5(config).state_dict()

    def losses(kernels):
        model = make_model(t5.T5, config, state, kernels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        logged = []
        for batch in batches:
            loss = model(**batch).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            logged.append(loss.item())
        return torch.tensor(logged[::10] + logged[-1:])

    reference, fused = losses("torch"), losses("native")
    assert ((fused - reference).abs() / reference).max() < 0.01, (fused, reference)
    assert fused[-1] < 0.6 * fused[0]

# -- Hugging Face checkpoints in and out -----------------------------------------------------


@pytest.mark.parametrize("version", VERSIONS)
def test_save_hf_writes_a_directory_transformers_reads(tmp_path, version):
    ours = t5.T5(config_of(version, kernels="torch"))
    ours.save_hf(tmp_path)
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path).eval()
    assert type(theirs).__name__ == "T5ForConditionalGeneration"
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids, attention_mask=attention_mask, labels=labels).logits,
                                   ours(input_ids, attention_mask, labels=labels, return_logits=True).logits)
    again = t5.T5.from_hf(tmp_path, kernels="torch")
    assert again.config == ours.config
    theirs.save_pretrained(tmp_path / "theirs")  # what transformers 5 writes of it reads back the same
    assert t5.T5.from_hf(tmp_path / "theirs", kernels="torch").config == ours.config


def test_reads_an_untied_config_whose_head_transformers_left_tied(tmp_path):
    """transformers 5 ties the head of a T5 it builds whatever the config says (without
    scaling its input where the config unties it), and its files then leave the head out."""
    hf_config = transformers.T5Config(**t5_hf.config_to_hf(config_of("v1.1")))
    theirs = transformers.T5ForConditionalGeneration(hf_config).eval()
    theirs.save_pretrained(tmp_path)
    ours = t5.T5.from_hf(tmp_path, kernels="torch")
    assert not ours.config.tie_word_embeddings
    input_ids, attention_mask, labels = batch()
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids, attention_mask, labels=labels, return_logits=True).logits,
                                   theirs(input_ids, attention_mask=attention_mask, labels=labels).logits)


@pytest.mark.parametrize("version", VERSIONS)
def test_loads_a_bare_state_dict_by_its_shapes(version):
    theirs = hf_model(version)
    ours = t5.T5.from_hf(theirs.state_dict(), kernels="torch", relative_attention_max_distance=12)
    assert ours.config == config_of(version, kernels="torch")


def test_mismatched_checkpoints_raise_naming_every_key():
    state = t5.T5(CONFIG).state_dict()
    state.pop("decoder.block.2.layer.2.DenseReluDense.wo.weight")
    state["encoder.block.1.layer.0.SelfAttention.k.weight"] = torch.zeros(3, CONFIG.d_model)
    state["encoder.block.0.layer.0.SelfAttention.extra.weight"] = torch.zeros(1)
    state["decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight"] = torch.zeros(8, 4)  # ignored
    with pytest.raises(ValueError) as error:
        t5.T5.from_hf(state, config=CONFIG)
    for key in ("missing: decoder.block.2.layer.2.DenseReluDense.wo.weight",
                "unexpected: encoder.block.0.layer.0.SelfAttention.extra.weight",
                "encoder.block.1.layer.0.SelfAttention.k.weight (3, 32) (expected (24, 32))"):
        assert key in str(error.value)
    assert "relative_attention_bias" not in str(error.value)
    untied = t5.T5(config_of("v1.0", tie_word_embeddings=False)).state_dict()
    with pytest.raises(ValueError, match="lm_head.weight differs from its shared.weight.*tie_word_embeddings=False"):
        t5.T5.from_hf(untied, config=config_of("v1.0"))


@pytest.mark.parametrize("fields, message", [
    ({"feed_forward_proj": "gated-silu"}, "feed_forward_proj must be one of relu, gated-gelu, got 'gated-silu'"),
    ({"model_type": "mt5"}, "model_type must be 't5', got 'mt5'"),
    ({"architectures": ["T5EncoderModel"]}, "architectures must be \\['T5ForConditionalGeneration'\\]"),
])
def test_variants_this_model_does_not_build_are_refused(fields, message):
    with pytest.raises(ValueError, match=message):
        t5_hf.config_from_hf({**t5_hf.config_to_hf(CONFIG), **fields})


# -- Sizes and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("name, parameters", [("t5-small", 60_506_624), ("flan-t5-small", 76_961_152),
                                              ("tiny", None)])
def test_presets_have_the_parameter_counts_of_transformers(name, parameters):
    config = t5.preset(name)
    with torch.device("meta"):
        ours = t5.T5(config).num_parameters()
        theirs = transformers.T5ForConditionalGeneration(transformers.T5Config(**t5_hf.config_to_hf(config)))
    # transformers 5 ties the head at construction, and unties it only when a checkpoint holds it apart
    expected = theirs.num_parameters() + (0 if config.tie_word_embeddings else theirs.lm_head.weight.numel())
    assert ours == expected and (parameters is None or ours == parameters)


def test_bad_configs_and_inputs_name_the_argument():
    for fields, message in [(dict(feed_forward="gelu"), "feed_forward must be one of relu, gated-gelu"),
                            (dict(eos_token_id=96), "eos_token_id must be an int in \\[0, vocab_size=96\\)"),
                            (dict(relative_attention_num_buckets=2), "relative_attention_num_buckets must be at least"),
                            (dict(kernels="cuda"), "kernels must be one of")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(CONFIG, **fields)
    with pytest.raises(ValueError, match="unknown T5 preset 'big'"):
        t5.preset("big")
    model = t5.T5(CONFIG)
    input_ids, attention_mask, labels = batch()
    with pytest.raises(ValueError, match="decoder_input_ids or labels must be given"):
        model(input_ids)
    with pytest.raises(ValueError, match="attention_mask has a row without tokens \\(row 1\\)"):
        model(input_ids, attention_mask * torch.tensor([[1], [0], [1]]), labels=labels)
    with pytest.raises(ValueError, match="attention_mask must have input_ids' shape"):
        model(input_ids, attention_mask[:, 1:], labels=labels)
    with pytest.raises(ValueError, match="labels must hold values in \\[0, 96\\) or -100, got 96"):
        model(input_ids, labels=labels.masked_fill(labels == -100, 96))
    with pytest.raises(ValueError, match="labels must have shape \\(3, 2\\)"):
        model(input_ids, decoder_input_ids=labels[:, :2].clamp(min=0), labels=labels)
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor, got torch.int32"):
        model(input_ids.int(), labels=labels)
    with pytest.raises(ValueError, match="max_new_tokens must be an int >= 0, got -1"):
        model.generate(input_ids, -1)
    with pytest.raises(ValueError, match="top_p must be None or in"):
        model.generate(input_ids, 4, top_p=0.0)
