"""GPT's Hugging Face form (for GPT.from_hf, to_hf_state_dict and save_hf in models/gpt.py):
GPT2LMHeadModel's parameter names and layouts, and its config.json.

Our weights are torch.nn.Linear's, (out, in); Hugging Face's GPT-2 stores the four Conv1D
weights of each block (in, out), so they go across transposed (views, not copies)."""

import torch

from lmkern.models import hf

HF_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # their weights are stored (in, out)
HF_NAMES = {  # ours -> Hugging Face's, in each block
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "mlp.norm": "ln_2",
    "mlp.fc1": "mlp.c_fc",
    "mlp.fc2": "mlp.c_proj",
}
WHAT = "the Hugging Face GPT-2 checkpoint"


def hf_name(name):
    """Our parameter name -> GPT2LMHeadModel's: blocks.3.attn.qkv.weight ->
    transformer.h.3.attn.c_attn.weight, wte.weight -> transformer.wte.weight."""
    if name == "lm_head.weight":
        return name
    if name.startswith("blocks."):
        _, layer, rest = name.split(".", 2)
        module, parameter = rest.rsplit(".", 1)
        name = f"h.{layer}.{HF_NAMES[module]}.{parameter}"
    return "transformer." + name


def hf_layout(hf_name, tensor):
    """A tensor in the other side's layout: Conv1D weights transposed (a view), others as they are."""
    return tensor.T if hf_name.endswith(tuple(f".{conv}.weight" for conv in HF_CONV1D)) else tensor


def hf_full_name(name):
    """A checkpoint's name under GPT2LMHeadModel's: GPT2Model's (and OpenAI's original
    checkpoints') lack the transformer. prefix."""
    return name if name.startswith("transformer.") or name == "lm_head.weight" else "transformer." + name


def is_hf_buffer(name):
    """The causal-mask buffers that old GPT-2 checkpoints store with the weights."""
    return name.endswith((".attn.bias", ".attn.masked_bias"))


def to_hf_state_dict(config, state):
    """Our state dict under GPT2LMHeadModel's names and layouts (views, not copies: the
    Conv1D weights are transposes of ours; a tied lm_head.weight is wte's)."""
    if not config.bias:
        raise ValueError("Hugging Face's GPT-2 has biases: to_hf_state_dict needs config.bias=True, got False")
    return {hf_name(name): hf_layout(hf_name(name), tensor) for name, tensor in state.items()}


def from_hf_state_dict(checkpoint, config, state):
    """The tensors of a GPT2LMHeadModel or GPT2Model state dict (name -> tensor) under the
    names of our state dict `state` (of a model with this config), in our layouts; the
    attention's mask buffers of old checkpoints are skipped. Raises ValueError naming the
    keys that are missing, unexpected or misshapen, and an LM head the config ties but the
    checkpoint does not."""
    checkpoint = {hf_full_name(name): tensor for name, tensor in checkpoint.items() if not is_hf_buffer(name)}
    tied = ("lm_head.weight",) if config.tie_embeddings else ()
    tensors = hf.take_tensors(checkpoint, to_hf_state_dict(config, state), optional=tied, what=WHAT)
    embedding = tensors["transformer.wte.weight"]
    if tied and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], embedding):
        raise ValueError("the checkpoint's lm_head.weight differs from its transformer.wte.weight, but this "
                         "model ties them: load it with tie_embeddings=False")
    tensors.setdefault("lm_head.weight", embedding)
    return {name: hf_layout(hf_name(name), tensors[hf_name(name)]) for name in state}


def config_from_hf(hf_config):
    """GPTConfig's fields from a Hugging Face GPT-2 config.json (a dict). Raises ValueError
    for a GPT-2 variant this model does not build."""
    if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json's activation_function must be GELU's tanh approximation (gelu_new), "
                         f"got {hf_config['activation_function']!r}")
    if hf_config.get("n_inner") not in (None, 4 * hf_config["n_embd"]):
        raise ValueError(f"config.json's n_inner must be null or 4 * n_embd = {4 * hf_config['n_embd']}, "
                         f"got {hf_config['n_inner']}")
    return dict(
        vocab_size=hf_config["vocab_size"], context_length=hf_config["n_positions"], n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
    )


def config_from_state(state):
    """GPTConfig's fields from a GPT-2 state dict's shapes (n_head = n_embd / 64, as every
    GPT-2)."""
    state = {hf_full_name(name): tensor for name, tensor in state.items()}
    for needed in ("transformer.wte.weight", "transformer.wpe.weight"):
        if needed not in state:
            raise ValueError(f"{WHAT} must hold {needed}: missing")
    vocab_size, width = state["transformer.wte.weight"].shape
    layers = 1 + max((int(name.split(".")[2]) for name in state if name.startswith("transformer.h.")), default=-1)
    lm_head = state.get("lm_head.weight")
    return dict(
        vocab_size=vocab_size, context_length=state["transformer.wpe.weight"].shape[0], n_layer=layers,
        n_head=max(1, width // 64), n_embd=width,
        tie_embeddings=lm_head is None or torch.equal(lm_head, state["transformer.wte.weight"]),
    )


def config_to_hf(config):
    """The Hugging Face config.json (a dict) of a GPT2LMHeadModel with this GPTConfig."""
    return {
        "architectures": ["GPT2LMHeadModel"], "model_type": "gpt2", "vocab_size": config.vocab_size,
        "n_positions": config.context_length, "n_layer": config.n_layer, "n_head": config.n_head,
        "n_embd": config.n_embd, "n_inner": None, "activation_function": "gelu_new",
        "resid_pdrop": config.dropout, "embd_pdrop": config.dropout, "attn_pdrop": config.dropout,
        "layer_norm_epsilon": config.layer_norm_eps, "initializer_range": 0.02,
        "tie_word_embeddings": config.tie_embeddings, "bos_token_id": None, "eos_token_id": None,
    }
