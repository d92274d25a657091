"""The Llama model's Hugging Face form (for Llama.from_hf, to_hf_state_dict and save_hf in
models/llama.py): the config.json of LlamaForCausalLM, MistralForCausalLM and
Qwen2ForCausalLM, and the checks of their state dicts.

Our parameters carry transformers' names and layouts, so the tensors go across as they
are; what differs is which of the three families a config is, and the buffers (rotary
inverse frequencies) that older checkpoints store with the weights."""

import torch

from lmkern.models import hf

FAMILIES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM", "qwen2": "Qwen2ForCausalLM"}
ROPE_TYPES = ("default", "linear", "dynamic", "llama3")  # those lmkern.rotary_cache builds
WHAT = "the Hugging Face Llama checkpoint"


def hf_full_name(name):
    """A checkpoint's name under LlamaForCausalLM's: a bare LlamaModel's lack the model. prefix."""
    return name if name.startswith("model.") or name == "lm_head.weight" else "model." + name


def is_hf_buffer(name):
    """The rotary inverse frequencies that some checkpoints store with the weights."""
    return name.endswith("rotary_emb.inv_freq")


def from_hf_state_dict(checkpoint, config, state):
    """The tensors of a Hugging Face state dict (name -> tensor) under the names of our state
    dict `state` (of a model with this config). Raises ValueError naming the keys that are
    missing, unexpected or misshapen, and an LM head the config ties but the checkpoint
    does not."""
    checkpoint = {hf_full_name(name): tensor for name, tensor in checkpoint.items() if not is_hf_buffer(name)}
    tied = ("lm_head.weight",) if config.tie_embeddings else ()
    tensors = hf.take_tensors(checkpoint, state, optional=tied, what=WHAT)
    embedding = tensors["model.embed_tokens.weight"]
    if tied and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], embedding):
        raise ValueError("the checkpoint's lm_head.weight differs from its model.embed_tokens.weight, but this "
                         "model ties them: load it with tie_embeddings=False")
    tensors.setdefault("lm_head.weight", embedding)
    return tensors


def rope_fields(hf_config):
    """(rope_theta, rope_scaling or None) of a config.json: transformers 5 writes them as
    rope_parameters, earlier versions as rope_theta and rope_scaling."""
    rope = hf_config.get("rope_parameters") or {**(hf_config.get("rope_scaling") or {}),
                                                "rope_theta": hf_config.get("rope_theta", 10000.0)}
    rope_type = rope.get("rope_type", rope.get("type", "default"))
    if rope_type not in ROPE_TYPES:
        raise ValueError(f"config.json's rope type must be one of {', '.join(ROPE_TYPES)}, got {rope_type!r}")
    scaling = {name: value for name, value in rope.items() if name not in ("rope_theta", "type")}
    return float(rope.get("rope_theta", 10000.0)), None if rope_type == "default" else {**scaling, "rope_type": rope_type}


def config_from_hf(hf_config):
    """LlamaConfig's fields from a Llama, Mistral or Qwen2 config.json (a dict). Raises
    ValueError for a variant this model does not build."""
    family = hf_config.get("model_type")
    if family not in FAMILIES:
        raise ValueError(f"config.json's model_type must be one of {', '.join(FAMILIES)}, got {family!r}")
    unsupported = [
        f"{name} {hf_config[name]!r}" for name, allowed in (("hidden_act", ("silu",)), ("mlp_bias", (False,)),
                                                           ("attention_bias", (False,)), ("use_sliding_window", (False,)))
        if name in hf_config and hf_config[name] not in allowed and not (family == "qwen2" and name == "attention_bias")
    ]
    if unsupported:
        raise ValueError(f"config.json sets what this model does not build: {', '.join(unsupported)}")
    rope_theta, rope_scaling = rope_fields(hf_config)
    heads = hf_config["num_attention_heads"]
    return dict(
        vocab_size=hf_config["vocab_size"], context_length=hf_config["max_position_embeddings"],
        n_layer=hf_config["num_hidden_layers"], n_head=heads, n_kv_head=hf_config.get("num_key_value_heads") or heads,
        hidden_size=hf_config["hidden_size"], intermediate_size=hf_config["intermediate_size"],
        head_dim=hf_config.get("head_dim") or hf_config["hidden_size"] // heads, rope_theta=rope_theta,
        rope_scaling=rope_scaling, rms_norm_eps=hf_config.get("rms_norm_eps", 1e-6),
        tie_embeddings=hf_config.get("tie_word_embeddings", False), qkv_bias=family == "qwen2",
        sliding_window=hf_config.get("sliding_window") if family == "mistral" else None,
        dropout=hf_config.get("attention_dropout", 0.0),
    )


def config_from_state(state, overrides):
    """LlamaConfig's fields from a state dict's shapes: heads of overrides' head_dim, else
    of hidden_size / overrides' n_head, else 64 wide."""
    state = {hf_full_name(name): tensor for name, tensor in state.items()}
    for needed in ("model.embed_tokens.weight", "model.layers.0.self_attn.q_proj.weight",
                   "model.layers.0.self_attn.k_proj.weight", "model.layers.0.mlp.gate_proj.weight"):
        if needed not in state:
            raise ValueError(f"{WHAT} must hold {needed}: missing")
    vocab_size, width = state["model.embed_tokens.weight"].shape
    queries = state["model.layers.0.self_attn.q_proj.weight"].shape[0]
    head_dim = overrides.get("head_dim") or (queries // overrides["n_head"] if "n_head" in overrides else 64)
    lm_head = state.get("lm_head.weight")
    return dict(
        vocab_size=vocab_size, n_layer=1 + max(int(name.split(".")[2]) for name in state
                                               if name.startswith("model.layers.")),
        n_head=queries // head_dim, n_kv_head=state["model.layers.0.self_attn.k_proj.weight"].shape[0] // head_dim,
        hidden_size=width, intermediate_size=state["model.layers.0.mlp.gate_proj.weight"].shape[0], head_dim=head_dim,
        tie_embeddings=lm_head is None or torch.equal(lm_head, state["model.embed_tokens.weight"]),
        qkv_bias="model.layers.0.self_attn.q_proj.bias" in state,
    )


def config_to_hf(config):
    """The Hugging Face config.json (a dict) of this LlamaConfig: Qwen2's with qkv biases,
    Mistral's with a sliding window, Llama's otherwise."""
    if config.qkv_bias and config.sliding_window is not None:
        raise ValueError("no Hugging Face family has both qkv biases and a sliding window on every layer: "
                         "save_hf needs qkv_bias=False or sliding_window=None")
    family = "qwen2" if config.qkv_bias else "mistral" if config.sliding_window is not None else "llama"
    rope = {"rope_type": "default", **(config.rope_scaling or {}), "rope_theta": config.rope_theta}
    fields = {
        "architectures": [FAMILIES[family]], "model_type": family, "vocab_size": config.vocab_size,
        "hidden_size": config.hidden_size, "intermediate_size": config.intermediate_size,
        "num_hidden_layers": config.n_layer, "num_attention_heads": config.n_head,
        "num_key_value_heads": config.n_kv_head, "head_dim": config.head_dim, "hidden_act": "silu",
        "max_position_embeddings": config.context_length, "rms_norm_eps": config.rms_norm_eps,
        "rope_parameters": rope, "tie_word_embeddings": config.tie_embeddings,
        "attention_dropout": config.dropout, "initializer_range": 0.02, "bos_token_id": None, "eos_token_id": None,
    }
    if family == "mistral":
        fields["sliding_window"] = config.sliding_window
    if family == "qwen2":
        fields["use_sliding_window"] = False
    else:
        fields.update(attention_bias=False, mlp_bias=False)
    return fields
