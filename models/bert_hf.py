"""BERT's Hugging Face form (for from_hf, to_hf_state_dict and save_hf of the models in
models/bert.py): the parameter names of BertModel, BertForPreTraining and
BertForSequenceClassification, and their config.json.

Ours keep the attention's query, key and value as one (3H, H) matrix, Hugging Face's as
three: our qkv goes across as three views, stacked on dim 0 coming back."""

import warnings

import torch

from lmkern.models import hf

HF_NAMES = {  # our module -> Hugging Face's, outside the encoder layers
    "embeddings.word": "embeddings.word_embeddings",
    "embeddings.position": "embeddings.position_embeddings",
    "embeddings.token_type": "embeddings.token_type_embeddings",
    "embeddings.norm": "embeddings.LayerNorm",
    "pooler": "pooler.dense",
    "mlm_dense": "cls.predictions.transform.dense",
    "mlm_norm": "cls.predictions.transform.LayerNorm",
    "nsp": "cls.seq_relationship",
    "classifier": "classifier",
}
HF_LAYER_NAMES = {  # per encoder layer: ours -> Hugging Face's, stacked on dim 0 in this order
    "qkv": ("attention.self.query", "attention.self.key", "attention.self.value"),
    "attn_out": ("attention.output.dense",),
    "attn_norm": ("attention.output.LayerNorm",),
    "ffn.fc1": ("intermediate.dense",),
    "ffn.fc2": ("output.dense",),
    "ffn.norm": ("output.LayerNorm",),
}


def hf_names(name):
    """Our state-dict name -> Hugging Face's names of the parts of that tensor, which are
    stacked on dim 0: bert.layers.3.qkv.bias -> [bert.encoder.layer.3.attention.self.query.bias,
    ... .key.bias, ... .value.bias]; mlm_dense.weight -> [cls.predictions.transform.dense.weight]."""
    prefix = "bert." if name.startswith("bert.") else ""
    name = name.removeprefix(prefix)
    if name == "mlm_bias":
        return ["cls.predictions.bias"]
    module, parameter = name.rsplit(".", 1)
    if module.startswith("layers."):
        _, index, layer_module = module.split(".", 2)
        return [f"{prefix}encoder.layer.{index}.{part}.{parameter}" for part in HF_LAYER_NAMES[layer_module]]
    return [f"{prefix}{HF_NAMES[module]}.{parameter}"]


def current_hf_name(name):
    """Original BERT checkpoints call the LayerNorm parameters gamma and beta."""
    for old, new in ((".gamma", ".weight"), (".beta", ".bias")):
        if "LayerNorm" in name and name.endswith(old):
            return name.removesuffix(old) + new
    return name


def to_hf_state_dict(config, state, tied):
    """Our state dict under the Hugging Face names (the query, key and value views of our
    qkv), with the tied copies: tied maps Hugging Face's name of a copy to our name of the
    tensor it copies."""
    check_hf_architecture(config)
    hf_state = {}
    for name, tensor in state.items():
        names = hf_names(name)
        hf_state.update(zip(names, tensor.chunk(len(names))))
    hf_state.update({copy: hf_state[hf_names(name)[0]] for copy, name in tied.items()})
    return hf_state


def from_hf_state_dict(checkpoint, config, state, prefix, tied, what):
    """The tensors of a Hugging Face state dict under the names of our state dict `state`
    (of a model with this config). prefix: of the encoder's names in the Hugging Face
    model ("bert.", or "" for BertModel, which takes the encoder of a checkpoint with
    heads: BertForPreTraining, BertForMaskedLM, BertForSequenceClassification, ...); tied:
    as for to_hf_state_dict. What checkpoints may lack: a BertModel's pooler (transformers'
    add_pooling_layer=False, BertForMaskedLM's encoder), whose weights then stay the
    model's own with a warning; the token-type embeddings (type_vocab_size 0), which then
    add zeros. Raises ValueError naming the missing, unexpected and misshapen keys of
    `what`, and an untied copy."""
    checkpoint = {current_hf_name(name): tensor for name, tensor in checkpoint.items()}
    if not prefix and any(name.startswith("bert.") for name in checkpoint):  # a BertModel from a model with heads
        checkpoint = {name.removeprefix("bert."): t for name, t in checkpoint.items() if name.startswith("bert.")}
    token_type = f"{prefix}embeddings.token_type_embeddings.weight"
    if token_type in checkpoint and checkpoint[token_type].shape[0] == 0:  # type_vocab_size 0: no token types
        del checkpoint[token_type]
    pooler = [f"pooler.dense.{parameter}" for parameter in ("weight", "bias")] if not prefix else []
    buffers = (f"{prefix}embeddings.position_ids", f"{prefix}embeddings.token_type_ids")
    expected = to_hf_state_dict(config, state, tied)
    tensors = hf.take_tensors(checkpoint, expected, optional=[*tied, token_type, *pooler], ignored=buffers, what=what)
    for copy, name in tied.items():
        if copy in tensors and not torch.equal(tensors[copy], tensors[hf_names(name)[0]]):
            raise ValueError(f"the checkpoint's {copy} differs from its {hf_names(name)[0]}: this model ties them")
    tensors.setdefault(token_type, torch.zeros_like(expected[token_type]))
    absent = [name for name in pooler if name not in tensors]
    if absent:
        warnings.warn(f"{what} has no {', '.join(absent)}: the pooled output comes from untrained weights "
                      "(the hidden states are the checkpoint's)", stacklevel=3)
        tensors.update({name: expected[name] for name in absent})
    return {name: torch.cat([tensors[hf_name] for hf_name in hf_names(name)]) for name in state}


def check_hf_architecture(config):
    """Raises ValueError for a config that Hugging Face's BERT cannot hold (ALBERT's options)."""
    if config.share_layers or config.embedding_size != config.hidden_size:
        raise ValueError("Hugging Face's BERT has neither shared layers nor factorised embeddings: a model with "
                         f"share_layers={config.share_layers}, embedding_size={config.embedding_size} "
                         f"(hidden_size {config.hidden_size}) has no Hugging Face BERT form")


def config_from_hf(hf_config):
    """BertConfig's fields from a Hugging Face BERT config.json (a dict). Hugging Face's
    hidden_dropout_prob gives our one dropout."""
    if hf_config.get("model_type", "bert") != "bert":
        raise ValueError(f"config.json describes a {hf_config['model_type']!r} model, not 'bert'")
    if hf_config.get("hidden_act", "gelu") != "gelu":
        raise ValueError(f"config.json has hidden_act {hf_config['hidden_act']!r}: this BERT has exact GELU ('gelu')")
    if hf_config.get("position_embedding_type", "absolute") != "absolute":
        raise ValueError(f"config.json has position_embedding_type {hf_config['position_embedding_type']!r}: this "
                         "BERT has absolute (learned) positions")
    return dict(
        vocab_size=hf_config["vocab_size"], hidden_size=hf_config["hidden_size"],
        n_layer=hf_config["num_hidden_layers"], n_head=hf_config["num_attention_heads"],
        intermediate_size=hf_config["intermediate_size"], max_position=hf_config["max_position_embeddings"],
        type_vocab_size=max(1, hf_config.get("type_vocab_size", 2)),  # 0: no token types, one row of zeros
        dropout=hf_config.get("hidden_dropout_prob", 0.1),
        layer_norm_eps=hf_config.get("layer_norm_eps", 1e-12),
    )


def config_from_state(checkpoint):
    """BertConfig's fields from the shapes of a Hugging Face BERT state dict, with 64-wide
    heads (BERT's)."""
    state = {current_hf_name(name).removeprefix("bert."): tensor for name, tensor in checkpoint.items()}
    word = "embeddings.word_embeddings.weight"
    if word not in state or "encoder.layer.0.intermediate.dense.weight" not in state:
        raise ValueError(f"not a Hugging Face BERT state dict: it has no {word} or encoder.layer.0")
    vocab, width = state[word].shape
    return dict(
        vocab_size=vocab, hidden_size=width, n_head=max(1, width // 64),
        n_layer=1 + max(int(name.split(".")[2]) for name in state if name.startswith("encoder.layer.")),
        intermediate_size=state["encoder.layer.0.intermediate.dense.weight"].shape[0],
        max_position=state["embeddings.position_embeddings.weight"].shape[0],
        type_vocab_size=max(1, len(state.get("embeddings.token_type_embeddings.weight", ()))),  # absent: zeros
    )


def config_to_hf(config, architecture):
    """The Hugging Face config.json (a dict) of a model of `architecture` with this config."""
    check_hf_architecture(config)
    return {
        "architectures": [architecture], "model_type": "bert", "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "num_hidden_layers": config.n_layer,
        "num_attention_heads": config.n_head, "intermediate_size": config.intermediate_size,
        "hidden_act": "gelu", "hidden_dropout_prob": config.dropout, "attention_probs_dropout_prob": config.dropout,
        "max_position_embeddings": config.max_position, "type_vocab_size": config.type_vocab_size,
        "layer_norm_eps": config.layer_norm_eps, "initializer_range": 0.02, "pad_token_id": 0,
        "tie_word_embeddings": True,
    }
