"""The Hugging Face BERT checkpoints that vary (models/bert_hf.py): a BertModel loads the
encoder of BertModel (with or without the pooler), BertForPreTraining, BertForMaskedLM and
BertForSequenceClassification checkpoints, with the original gamma/beta names, and without
token-type embeddings; each checked against transformers' outputs on the same weights. What
cannot be loaded is an error naming its keys."""

import json

import pytest
import safetensors.torch
import torch
import transformers
from test_bert import TINY, make_batch, randomise, transformers_config

from lmkern.models import hf
from lmkern.models.bert import BertConfig, BertForPreTraining, BertModel

pytestmark = pytest.mark.usefixtures("one_thread")

CONFIG = BertConfig(**TINY, kernels="torch")
HEADS = {  # transformers' class -> the name of its encoder's outputs
    "BertModel": transformers.BertModel,
    "BertModel without pooler": lambda config: transformers.BertModel(config, add_pooling_layer=False),
    "BertForPreTraining": transformers.BertForPreTraining,
    "BertForMaskedLM": transformers.BertForMaskedLM,
    "BertForSequenceClassification": transformers.BertForSequenceClassification,
}


def their_model(make):
    model = make(transformers_config(CONFIG))
    return randomise(model, torch.Generator().manual_seed(0)).double().eval()


def their_encoder(model):
    return getattr(model, "bert", model)


def assert_encoder_matches(ours, theirs, pooled=True, token_types=True):
    """Our BertModel's hidden states (at real tokens) and pooled output equal transformers'
    (on a batch with padding, and token types unless not token_types)."""
    batch = make_batch(CONFIG, 4, 16, torch.Generator().manual_seed(1))
    names = ("input_ids", "token_type_ids", "attention_mask") if token_types else ("input_ids", "attention_mask")
    inputs = {name: batch[name] for name in names}
    hidden, pooled_output = ours.double().eval()(**inputs)
    expected = their_encoder(theirs)(**inputs)
    real = batch["attention_mask"]
    torch.testing.assert_close(hidden[real], expected.last_hidden_state[real], rtol=1e-10, atol=1e-10)
    if pooled:
        torch.testing.assert_close(pooled_output, expected.pooler_output, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("variant", HEADS)
def test_bert_model_loads_the_encoder_of_each_checkpoint(variant, recwarn):
    theirs = their_model(HEADS[variant])
    has_pooler = their_encoder(theirs).pooler is not None
    ours = BertModel.from_hf(theirs.state_dict(), n_head=CONFIG.n_head, dropout=0.0, kernels="torch")
    assert ours.config == CONFIG
    assert_encoder_matches(ours, theirs, pooled=has_pooler)
    warned = [str(w.message) for w in recwarn if "pooler" in str(w.message)]
    assert bool(warned) == (not has_pooler), warned


def test_original_gamma_and_beta_names_load():
    theirs = their_model(transformers.BertForMaskedLM)
    old = {name.replace("LayerNorm.weight", "LayerNorm.gamma").replace("LayerNorm.bias", "LayerNorm.beta"): t
           for name, t in theirs.state_dict().items()}
    assert any(name.endswith("LayerNorm.gamma") for name in old)
    with pytest.warns(UserWarning, match="pooler"):
        ours = BertModel.from_hf(old, CONFIG)
    assert_encoder_matches(ours, theirs, pooled=False)


def test_checkpoints_without_token_types_add_zeros(tmp_path):
    theirs = their_model(transformers.BertModel)
    with torch.no_grad():
        theirs.embeddings.token_type_embeddings.weight.zero_()  # what a model without token types adds
    state = {name: t for name, t in theirs.state_dict().items() if "token_type" not in name}
    ours = BertModel.from_hf(state, n_head=CONFIG.n_head, dropout=0.0, kernels="torch")
    assert ours.config.type_vocab_size == 1
    assert_encoder_matches(ours, theirs, token_types=False)
    with pytest.raises(ValueError, match=r"token_type_ids must hold values in \[0, 1\), got 1"):
        assert_encoder_matches(ours, theirs)
    # A directory whose config.json says type_vocab_size 0 and whose weights lack the table.
    theirs.float().save_pretrained(tmp_path)
    config = json.loads((tmp_path / hf.CONFIG).read_text())
    (tmp_path / hf.CONFIG).write_text(json.dumps({**config, "type_vocab_size": 0}))
    weights = safetensors.torch.load_file(tmp_path / hf.SAFETENSORS)
    del weights["embeddings.token_type_embeddings.weight"]
    safetensors.torch.save_file(weights, tmp_path / hf.SAFETENSORS, metadata={"format": "pt"})
    ours = BertModel.from_hf(tmp_path, kernels="torch")
    assert ours.config.type_vocab_size == 1
    assert_encoder_matches(ours, theirs.double(), token_types=False)


def test_what_cannot_be_loaded_is_named():
    masked_lm = their_model(transformers.BertForMaskedLM).state_dict()
    # BertForPreTraining needs the pooler and NSP head that BertForMaskedLM lacks.
    with pytest.raises(ValueError, match=r"missing: bert\.pooler\.dense\.weight, bert\.pooler\.dense\.bias, "
                       r"cls\.seq_relationship\.weight, cls\.seq_relationship\.bias"):
        BertForPreTraining.from_hf(masked_lm, CONFIG)
    encoder = their_model(transformers.BertModel).state_dict()
    del encoder["encoder.layer.1.output.dense.weight"]
    with pytest.raises(ValueError, match=r"BertModel checkpoint does not fit the model; missing: "
                       r"encoder\.layer\.1\.output\.dense\.weight$"):
        BertModel.from_hf(encoder, CONFIG)
