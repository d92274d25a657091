"""The Llama-style model on lmkern's kernels: kernels="torch" against transformers'
LlamaForCausalLM, MistralForCausalLM (sliding window) and Qwen2ForCausalLM (qkv biases)
with grouped-query attention (logits, loss, every gradient, greedy generation with and
without the cache on prompts of different lengths); every backend against kernels="torch"
(also under autocast); a short training run on real text; Hugging Face directories in and
out; the presets' parameter counts; bad input. Models come from small random configs;
nothing is downloaded."""

import dataclasses
import itertools

import pytest
import torch
from conftest import BACKENDS, DEVICES, DTYPES
from causal_lm import (AUTOCAST_IDS, AUTOCAST_RUNS, batch_of_tokens, check_autocast_step_matches_the_reference,
                       check_kernels_match_the_reference, left_padded, make_model, require_model, step)

from lmkern.models import corpus, llama, llama_hf

transformers = pytest.importorskip("transformers")
transformers.logging.set_verbosity_error()  # random configs' special tokens and padding notes

MODEL_OPS = ("attention", "attention_with_kv_cache", "rms_norm", "apply_rotary", "swiglu", "cross_entropy")
# GQA (4 query heads over 2 key/value heads), a window shorter than the sequences, qkv biases.
CONFIG = llama.LlamaConfig(vocab_size=96, context_length=64, n_layer=2, n_head=4, n_kv_head=2, hidden_size=32,
                           intermediate_size=48, sliding_window=6, qkv_bias=True)
FAMILIES = {  # family -> (transformers' model class name, config class name, the fields it adds)
    "llama": ("LlamaForCausalLM", "LlamaConfig", {}),
    "mistral": ("MistralForCausalLM", "MistralConfig", {"sliding_window": 5}),
    "qwen2": ("Qwen2ForCausalLM", "Qwen2Config", {}),
}

pytestmark = pytest.mark.usefixtures("one_thread")


# -- Pretraining: the kernels against the reference, the reference against transformers ---


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_kernels_match_the_reference_model(device, backend, dtype):
    require_model(MODEL_OPS, backend, device, dtype)
    check_kernels_match_the_reference(llama.Llama, CONFIG, 11, backend, device, dtype)


@pytest.mark.parametrize("backend, half", AUTOCAST_RUNS, ids=AUTOCAST_IDS)
def test_kernels_under_autocast_match_the_reference_model(backend, half):
    require_model(MODEL_OPS, backend, "cpu", half)
    check_autocast_step_matches_the_reference(llama.Llama, CONFIG, 11, backend, half)


def hf_model(family, tie_embeddings=False):
    """A random transformers model of `family` with CONFIG's sizes (GQA), weights scaled up
    (initializer_range 0.2) so that greedy decoding wanders instead of repeating one token."""
    model_class, config_class, extra = FAMILIES[family]
    torch.manual_seed(0)
    config = getattr(transformers, config_class)(
        vocab_size=CONFIG.vocab_size, max_position_embeddings=CONFIG.context_length, num_hidden_layers=CONFIG.n_layer,
        num_attention_heads=CONFIG.n_head, num_key_value_heads=CONFIG.n_kv_head, hidden_size=CONFIG.hidden_size,
        head_dim=CONFIG.hidden_size // CONFIG.n_head, intermediate_size=CONFIG.intermediate_size,
        initializer_range=0.2, tie_word_embeddings=tie_embeddings, rms_norm_eps=1e-6, bos_token_id=None,
        eos_token_id=None, pad_token_id=None, **extra,
    )
    model = getattr(transformers, model_class)(config).eval()
    with torch.no_grad():  # random norm weights and biases, which start as ones and zeros
        for name, parameter in model.named_parameters():
            if name.endswith(("norm.weight", ".bias")):
                parameter.add_(0.3 * torch.randn_like(parameter))
    return model


def from_transformers(theirs, tmp_path, **overrides):
    """Ours, from the directory that theirs.save_pretrained writes (config.json included)."""
    theirs.save_pretrained(tmp_path)
    return llama.Llama.from_hf(tmp_path, **overrides)


@pytest.mark.parametrize("family, tie_embeddings", [("llama", True), ("llama", False), ("mistral", False),
                                                    ("qwen2", True)])
def test_reference_model_matches_transformers(family, tie_embeddings, tmp_path):
    theirs = hf_model(family, tie_embeddings)
    ours = from_transformers(theirs, tmp_path, kernels="torch").double()
    theirs.double()  # after saving: float32 files
    assert ours.config.n_kv_head == CONFIG.n_kv_head and ours.config.tie_embeddings == tie_embeddings
    assert ours.config.sliding_window == FAMILIES[family][2].get("sliding_window")
    assert ours.config.qkv_bias == (family == "qwen2")
    input_ids, _ = batch_of_tokens(CONFIG, 3, 20)
    targets = torch.cat([input_ids[:, 1:], torch.full_like(input_ids[:, :1], -100)], dim=1)  # HF shifts the labels
    logits, loss, grads = step(ours, input_ids, targets)
    expected = theirs(input_ids, labels=input_ids)
    # Both in fp64, but transformers computes RMSNorm's statistics and the rotary angles in
    # fp32 whatever the model's dtype: fp32's tolerances.
    close = dict(rtol=1.3e-6, atol=1e-5)
    torch.testing.assert_close(logits, expected.logits, **close)
    torch.testing.assert_close(loss.float(), expected.loss, **close)  # theirs casts the logits to fp32 for the loss
    expected.loss.backward()
    their_grads = {name: p.grad for name, p in theirs.named_parameters()}
    assert grads.keys() == their_grads.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, their_grads[name], **close, msg=name)


# -- Generation ------------------------------------------------------------------------------

PROMPTS = [[5, 6, 7, 8, 9, 10, 11], [10, 11], [12, 13, 14, 15, 16, 17, 18, 19, 20]]


GENERATION_RUNS = [(family, backend) for family in FAMILIES for backend in BACKENDS if backend != "triton"]
GENERATION_RUNS.append(("mistral", "triton"))  # the interpreter is slow: the family that uses every kernel


@pytest.mark.parametrize("use_cache", [True, False], ids=["cache", "no_cache"])
@pytest.mark.parametrize("family, backend", GENERATION_RUNS, ids=[f"{f}-{b}" for f, b in GENERATION_RUNS])
@pytest.mark.parametrize("device", DEVICES)
def test_greedy_generation_matches_transformers(device, family, backend, use_cache, tmp_path):
    require_model(MODEL_OPS, backend, device, torch.float32)
    interpreted = backend == "triton" and device == "cpu"
    if interpreted and not use_cache:
        pytest.skip("the Triton interpreter is slow: triton decodes with the cache only, a few tokens")
    new_tokens = 6 if interpreted else 32
    theirs = hf_model(family)
    ours = from_transformers(theirs, tmp_path, kernels=backend).to(device)
    theirs.to(device)
    input_ids, attention_mask = (t.to(device) for t in left_padded(PROMPTS))
    expected = theirs.generate(input_ids, attention_mask=attention_mask, max_new_tokens=new_tokens, do_sample=False,
                               pad_token_id=0)[:, input_ids.shape[1]:]
    assert len(set(expected.flatten().tolist())) > 5  # the model does not just repeat one token
    actual = ours.generate(input_ids, new_tokens, attention_mask=attention_mask, use_cache=use_cache)
    assert torch.equal(actual, expected)


def test_decode_at_given_positions_gives_those_rows_logits():
    """What generation's prefill asks: the logits of each prompt's last token only."""
    model = llama.Llama(dataclasses.replace(CONFIG, kernels="torch")).eval()
    input_ids, _ = batch_of_tokens(CONFIG, 2, 9)
    last = torch.tensor([3, 8])
    with torch.no_grad():
        torch.testing.assert_close(model.decode(input_ids, last=last), model.decode(input_ids)[torch.arange(2), last])


def test_the_cache_holds_key_value_heads_only():
    model = llama.Llama(CONFIG)
    cache = model.new_cache(3, 10)
    assert cache.keys.shape == (CONFIG.n_layer, 3, CONFIG.n_kv_head, 10, CONFIG.head_dim) == cache.values.shape


# -- Training on real text -------------------------------------------------------------------


def test_training_with_fused_kernels_follows_the_reference():
    """A hundred AdamW steps on a byte-level model of standard-library docstrings: the
    native kernels' loss stays within 1% of the reference's at every tenth step."""
    text = "\n\n".join(itertools.islice(corpus.standard_library_docstrings(), 500)).encode()
    data = torch.tensor(list(text), dtype=torch.int64)  # bytes: a 256-token vocabulary
    config = llama.LlamaConfig(vocab_size=256, context_length=32, n_layer=2, n_head=4, n_kv_head=2, hidden_size=64,
                               intermediate_size=160, sliding_window=16)
    starts = torch.randint(0, len(data) - config.context_length - 1, (100, 16),
                           generator=torch.Generator().manual_seed(0))
    windows = data[starts[..., None] + torch.arange(config.context_length + 1)]
    state = llama.Llama(config).state_dict()

    def losses(kernels):
        model = make_model(llama.Llama, config, state, kernels)
        optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.1)
        logged = []
        for window in windows:
            loss = model(window[:, :-1], window[:, 1:]).loss
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            logged.append(loss.item())
        return torch.tensor(logged[::10] + logged[-1:])

    reference, fused = losses("torch"), losses("native")
    assert ((fused - reference).abs() / reference).max() < 0.01, (fused, reference)
    assert fused[-1] < 0.6 * fused[0]


# -- Hugging Face checkpoints in and out -----------------------------------------------------


@pytest.mark.parametrize("family, tie_embeddings", [("llama", True), ("mistral", False), ("qwen2", False)])
def test_save_hf_writes_a_directory_transformers_reads(tmp_path, family, tie_embeddings):
    ours = from_transformers(hf_model(family, tie_embeddings), tmp_path / "theirs", kernels="torch")
    ours.save_hf(tmp_path / "ours")
    theirs = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "ours")
    assert type(theirs).__name__ == FAMILIES[family][0]
    input_ids, _ = batch_of_tokens(CONFIG, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(theirs(input_ids).logits, ours(input_ids).logits)
    again = llama.Llama.from_hf(tmp_path / "ours", kernels="torch")
    assert again.config == ours.config


def test_loads_a_bare_state_dict_with_shapes_and_overrides():
    theirs = hf_model("qwen2")
    ours = llama.Llama.from_hf(theirs.model.state_dict() | {"lm_head.weight": theirs.lm_head.weight},
                               kernels="torch", head_dim=CONFIG.head_dim, context_length=CONFIG.context_length,
                               rms_norm_eps=1e-6)
    assert (ours.config.n_head, ours.config.n_kv_head, ours.config.qkv_bias) == (CONFIG.n_head, CONFIG.n_kv_head, True)
    input_ids, _ = batch_of_tokens(CONFIG, 2, 12)
    with torch.no_grad():
        torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits)


def test_mismatched_checkpoints_raise_naming_every_key():
    state = llama.Llama(CONFIG).state_dict()
    state.pop("model.layers.1.mlp.up_proj.weight")
    state["model.layers.0.self_attn.k_proj.weight"] = torch.zeros(3, CONFIG.hidden_size)
    state["model.layers.0.self_attn.extra.weight"] = torch.zeros(1)
    with pytest.raises(ValueError) as error:
        llama.Llama.from_hf(state, config=CONFIG)
    for key in ("missing: model.layers.1.mlp.up_proj.weight", "unexpected: model.layers.0.self_attn.extra.weight",
                "model.layers.0.self_attn.k_proj.weight (3, 32) (expected (16, 32))"):
        assert key in str(error.value)


@pytest.mark.parametrize("fields, message", [
    ({"hidden_act": "gelu"}, "hidden_act 'gelu'"),
    ({"mlp_bias": True}, "mlp_bias True"),
    ({"model_type": "gpt2"}, "model_type must be one of llama, mistral, qwen2, got 'gpt2'"),
    ({"rope_parameters": {"rope_type": "yarn", "rope_theta": 1e4}}, "rope type must be one of"),
])
def test_configs_this_model_does_not_build_are_refused(fields, message):
    hf_config = {**llama_hf.config_to_hf(CONFIG.__class__(**{**dataclasses.asdict(CONFIG), "sliding_window": None})),
                 **fields}
    with pytest.raises(ValueError, match=message):
        llama_hf.config_from_hf(hf_config)


def test_legacy_rope_fields_are_read():
    theta, scaling = llama_hf.rope_fields({"rope_theta": 5e5, "rope_scaling": {"type": "linear", "factor": 2.0}})
    assert theta == 5e5 and scaling == {"factor": 2.0, "rope_type": "linear"}
    assert llama_hf.rope_fields({}) == (10000.0, None)


# -- Sizes and bad input ---------------------------------------------------------------------


@pytest.mark.parametrize("name, parameters", [("llama-3.2-1b", 1_235_814_400), ("qwen2-0.5b", 494_032_768),
                                              ("mistral-7b", 7_241_732_096)])
def test_presets_have_the_parameter_counts_of_their_checkpoints(name, parameters):
    with torch.device("meta"):
        assert llama.Llama(llama.preset(name)).num_parameters() == parameters


def test_bad_configs_and_inputs_name_the_argument():
    for fields, message in [(dict(n_kv_head=3), "n_head \\(4\\) must be a multiple of n_kv_head \\(3\\)"),
                            (dict(head_dim=7), "head_dim must be even"), (dict(sliding_window=0), "sliding_window"),
                            (dict(kernels="cuda"), "kernels must be one of")]:
        with pytest.raises(ValueError, match=message):
            dataclasses.replace(CONFIG, **fields)
    with pytest.raises(ValueError, match="unknown Llama preset 'big'"):
        llama.preset("big")
    model = llama.Llama(CONFIG)
    with pytest.raises(ValueError, match="input_ids reach 65 tokens per sequence: more than context_length 64"):
        model(torch.zeros(1, 65, dtype=torch.int64))
    with pytest.raises(ValueError, match="input_ids must hold values in \\[0, 96\\), got 96"):
        model(torch.full((1, 4), 96))
    with pytest.raises(TypeError, match="input_ids must be an int64 tensor, got torch.int32"):
        model(torch.zeros(1, 4, dtype=torch.int32))
