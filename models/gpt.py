"""GPT-2 on lmkern's kernels: config, attention, block, model, Hugging Face interop and
generation with a static KV cache.

The architecture is GPT-2's (learned positions, pre-LN blocks, tanh GELU, tied LM head).
The residual stream runs through lmkern's fused ops:

    x, h = dropout(wte + wpe), LN1_0(x)                       add_layer_norm (no residual yet)
    for each block i:
        x = x + dropout(attention(h))
        d = dropout(fc2(gelu(fc1(LN2_i(x)))))                 ffn (LayerNorm + MLP in one op)
        h, x = LN1_{i+1}(x + d), x + d                        add_layer_norm (LN_f after the last)
    loss = cross_entropy(h @ wte.T, targets)                  linear_cross_entropy: no logits

`kernels` picks the backend of every op at once (lmkern.use_backend); "torch" runs the same
model on the reference ops.
"""

import dataclasses
import json
import math
import os
import typing

import torch
import torch.nn.functional as F

import lmkern

# Per layer: the four Conv1D weights of a GPT-2 checkpoint, stored (in, out), ours (out, in).
HF_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")
HF_NAMES = {  # ours -> Hugging Face's, per layer
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's byte-level BPE
    context_length: int = 1024  # learned positions: the longest sequence
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches (GPT-2 trained with 0.1)
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2
    tie_embeddings: bool = True  # the LM head is the token embedding, as GPT-2
    layer_norm_eps: float = 1e-5
    kernels: str = "auto"  # the lmkern backend of every op: auto, torch, triton or native

    def __post_init__(self):
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if self.kernels not in lmkern.backend.CHOICES:
            raise ValueError(f"kernels must be one of {lmkern.backend.CHOICES}, got {self.kernels!r}")


PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, context_length=256),
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset(name, **overrides):
    """A GPTConfig from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class LMOutput(typing.NamedTuple):
    logits: torch.Tensor  # (B, T, V), or None
    loss: torch.Tensor  # scalar, or None


class KVCache:
    """Preallocated keys and values of every layer, and each sequence's length so far."""

    def __init__(self, config, batch, length, device, dtype):
        shape = (config.n_layer, batch, config.n_head, length, config.n_embd // config.n_head)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)


class CausalSelfAttention(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.n_head = config.n_head
        self.qkv = torch.nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, dropout_p, cache=None, layer=None):
        batch, length, width = x.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(x).split(width, dim=2))
        if cache is None:  # (B, nh, T, hs)
            y = lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)
        else:
            y = lmkern.attention_with_kv_cache(q, cache.keys[layer], cache.values[layer], cache.lengths, k, v)
        return self.proj(y.transpose(1, 2).reshape(batch, length, width))


class MLP(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.fc = torch.nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
        self.proj = torch.nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)


class Block(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, h, next_norm, dropout_p, cache=None, layer=None):
        """x: the residual stream, h: LN1(x), both (B, T, C). Returns (next LN(x'), x')."""
        x = x + F.dropout(self.attn(h, dropout_p, cache, layer), dropout_p)
        d = lmkern.ffn(
            x, self.ln_2.weight, self.ln_2.bias, self.mlp.fc.weight, self.mlp.fc.bias, self.mlp.proj.weight,
            self.mlp.proj.bias, eps=self.ln_2.eps, approximate="tanh", dropout_p=dropout_p, residual=False,
        )
        return lmkern.add_layer_norm(d, x, next_norm.weight, next_norm.bias, next_norm.eps)


class GPT(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.context_length, config.n_embd)
        self.blocks = torch.nn.ModuleList(Block(config) for _ in range(config.n_layer))
        self.ln_f = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(self._init_weights)
        for name, parameter in self.named_parameters():  # GPT-2's scaled init of the residual projections
            if name.endswith("proj.weight"):
                torch.nn.init.normal_(parameter, std=0.02 / math.sqrt(2 * config.n_layer))

    @staticmethod
    def _init_weights(module):
        if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
            torch.nn.init.normal_(module.weight, std=0.02)
        if isinstance(module, torch.nn.Linear) and module.bias is not None:
            torch.nn.init.zeros_(module.bias)

    def num_parameters(self, non_embedding=True):
        """Parameters, counting tied ones once; without the position embedding by default (nanoGPT's convention)."""
        count = sum(p.numel() for p in self.parameters())
        return count - self.wpe.weight.numel() if non_embedding else count

    def flops_per_token(self):
        """Training FLOPs per token (forward and backward): 6 N plus attention's 12 L H Q T (PaLM, appendix B)."""
        c = self.config
        return 6 * self.num_parameters() + 12 * c.n_layer * c.n_head * (c.n_embd // c.n_head) * c.context_length

    def estimate_mfu(self, tokens_per_second, peak_flops):
        """Model FLOPs utilisation: achieved training FLOP/s over the device's peak."""
        return self.flops_per_token() * tokens_per_second / peak_flops

    def forward(self, input_ids, targets=None, *, return_logits=None, cache=None):
        """input_ids: (B, T) int64 in [0, vocab_size), T <= context_length.
        targets: (B, T) int64 next tokens (-100 to ignore) for the loss, computed without
        logits. return_logits: whether to also return (B, T, V) logits (default: when there
        are no targets). cache: a KVCache for generation (its lengths are advanced by T).
        """
        self.check_input_ids(input_ids, cache)
        dropout_p = self.config.dropout if self.training else 0.0
        with lmkern.use_backend(self.config.kernels):
            start = 0 if cache is None else cache.lengths[:, None]
            positions = start + torch.arange(input_ids.shape[1], device=input_ids.device)  # (B or 1, T)
            h, x = lmkern.add_layer_norm(
                self.wte(input_ids) + self.wpe(positions), None, self.blocks[0].ln_1.weight,
                self.blocks[0].ln_1.bias, self.config.layer_norm_eps, dropout_p=dropout_p,
            )
            for layer, block in enumerate(self.blocks):
                next_norm = self.blocks[layer + 1].ln_1 if layer + 1 < len(self.blocks) else self.ln_f
                h, x = block(x, h, next_norm, dropout_p, cache, layer)
            loss = None
            if targets is not None:
                loss = lmkern.linear_cross_entropy(h, self.lm_head.weight, targets)
        if cache is not None:
            cache.lengths += input_ids.shape[1]
        want_logits = targets is None if return_logits is None else return_logits
        return LMOutput(self.lm_head(h) if want_logits else None, loss)

    def check_input_ids(self, input_ids, cache=None):
        if input_ids.dim() != 2 or input_ids.dtype != torch.int64:
            raise ValueError(f"input_ids must be (B, T) int64, got {tuple(input_ids.shape)} {input_ids.dtype}")
        longest = input_ids.shape[1] if cache is None else input_ids.shape[1] + int(cache.lengths.max())
        if longest > self.config.context_length:
            raise ValueError(f"the sequence has {longest} tokens: more than context_length {self.config.context_length}")
        if input_ids.numel() and (input_ids.min() < 0 or input_ids.max() >= self.config.vocab_size):
            bad = input_ids[(input_ids < 0) | (input_ids >= self.config.vocab_size)][0]
            raise ValueError(f"input_ids holds {int(bad)}, outside the vocabulary [0, {self.config.vocab_size})")

    # -- Generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, do_sample=False,
                 eos_token_id=None, attention_mask=None, seed=None, use_cache=True):
        """Continues each prompt by up to max_new_tokens tokens, greedily or by sampling.

        input_ids: (B, T) int64 prompts. attention_mask: (B, T), 1 on real tokens, for prompts
        of different lengths padded on either side. temperature, top_k, top_p: as in Hugging
        Face's generate (applied in that order) when do_sample; seed makes sampling
        reproducible. A sequence stops at eos_token_id; later positions repeat it. use_cache:
        attend over a static preallocated KV cache (False recomputes every step).
        Returns (B, N) int64: the new tokens, N <= max_new_tokens (fewer when all stopped).
        """
        was_training = self.training
        self.eval()
        try:
            return self._generate(input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                                  attention_mask, seed, use_cache)
        finally:
            self.train(was_training)

    def _generate(self, input_ids, max_new_tokens, temperature, top_k, top_p, do_sample, eos_token_id,
                  attention_mask, seed, use_cache):
        self.check_input_ids(input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if attention_mask.shape != input_ids.shape:
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, "
                             f"got {tuple(attention_mask.shape)}")
        lengths = attention_mask.sum(1)  # (B,)
        if (lengths == 0).any():
            raise ValueError("every prompt needs at least one token (an attention_mask row is all zeros)")
        longest = int(lengths.max()) + max_new_tokens
        if longest > self.config.context_length:
            raise ValueError(f"prompt and new tokens reach {longest} tokens: more than context_length "
                             f"{self.config.context_length}")
        # Prompts moved to the left (right padding): positions count from 0 in every row.
        order = torch.argsort((attention_mask == 0).to(torch.int8), dim=1, stable=True)
        tokens = torch.gather(input_ids, 1, order)[:, : int(lengths.max())]
        batch, device = tokens.shape[0], tokens.device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        cache = KVCache(self.config, batch, longest, device, self.wte.weight.dtype) if use_cache else None
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens = []
        step_input, last = tokens, lengths - 1
        for _ in range(max_new_tokens):
            if cache is None:
                logits = self(tokens).logits[torch.arange(batch), last]
            else:
                logits = self(step_input, cache=cache).logits[torch.arange(batch), last]
                if not new_tokens:
                    cache.lengths.copy_(lengths)  # the prompt's padding slots are overwritten next
            next_token = pick_token(logits.float(), temperature, top_k, top_p, do_sample, generator)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
                finished |= next_token == eos_token_id
            new_tokens.append(next_token)
            if cache is None:
                lengths = lengths + 1
                tokens = torch.cat([tokens, torch.zeros_like(tokens[:, :1])], dim=1).scatter(
                    1, lengths[:, None] - 1, next_token[:, None])
                last = lengths - 1
            else:
                step_input, last = next_token[:, None], torch.zeros_like(last)
            if finished.all():
                break
        return torch.stack(new_tokens, dim=1)

    # -- Hugging Face interop --------------------------------------------------------------

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A GPT with the weights of a Hugging Face GPT-2 checkpoint: a state dict of
        GPT2LMHeadModel (or GPT2Model), or a local directory with config.json and
        model.safetensors (or pytorch_model.bin). Without `config`, a state dict's sizes give
        it, with GPT-2's 64-wide heads; a directory's config.json gives it. `overrides` set
        other fields (kernels, dropout)."""
        if isinstance(source, (str, os.PathLike)):
            source, hf_config = _read_hf_directory(source)
            config = config or GPTConfig(
                vocab_size=hf_config["vocab_size"], context_length=hf_config["n_positions"],
                n_layer=hf_config["n_layer"], n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
                layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
                tie_embeddings=hf_config.get("tie_word_embeddings", True), **overrides,
            )
        state = {name.removeprefix("transformer."): tensor for name, tensor in source.items()}
        if config is None:
            vocab, width = state["wte.weight"].shape
            layers = 1 + max(int(name.split(".")[1]) for name in state if name.startswith("h."))
            config = GPTConfig(vocab_size=vocab, context_length=state["wpe.weight"].shape[0], n_layer=layers,
                               n_head=width // 64, n_embd=width, **overrides)
        model = cls(config)
        model.load_state_dict(_from_hf_names(state, model), strict=True)
        return model

    def to_hf_state_dict(self):
        """This model's weights under GPT2LMHeadModel's names and layouts."""
        hf = {}
        for name, tensor in self.state_dict().items():
            if name == "lm_head.weight":
                hf[name] = tensor
                continue
            hf_name = _to_hf_name(name)
            hf["transformer." + hf_name] = tensor.T if _is_conv1d(hf_name) else tensor
        return hf


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) with -inf outside the top_k largest and outside the smallest set whose
    probability reaches top_p (at least one token kept), as Hugging Face's warpers."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ascending, order = torch.sort(logits, dim=-1)
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(remove.scatter(1, order, remove), float("-inf"))
    return logits


def pick_token(logits, temperature, top_k, top_p, do_sample, generator):
    """The next token per row of logits (B, V): the argmax, or a sample."""
    if not do_sample:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 when sampling, got {temperature}")
    probabilities = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


def _is_conv1d(hf_name):
    return hf_name.endswith(".weight") and any(f".{conv}." in f".{hf_name}" for conv in HF_CONV1D)


def _to_hf_name(name):
    """blocks.3.attn.qkv.weight -> h.3.attn.c_attn.weight; other names are shared."""
    if not name.startswith("blocks."):
        return name
    _, layer, rest = name.split(".", 2)
    module, parameter = rest.rsplit(".", 1)
    return f"h.{layer}.{HF_NAMES[module]}.{parameter}"


def _from_hf_names(state, model):
    """Hugging Face GPT-2 tensors (without the transformer. prefix) -> this model's state dict,
    Conv1D weights transposed, buffers skipped, every shape checked."""
    ours = model.state_dict()
    loaded = {}
    for name, target in ours.items():
        if name == "lm_head.weight" and model.config.tie_embeddings:
            loaded[name] = state["wte.weight"] if "wte.weight" in state else target
            continue
        hf_name = _to_hf_name(name)
        if hf_name not in state:
            raise ValueError(f"the checkpoint has no {hf_name!r} (for {name}): is it a GPT-2 checkpoint of this size?")
        tensor = state[hf_name].T if _is_conv1d(hf_name) else state[hf_name]
        if tensor.shape != target.shape:
            raise ValueError(
                f"the checkpoint's {hf_name!r} has shape {tuple(state[hf_name].shape)}, but this model "
                f"({model.config.n_layer} layers, width {model.config.n_embd}, vocabulary {model.config.vocab_size}, "
                f"context {model.config.context_length}) needs {tuple(target.shape)}"
            )
        loaded[name] = tensor
    return loaded


def _read_hf_directory(directory):
    config_path = os.path.join(directory, "config.json")
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no config.json (a Hugging Face GPT-2 directory has one)")
    with open(config_path) as file:
        hf_config = json.load(file)
    safetensors_path = os.path.join(directory, "model.safetensors")
    bin_path = os.path.join(directory, "pytorch_model.bin")
    if os.path.isfile(safetensors_path):
        import safetensors.torch

        return safetensors.torch.load_file(safetensors_path), hf_config
    if os.path.isfile(bin_path):
        return torch.load(bin_path, map_location="cpu", weights_only=True), hf_config
    raise FileNotFoundError(f"{directory}: neither model.safetensors nor pytorch_model.bin")
