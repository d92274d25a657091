"""The T5 model's Hugging Face form (for T5.from_hf, to_hf_state_dict and save_hf in
models/t5.py): the config.json of T5ForConditionalGeneration, and the checks of its state
dicts.

Our parameters carry transformers' names and layouts, so the tensors go across as they
are; what differs is which copies of the shared embedding a checkpoint stores (the stacks'
embed_tokens and a tied lm_head are `shared`; save_pretrained leaves them out) and the
cross-attention position-bias table that old checkpoints hold but no model uses."""

import torch

from lmkern.models import hf

WHAT = "the Hugging Face T5 checkpoint"
FEED_FORWARDS = ("relu", "gated-gelu")  # transformers' feed_forward_proj values, T5Config.feed_forward's too
EMBEDDING_COPIES = ("encoder.embed_tokens.weight", "decoder.embed_tokens.weight")
# Old checkpoints hold a position-bias table for the first decoder block's cross-attention,
# which transformers ignores too (T5 has no position bias there).
UNUSED = ("decoder.block.0.layer.1.EncDecAttention.relative_attention_bias.weight",)


def tied_names(config):
    """The names of our state dict that are copies of shared.weight."""
    return EMBEDDING_COPIES + (("lm_head.weight",) if config.tie_word_embeddings else ())


def from_hf_state_dict(checkpoint, config, state):
    """The tensors of a T5ForConditionalGeneration state dict (name -> tensor) under the
    names of our state dict `state` (of a model with this config), the copies of the shared
    embedding filled in where the checkpoint leaves them out: the stacks' embed_tokens and
    lm_head.weight, also where the config does not tie it (transformers 5 ties the head of
    every T5 it builds, and leaves it out of the files of those whose head is still
    `shared`). Raises ValueError naming the keys that are missing, unexpected or
    misshapen, and a copy that differs from shared.weight where the config ties it."""
    copies = EMBEDDING_COPIES + ("lm_head.weight",)
    tensors = hf.take_tensors(checkpoint, state, optional=copies, ignored=UNUSED, what=WHAT)
    shared = tensors["shared.weight"]
    for name in tied_names(config):
        if name in tensors and not torch.equal(tensors[name], shared):
            raise ValueError(f"the checkpoint's {name} differs from its shared.weight, but this model ties them"
                             + (": load it with tie_word_embeddings=False" if name == "lm_head.weight" else ""))
    for name in copies:
        tensors.setdefault(name, shared)
    return tensors


def config_from_hf(hf_config):
    """T5Config's fields from a T5 config.json (a dict). Raises ValueError for a variant
    this model does not build."""
    if hf_config.get("model_type") != "t5":
        raise ValueError(f"config.json's model_type must be 't5', got {hf_config.get('model_type')!r}")
    feed_forward = hf_config.get("feed_forward_proj", "relu")
    if feed_forward not in FEED_FORWARDS:
        raise ValueError(f"config.json's feed_forward_proj must be one of {', '.join(FEED_FORWARDS)}, "
                         f"got {feed_forward!r}")
    architectures = hf_config.get("architectures") or ["T5ForConditionalGeneration"]
    if architectures != ["T5ForConditionalGeneration"]:
        raise ValueError(f"config.json's architectures must be ['T5ForConditionalGeneration'], got {architectures}")
    return dict(
        vocab_size=hf_config["vocab_size"], d_model=hf_config["d_model"], d_kv=hf_config["d_kv"],
        d_ff=hf_config["d_ff"], num_layers=hf_config["num_layers"],
        num_decoder_layers=hf_config.get("num_decoder_layers") or hf_config["num_layers"],
        num_heads=hf_config["num_heads"],
        relative_attention_num_buckets=hf_config.get("relative_attention_num_buckets", 32),
        relative_attention_max_distance=hf_config.get("relative_attention_max_distance", 128),
        feed_forward=feed_forward, layer_norm_epsilon=hf_config.get("layer_norm_epsilon", 1e-6),
        tie_word_embeddings=tied_in_hf(hf_config),
        pad_token_id=hf_config.get("pad_token_id", 0), eos_token_id=hf_config.get("eos_token_id", 1),
        decoder_start_token_id=hf_config.get("decoder_start_token_id", 0),
    )


def tied_in_hf(hf_config):
    """Whether a config.json ties the LM head to the embedding and scales its input.
    transformers 5 keeps the flag as scale_decoder_outputs (its T5Config always reports
    tie_word_embeddings True, untying at load time a head the checkpoint holds apart);
    config.json files written before, and ours, say tie_word_embeddings."""
    return bool(hf_config.get("scale_decoder_outputs", hf_config.get("tie_word_embeddings", True)))


def config_from_state(state):
    """T5Config's fields from a state dict's shapes (the heads from the position-bias
    table, the feed-forward from its weights' names)."""
    table = "encoder.block.0.layer.0.SelfAttention.relative_attention_bias.weight"
    for needed in ("shared.weight", table, "encoder.block.0.layer.0.SelfAttention.q.weight"):
        if needed not in state:
            raise ValueError(f"{WHAT} must hold {needed}: missing")
    vocab_size, width = state["shared.weight"].shape
    buckets, heads = state[table].shape
    gated = "encoder.block.0.layer.1.DenseReluDense.wi_0.weight" in state
    wi = "encoder.block.0.layer.1.DenseReluDense." + ("wi_0" if gated else "wi") + ".weight"
    if wi not in state:
        raise ValueError(f"{WHAT} must hold {wi}: missing")
    lm_head = state.get("lm_head.weight")

    def blocks(stack):
        return 1 + max((int(name.split(".")[2]) for name in state if name.startswith(f"{stack}.block.")), default=-1)

    return dict(
        vocab_size=vocab_size, d_model=width, d_kv=state["encoder.block.0.layer.0.SelfAttention.q.weight"].shape[0]
        // heads, d_ff=state[wi].shape[0], num_layers=blocks("encoder"), num_decoder_layers=blocks("decoder"),
        num_heads=heads, relative_attention_num_buckets=buckets, feed_forward="gated-gelu" if gated else "relu",
        tie_word_embeddings=lm_head is None or torch.equal(lm_head, state["shared.weight"]),
    )


def config_to_hf(config):
    """The Hugging Face config.json (a dict) of a T5ForConditionalGeneration with this T5Config."""
    return {
        "architectures": ["T5ForConditionalGeneration"], "model_type": "t5", "vocab_size": config.vocab_size,
        "d_model": config.d_model, "d_kv": config.d_kv, "d_ff": config.d_ff, "num_layers": config.num_layers,
        "num_decoder_layers": config.num_decoder_layers, "num_heads": config.num_heads,
        "relative_attention_num_buckets": config.relative_attention_num_buckets,
        "relative_attention_max_distance": config.relative_attention_max_distance,
        "feed_forward_proj": config.feed_forward, "layer_norm_epsilon": config.layer_norm_epsilon,
        "tie_word_embeddings": config.tie_word_embeddings, "dropout_rate": config.dropout_rate,
        "initializer_factor": 1.0, "is_encoder_decoder": True, "pad_token_id": config.pad_token_id,
        "eos_token_id": config.eos_token_id, "decoder_start_token_id": config.decoder_start_token_id,
    }
