"""BERT on lmkern's kernels (lmkern.models.bert): every kernel backend against the torch
kernels under the tolerance rule (outputs, loss and every gradient, padding in the batch),
the torch kernels against transformers' BertForPreTraining and BertForSequenceClassification
with the same weights, Hugging Face state dicts and directories both ways, checkpoints of
the parameter names before the fused FFN, ALBERT's options, padding invariance, bad input,
and a short MLM + NSP training run on real text.

Configs are tiny (random weights, nothing downloaded); the Triton interpreter gets the
smallest.
"""

import dataclasses
import json

import numpy as np
import pytest
import torch
import torch.nn.functional as F
import transformers
from conftest import BACKENDS, DEVICES, DTYPES, require
from numerics import assert_close_to_truth, assert_mean_loss_close_to_truth, truth_dtype

import lmkern
from lmkern.models import hf
from lmkern.models.bert import BertConfig, BertForPreTraining, BertForSequenceClassification, BertModel, preset
from lmkern.models.bert_hf import hf_names
from lmkern.models.bert_data import PairBuilder, SpecialIds
from lmkern.models.tokenizer import train_tokenizer

TINY = dict(vocab_size=120, hidden_size=32, n_layer=2, n_head=2, intermediate_size=64, max_position=32, dropout=0.0)
# id -> config fields over TINY (sized_for adapts them to the device and backend)
CASES = {
    "bert": dict(),
    "albert": dict(share_layers=True, embedding_size=16),
    "dropout": dict(dropout=0.2),  # the same masks on every backend, from the same torch seed
}
OPS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")
TO_TRANSFORMERS = dict(vocab_size="vocab_size", hidden_size="hidden_size", n_layer="num_hidden_layers",
                       n_head="num_attention_heads", intermediate_size="intermediate_size",
                       max_position="max_position_embeddings", layer_norm_eps="layer_norm_eps")


def make_batch(config, size, length, generator, device="cpu"):
    """A pretraining batch with random padding (the first sequence full, the others of
    random lengths, padded with id 0), token types, MLM labels (at least one per sequence)
    and NSP labels."""
    lengths = torch.randint(3, length + 1, (size,), generator=generator)
    lengths[0] = length
    attention_mask = torch.arange(length) < lengths[:, None]
    # Id 0 is [PAD], only at padding: Hugging Face's word embedding gives it no gradient.
    input_ids = torch.randint(1, config.vocab_size, (size, length), generator=generator) * attention_mask
    token_type_ids = ((torch.arange(length) >= lengths[:, None] // 2) & attention_mask).long()
    chosen = (torch.rand(size, length, generator=generator) < 0.3) & attention_mask
    chosen[:, 1] = True
    labels = torch.where(chosen, torch.randint(0, config.vocab_size, (size, length), generator=generator), -100)
    batch = dict(input_ids=input_ids, token_type_ids=token_type_ids, attention_mask=attention_mask, labels=labels,
                 next_sentence_label=torch.randint(0, 2, (size,), generator=generator))
    return {name: value.to(device) for name, value in batch.items()}


def randomise(model, generator):
    """Moves every parameter away from its initial value (LayerNorms off one and zero, biases
    off zero), so that the comparisons see each of them."""
    with torch.no_grad():
        for parameter in model.parameters():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=generator))
    return model


def with_kernels(model, kernels, dtype, device="cpu"):
    """A copy of a BertForPreTraining with kernels= set, in dtype on device."""
    copy = BertForPreTraining(dataclasses.replace(model.config, kernels=kernels))
    copy.load_state_dict(model.state_dict())
    return copy.to(device, dtype)


def pretraining_outputs_and_grads(model, batch, seed=0, autocast=None):
    """{name: tensor}: the encoder's output, the MLM and NSP logits, the loss and the gradient of
    every parameter for the loss plus fixed random weights on the other outputs (so that no
    gradient is a near-cancelling sum), the forward under torch.autocast in the dtype
    `autocast` if given. torch is seeded first, so that dropout draws the same masks in
    every run."""
    torch.manual_seed(seed)
    model.train(model.config.dropout > 0)
    device_type = next(model.parameters()).device.type
    with torch.autocast(device_type, dtype=autocast, enabled=autocast is not None):
        out = model(**batch, return_logits=True)
    outputs = dict(hidden_states=out.hidden_states, mlm_logits=out.mlm_logits, nsp_logits=out.nsp_logits)
    generator = torch.Generator().manual_seed(1)
    objective = out.loss + sum((value * torch.randn(value.shape, generator=generator).to(value)).sum()
                               for value in outputs.values())
    names, parameters = zip(*model.named_parameters())
    grads = torch.autograd.grad(objective, parameters)
    results = {**outputs, "loss": out.loss, **{f"grad {name}": grad for name, grad in zip(names, grads)}}
    return {name: value.detach() for name, value in results.items()}


pytestmark = pytest.mark.usefixtures("one_thread")


def require_model(backend, device, dtype, config):
    """Skip, saying why, unless `backend` can run every op of a model of this config here."""
    for op in OPS:
        require(backend, device, dtype, op)
    if backend == "native" and device == "cuda":
        # A call of the model's shapes, mask and dropout asks the attention op itself.
        q = torch.zeros(1, config.n_head, 2, config.hidden_size // config.n_head, device=device, dtype=dtype)
        key_padding = torch.ones(1, 1, 1, 2, dtype=torch.bool, device=device)
        try:
            lmkern.scaled_dot_product_attention(q, q, q, attn_mask=key_padding, dropout_p=config.dropout,
                                                backend="native")
        except lmkern.BackendUnavailableError as error:
            pytest.skip(f"native attention on CUDA: {error}")


def sized_for(device, backend, fields):
    """(config fields, batch size, length) of a case: head dim 64 on CUDA (the native CUDA
    attention's smallest); one layer and 4 x 8 tokens in the Triton interpreter (seconds
    per pass); else 8 x 16 tokens, so that even the pooled output and the NSP head have
    enough elements for their largest error to be a steady statistic."""
    if device == "cuda":
        return {**fields, "hidden_size": 128, "intermediate_size": 256}, 8, 16
    if backend == "triton":
        return {**fields, "n_layer": 1}, 4, 8
    return fields, 8, 16


# -- every backend against the torch kernels ---------------------------------------------------


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", [name for name in BACKENDS if name != "torch"])
@pytest.mark.parametrize("device", DEVICES)
def test_backend_matches_torch_kernels(device, backend, dtype, case):
    fields, size, length = sized_for(device, backend, CASES[case])
    config = BertConfig(**{**TINY, **fields, "kernels": "torch"})
    require_model(backend, device, dtype, config)
    generator = torch.Generator().manual_seed(0)
    model = randomise(BertForPreTraining(config), generator)
    batch = make_batch(config, size, length, generator, device)
    actual = pretraining_outputs_and_grads(with_kernels(model, backend, dtype, device), batch)
    truth = pretraining_outputs_and_grads(with_kernels(model, "torch", truth_dtype(dtype), device), batch)
    baseline = pretraining_outputs_and_grads(with_kernels(model, "torch", dtype, device), batch)
    assert all(value.dtype == dtype for name, value in actual.items() if name != "loss")
    assert_pretraining_matches(actual, truth, baseline, batch)


def assert_pretraining_matches(actual, truth, baseline, batch):
    """pretraining_outputs_and_grads of a backend against those of the reference (truth in
    higher precision, baseline in the same), under the tolerance rule, with the baseline's
    dtypes. linear_cross_entropy keeps its per-row losses in fp32 even for fp64 input: the
    loss's truth comes from the truth's logits, and its baseline error from the row losses."""
    targets = batch["labels"][batch["labels"] != -100]
    truth_rows, baseline_rows = ([F.cross_entropy(outputs["mlm_logits"], targets, reduction="none"),
                                  F.cross_entropy(outputs["nsp_logits"], batch["next_sentence_label"], reduction="none")]
                                 for outputs in (truth, baseline))
    truth["loss"] = truth_rows[0].mean() + truth_rows[1].mean()
    assert_mean_loss_close_to_truth(actual["loss"], truth["loss"], torch.cat(baseline_rows), torch.cat(truth_rows))
    for name, value in actual.items():
        assert value.dtype == baseline[name].dtype, f"{name}: {value.dtype}, expected {baseline[name].dtype}"
        factor = 3.0 if name.startswith("grad") else 2.0  # gradients pass through attention's backward
        if name != "loss":
            assert_close_to_truth(value, truth[name], baseline[name], factor=factor, name=name)


# (backend, autocast dtype): bf16 only where the Triton interpreter does not run.
AUTOCAST_RUNS = [("native", torch.bfloat16), ("native", torch.float16), ("triton", torch.float16)]


@pytest.mark.parametrize("backend, half", AUTOCAST_RUNS, ids=[f"{b}-{str(d)[6:]}" for b, d in AUTOCAST_RUNS])
def test_backend_under_autocast_matches_torch_kernels(backend, half):
    """One pretraining step (dropout and padding included) under torch.autocast over fp32
    weights: the stream stays fp32, the logits come in the autocast dtype, the loss and
    every gradient in fp32, within the tolerance rule of the reference model under the
    same autocast (truth: the reference in fp64)."""
    fields, size, length = sized_for("cpu", backend, CASES["dropout"])
    config = BertConfig(**{**TINY, **fields, "kernels": "torch"})
    require_model(backend, "cpu", half, config)
    generator = torch.Generator().manual_seed(0)
    model = randomise(BertForPreTraining(config), generator)
    batch = make_batch(config, size, length, generator)
    actual = pretraining_outputs_and_grads(with_kernels(model, backend, torch.float32), batch, autocast=half)
    baseline = pretraining_outputs_and_grads(with_kernels(model, "torch", torch.float32), batch, autocast=half)
    truth = pretraining_outputs_and_grads(with_kernels(model, "torch", torch.float64), batch)
    dtypes = {name: value.dtype for name, value in actual.items()}
    assert dtypes.pop("mlm_logits") == dtypes.pop("nsp_logits") == half
    assert set(dtypes.values()) == {torch.float32}
    assert_pretraining_matches(actual, truth, baseline, batch)


# -- the torch kernels against transformers -----------------------------------------------------


def transformers_config(config, **extra):
    fields = {theirs: getattr(config, ours) for ours, theirs in TO_TRANSFORMERS.items()}
    return transformers.BertConfig(**fields, hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0,
                                   attn_implementation="eager", **extra)


def our_grads_by_hf_name(model):
    """Our parameters' gradients under Hugging Face's names (qkv's split in three)."""
    grads = {}
    for name, parameter in model.named_parameters():
        names = hf_names(name)
        grads.update(zip(names, parameter.grad.chunk(len(names))))
    return grads


def assert_grads_match(ours, theirs, tolerance):
    """Every parameter's gradient, within tolerance times the largest of its elements (plus
    1e-12: the key bias's gradient is zero, as softmax ignores what it adds to every score)."""
    theirs_by_name = {name: p.grad for name, p in theirs.named_parameters() if p.grad is not None}
    ours_by_name = our_grads_by_hf_name(ours)
    assert ours_by_name.keys() == theirs_by_name.keys()
    for name, grad in ours_by_name.items():
        expected = theirs_by_name[name]
        torch.testing.assert_close(grad, expected, rtol=0, atol=tolerance * expected.abs().max().item() + 1e-12,
                                   msg=lambda message: f"{name}: {message}")


def test_pretraining_matches_transformers():
    generator = torch.Generator().manual_seed(0)
    config = BertConfig(**TINY, kernels="torch")
    ours = randomise(BertForPreTraining(config), generator).double().eval()
    theirs = transformers.BertForPreTraining(transformers_config(config)).double().eval()
    theirs.load_state_dict(ours.to_hf_state_dict())
    batch = make_batch(config, 4, 16, generator)
    out = ours(**batch, return_logits=True)
    expected = theirs(**batch, output_hidden_states=True)
    real, masked = batch["attention_mask"], batch["labels"] != -100
    # Outputs at real tokens only: what padding's own positions hold is a convention, and
    # nothing there reaches the loss.
    torch.testing.assert_close(out.hidden_states[real], expected.hidden_states[-1][real], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.mlm_logits, expected.prediction_logits[masked], rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.nsp_logits, expected.seq_relationship_logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(ours, theirs, tolerance=1e-10)


@pytest.mark.parametrize("num_labels", [3, 1])
def test_sequence_classification_matches_transformers(num_labels):
    generator = torch.Generator().manual_seed(0)
    config = BertConfig(**TINY, kernels="torch")
    ours = randomise(BertForSequenceClassification(config, num_labels), generator).double().eval()
    theirs = transformers.BertForSequenceClassification(transformers_config(config, num_labels=num_labels))
    theirs = theirs.double().eval()
    theirs.load_state_dict(ours.to_hf_state_dict())
    batch = make_batch(config, 4, 16, generator)
    del batch["labels"], batch["next_sentence_label"]
    labels = torch.randint(0, num_labels, (4,)) if num_labels > 1 else torch.randn(4, dtype=torch.float64)
    out = ours(**batch, labels=labels)
    expected = theirs(**batch, labels=labels)
    torch.testing.assert_close(out.logits, expected.logits, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(out.loss, expected.loss, rtol=1e-10, atol=1e-10)
    out.loss.backward()
    expected.loss.backward()
    assert_grads_match(ours, theirs, tolerance=1e-10)


# -- Hugging Face state dicts and directories ---------------------------------------------------

HF_CLASSES = {
    BertModel: transformers.BertModel,
    BertForPreTraining: transformers.BertForPreTraining,
    BertForSequenceClassification: transformers.BertForSequenceClassification,
}


def hf_weights(model):
    """A transformers model's state dict without its buffers."""
    buffers = {name for name, _ in model.named_buffers()}
    return {name: tensor for name, tensor in model.state_dict().items() if name not in buffers}


@pytest.mark.parametrize("ours_class", HF_CLASSES, ids=lambda cls: cls.__name__)
def test_state_dicts_round_trip_with_transformers(ours_class):
    config = BertConfig(**TINY)
    theirs = HF_CLASSES[ours_class](transformers_config(config, num_labels=3))
    randomise(theirs, torch.Generator().manual_seed(0))
    theirs.tie_weights()
    ours = ours_class.from_hf(theirs.state_dict(), config)  # the buffers too, as state_dict() gives them
    exported = ours.to_hf_state_dict()
    expected = hf_weights(theirs)
    assert exported.keys() == expected.keys()
    for name, tensor in expected.items():
        assert torch.equal(exported[name], tensor), name
    # Without a config, the sizes come from the tensors; the head count cannot, so it is given.
    inferred = ours_class.from_hf(theirs.state_dict(), n_head=config.n_head, dropout=0.0)
    assert inferred.config == config
    if ours_class is BertForSequenceClassification:
        assert inferred.num_labels == 3


def test_bert_model_loads_the_encoder_of_a_pretraining_checkpoint():
    theirs = transformers.BertForPreTraining(transformers_config(BertConfig(**TINY)))
    encoder = BertModel.from_hf(theirs.state_dict(), BertConfig(**TINY))
    for name, tensor in encoder.to_hf_state_dict().items():
        assert torch.equal(tensor, theirs.state_dict()["bert." + name]), name


def test_directories_both_ways(tmp_path):
    config = BertConfig(**TINY, kernels="torch")
    batch = make_batch(config, 3, 16, torch.Generator().manual_seed(0))
    # Theirs, written by save_pretrained (tied decoder left out), read by us.
    theirs = transformers.BertForPreTraining(transformers_config(config)).eval()
    theirs.save_pretrained(tmp_path / "theirs")
    ours = BertForPreTraining.from_hf(tmp_path / "theirs", kernels="torch").eval()
    assert ours.config == dataclasses.replace(config, dropout=0.0)
    torch.testing.assert_close(ours(**batch, return_logits=True).nsp_logits, theirs(**batch).seq_relationship_logits)
    # Ours, written by save_hf, read by from_pretrained.
    ours = randomise(BertForPreTraining(config), torch.Generator().manual_seed(1)).eval()
    ours.save_hf(tmp_path / "ours")
    theirs = transformers.BertForPreTraining.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    masked = batch["labels"] != -100
    expected = theirs(**batch)
    out = ours(**batch, return_logits=True)
    torch.testing.assert_close(out.mlm_logits, expected.prediction_logits[masked])
    torch.testing.assert_close(out.nsp_logits, expected.seq_relationship_logits)
    # pytorch_model.bin, with the gamma and beta names of the original BERT checkpoints.
    old_names = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
                 for name, t in theirs.state_dict().items()}
    (tmp_path / "bin").mkdir()
    torch.save(old_names, tmp_path / "bin" / hf.PYTORCH_BIN)
    (tmp_path / "bin" / hf.CONFIG).write_text((tmp_path / "ours" / hf.CONFIG).read_text())
    from_bin = BertForPreTraining.from_hf(tmp_path / "bin")
    for name, tensor in ours.state_dict().items():
        assert torch.equal(from_bin.state_dict()[name], tensor), name
    classifier = BertForSequenceClassification(config, num_labels=4)
    classifier.save_hf(tmp_path / "classifier")
    theirs = transformers.BertForSequenceClassification.from_pretrained(tmp_path / "classifier")
    assert theirs.num_labels == 4
    assert BertForSequenceClassification.from_hf(tmp_path / "classifier").num_labels == 4


def test_hf_errors_name_the_keys(tmp_path):
    config = BertConfig(**TINY)
    state = transformers.BertForPreTraining(transformers_config(config)).state_dict()
    missing = {name: t for name, t in state.items() if name != "bert.pooler.dense.bias"}
    with pytest.raises(ValueError, match=r"missing: bert\.pooler\.dense\.bias"):
        BertForPreTraining.from_hf(missing, config)
    with pytest.raises(ValueError, match=r"unexpected: bert\.extra\.weight"):
        BertForPreTraining.from_hf({**state, "bert.extra.weight": torch.zeros(1)}, config)
    wrong = {**state, "cls.seq_relationship.weight": torch.zeros(3, 32)}
    with pytest.raises(ValueError, match=r"wrong shape: cls\.seq_relationship\.weight \(3, 32\) \(expected \(2, 32\)"):
        BertForPreTraining.from_hf(wrong, config)
    untied = {**state, "cls.predictions.decoder.weight": torch.zeros(120, 32)}
    with pytest.raises(ValueError, match="decoder.weight differs from its bert.embeddings.word_embeddings.weight"):
        BertForPreTraining.from_hf(untied, config)
    encoder_only = transformers.BertModel(transformers_config(config)).state_dict()
    with pytest.raises(ValueError, match="missing: cls.predictions.bias"):
        BertForPreTraining.from_hf({"bert." + name: t for name, t in encoder_only.items()}, config)
    with pytest.raises(ValueError, match="not a Hugging Face BERT state dict"):
        BertModel.from_hf({"transformer.wte.weight": torch.zeros(3, 4)})
    with pytest.raises(ValueError, match="no Hugging Face BERT form"):
        BertModel(BertConfig(**TINY, share_layers=True)).to_hf_state_dict()
    with pytest.raises(FileNotFoundError, match="no config.json"):
        BertModel.from_hf(tmp_path)
    BertModel(config).save_hf(tmp_path)
    hf_config = json.loads((tmp_path / hf.CONFIG).read_text())
    (tmp_path / hf.CONFIG).write_text(json.dumps({**hf_config, "hidden_act": "relu"}))
    with pytest.raises(ValueError, match="config.json has hidden_act 'relu': this BERT has exact GELU"):
        BertModel.from_hf(tmp_path)


# Layer parameters as checkpoints saved before the FFN was one module name them, in their order then.
OLD_LAYER_NAMES = ["qkv.weight", "qkv.bias", "attn_out.weight", "attn_out.bias", "attn_norm.weight", "attn_norm.bias",
                   "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "ffn_norm.weight", "ffn_norm.bias"]
NEW_NAMES = {"ffn.fc1.": "fc1.", "ffn.fc2.": "fc2.", "ffn.norm.": "ffn_norm."}  # new -> old


def old_name(name):
    for new, old in NEW_NAMES.items():
        name = name.replace(new, old)
    return name


def test_checkpoints_of_the_names_before_the_fused_ffn_load_and_resume():
    model = randomise(BertForPreTraining(BertConfig(**TINY)), torch.Generator().manual_seed(0))
    old = {old_name(name): tensor for name, tensor in model.state_dict().items()}
    assert {"bert.layers.1.fc1.weight", "bert.layers.1.ffn_norm.bias"} <= old.keys()
    loaded = BertForPreTraining(BertConfig(**TINY))
    loaded.load_state_dict(old)
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    # The parameters keep their order, so that an optimizer's state saved before resumes.
    assert [old_name(name) for name, _ in loaded.bert.layers[0].named_parameters()] == OLD_LAYER_NAMES


# -- ALBERT's options ----------------------------------------------------------------------


def test_shared_layers_are_one_layer_at_every_depth():
    generator = torch.Generator().manual_seed(0)
    shared = randomise(BertModel(BertConfig(**TINY, share_layers=True, kernels="torch")), generator)
    assert len(shared.layers) == 1
    unshared = BertModel(BertConfig(**TINY, kernels="torch"))
    state = {name.replace("layers.0.", f"layers.{depth}."): tensor
             for name, tensor in shared.state_dict().items() for depth in range(TINY["n_layer"])}
    unshared.load_state_dict(state)
    input_ids = torch.randint(0, 120, (2, 10), generator=generator)
    for a, b in zip(shared(input_ids), unshared(input_ids)):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_factorised_embeddings():
    model = BertForPreTraining(BertConfig(**TINY, embedding_size=16, kernels="torch"))
    assert model.bert.embeddings.word.weight.shape == (120, 16)
    assert model.bert.embeddings.project.weight.shape == (32, 16)
    assert model.mlm_dense.weight.shape == (16, 32)  # the MLM head maps back to the embedding width
    out = model(torch.randint(0, 120, (2, 10)))
    assert out.mlm_logits.shape == (20, 120) and out.hidden_states.shape == (2, 10, 32)


@pytest.mark.parametrize("name, parameters", [("bert-base", 109_482_240), ("bert-large", 335_141_888)])
def test_presets_have_berts_parameter_counts(name, parameters):
    with torch.device("meta"):  # shapes only: no memory, no initialisation
        model = BertModel(preset(name))
    # transformers' BertModel of bert-base-uncased and bert-large-uncased (with the pooler)
    assert sum(p.numel() for p in model.parameters()) == parameters


def test_unknown_preset_names_the_choices():
    with pytest.raises(ValueError, match="unknown BERT preset 'huge': choose one of tiny, bert-base, bert-large"):
        preset("huge")


# -- padding -----------------------------------------------------------------------------------


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_more_padding_changes_nothing_at_real_tokens(device, backend):
    fields, size, length = sized_for(device, backend, {})
    config = BertConfig(**{**TINY, **fields, "kernels": backend})
    dtype = torch.float16 if device == "cuda" else torch.float32  # what the native CUDA kernels take
    require_model(backend, device, dtype, config)
    generator = torch.Generator().manual_seed(0)
    model = randomise(BertForPreTraining(config), generator).to(device, dtype).eval()
    batch = make_batch(config, size, length, generator, device)
    more = 9  # padding, with ids that must not matter
    padded = {name: torch.cat([value, value.new_zeros(size, more)], dim=1) if value.dim() == 2 else value
              for name, value in batch.items()}
    padded["input_ids"][:, length:] = torch.randint(0, config.vocab_size, (size, more), generator=generator)
    padded["labels"][:, length:] = -100
    with torch.no_grad():
        short, long = model(**batch, return_logits=True), model(**padded, return_logits=True)
    real = batch["attention_mask"]
    tolerance = dict(rtol=8 * torch.finfo(dtype).eps, atol=8 * torch.finfo(dtype).eps)
    torch.testing.assert_close(long.hidden_states[:, :length][real], short.hidden_states[real], **tolerance)
    for name in ("mlm_logits", "nsp_logits", "loss"):
        torch.testing.assert_close(getattr(long, name), getattr(short, name), **tolerance, msg=name)


# -- bad input ---------------------------------------------------------------------------------

BAD_INPUTS = {
    "mask_shape": (dict(attention_mask=torch.ones(2, 7)), ValueError,
                   r"attention_mask must have input_ids' shape \(2, 8\), got \(2, 7\)"),
    "token_type_out_of_range": (dict(token_type_ids=torch.full((2, 8), 2)), ValueError,
                                r"token_type_ids must hold values in \[0, 2\), got 2"),
    "token_type_shape": (dict(token_type_ids=torch.zeros(2, 9, dtype=torch.long)), ValueError,
                         r"token_type_ids must have shape \(2, 8\), got \(2, 9\)"),
    "id_out_of_vocabulary": (dict(input_ids=torch.full((2, 8), 120)), ValueError,
                             r"input_ids must hold values in \[0, 120\), got 120"),
    "negative_id": (dict(input_ids=torch.full((2, 8), -1)), ValueError,
                    r"input_ids must hold values in \[0, 120\), got -1"),
    "float_ids": (dict(input_ids=torch.zeros(2, 8)), TypeError, "input_ids must be an int64 tensor, got torch.float32"),
    "one_dimensional_ids": (dict(input_ids=torch.zeros(8, dtype=torch.long)), ValueError,
                            r"input_ids must have shape \(batch, length\), got \(8,\)"),
    "too_long": (dict(input_ids=torch.zeros(2, 33, dtype=torch.long), attention_mask=None), ValueError,
                 "33 tokens per sequence: more than max_position 32"),
    "labels_shape": (dict(labels=torch.full((2, 9), -100)), ValueError,
                     r"labels must have shape \(2, 8\), got \(2, 9\)"),
    "label_out_of_vocabulary": (dict(labels=torch.full((2, 8), 500)), ValueError,
                                r"labels must hold values in \[0, 120\) or -100, got 500"),
    "nsp_label": (dict(next_sentence_label=torch.tensor([0, 2])), ValueError,
                  r"next_sentence_label must hold values in \[0, 2\) or -100, got 2"),
    "nsp_label_shape": (dict(next_sentence_label=torch.tensor([0, 1, 1])), ValueError,
                        r"next_sentence_label must have shape \(2,\), got \(3,\)"),
}


@pytest.mark.parametrize("case", BAD_INPUTS)
def test_bad_input(case):
    changes, error, message = BAD_INPUTS[case]
    model = BertForPreTraining(BertConfig(**TINY, kernels="torch"))
    batch = {**make_batch(model.config, 2, 8, torch.Generator().manual_seed(0)), **changes}
    with pytest.raises(error, match=message):
        model(**batch)


def test_bad_config_and_classification_labels():
    with pytest.raises(ValueError, match=r"hidden_size \(30\) must be a multiple of n_head \(4\)"):
        BertConfig(hidden_size=30, n_head=4)
    with pytest.raises(ValueError, match="kernels must be one of"):
        BertConfig(kernels="cuda")
    model = BertForSequenceClassification(BertConfig(**TINY, kernels="torch"), num_labels=3)
    with pytest.raises(ValueError, match=r"labels must hold values in \[0, 3\) or -100, got 3"):
        model(torch.zeros(2, 8, dtype=torch.long), labels=torch.tensor([0, 3]))


# -- a short training run on real text ---------------------------------------------------------


@pytest.fixture(scope="module")
def pairs():
    """NSP pairs of 32 tokens from the topic pages of the default corpus (lmkern.models.corpus),
    with a 256-piece WordPiece tokenizer trained on them."""
    from pydoc_data.topics import topics  # the default corpus's first file

    documents = [topics[name] for name in sorted(topics)]
    tokenizer = train_tokenizer(documents, "wordpiece", 256)
    encoded = [encoding.ids for encoding in tokenizer.encode_batch(documents, add_special_tokens=False)]
    tokens = np.concatenate([np.asarray(ids, dtype=np.uint16) for ids in encoded])
    starts = np.concatenate([[0], np.cumsum([len(ids) for ids in encoded])])
    return PairBuilder(tokens, starts, SpecialIds.of(tokenizer), max_length=32), tokenizer.get_vocab_size()


def train(kernels, pairs, vocab_size, steps, batch_size=32):
    """The MLM + NSP loss of every step of a tiny BERT trained by plain AdamW, and the model."""
    torch.manual_seed(0)
    config = BertConfig(vocab_size=vocab_size, hidden_size=64, n_layer=2, n_head=4, intermediate_size=128,
                        max_position=32, dropout=0.0, kernels=kernels)
    model = BertForPreTraining(config)
    optimizer = torch.optim.AdamW(model.parameters(), lr=2e-3, weight_decay=0.01)
    losses = []
    for step in range(steps):
        batch = pairs.batch(batch_size, torch.Generator().manual_seed(step), vocab_size)
        loss = model(**batch).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return losses, model


@torch.no_grad()
def mlm_accuracy(model, pairs, vocab_size):
    """(accuracy at the masked tokens, accuracy of always guessing the commonest masked token)
    on 256 sequences not trained on."""
    batch = pairs.batch(256, torch.Generator().manual_seed(10**6), vocab_size)
    out = model.eval()(**batch, return_logits=True)
    targets = batch["labels"][batch["labels"] != -100]
    commonest = torch.bincount(targets).max().item() / len(targets)
    return (out.mlm_logits.argmax(-1) == targets).float().mean().item(), commonest


def test_fused_kernels_train_like_the_torch_kernels(pairs):
    require_model("native", "cpu", torch.float32, BertConfig())
    builder, vocab_size = pairs
    steps = 300
    reference, _ = train("torch", builder, vocab_size, steps)
    fused, model = train("native", builder, vocab_size, steps)
    for step in range(0, steps, 10):  # the logged steps
        assert abs(fused[step] - reference[step]) <= 0.01 * reference[step], (step, fused[step], reference[step])
    assert np.mean(fused[-50:]) < np.mean(fused[:5]) - 0.5
    accuracy, commonest = mlm_accuracy(model, builder, vocab_size)
    assert accuracy > 2.5 * commonest, f"MLM accuracy {accuracy:.3f}; always the commonest token: {commonest:.3f}"
