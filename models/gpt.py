"""GPT-2 on lmkern's kernels: config, KV cache, attention, block, model.

The architecture is GPT-2's (learned positions, pre-LN blocks, tanh GELU, tied LM head):

    x = dropout(wte(tokens) + wpe(positions))
    for each block:
        x = x + attn(ln_1(x))         lmkern.nn.LayerNorm, scaled_dot_product_attention
        x = x + mlp(ln_2(x))          lmkern.nn.FusedFFN: ln_2, the MLP and the residual add, one op
    loss = cross_entropy(ln_f(x) @ wte.T, targets)          linear_cross_entropy: no (B, T, V) logits

`kernels` picks the backend of every op at once (lmkern.use_backend); "torch" runs the same
model on the reference ops. Forward's checks, the KV cache and generation:
models/generation.py (CausalLM). Hugging Face's names, layouts and config: models/gpt_hf.py.
"""

import dataclasses
import math

import torch
import torch.nn.functional as F

import lmkern
from lmkern.models import gpt_hf, hf
from lmkern.models.common import init_weights, load_renamed
from lmkern.models.generation import CausalLM


@dataclasses.dataclass
class GPTConfig:
    vocab_size: int = 50257  # GPT-2's byte-level BPE (not padded to a multiple of 64: checkpoints load as they are)
    context_length: int = 1024  # learned positions: the longest sequence
    n_layer: int = 12
    n_head: int = 12
    n_embd: int = 768
    dropout: float = 0.0  # on embeddings, attention probabilities and residual branches (GPT-2 trained with 0.1)
    bias: bool = True  # biases in the linear layers and LayerNorms, as GPT-2 (Hugging Face interop needs them)
    tie_embeddings: bool = True  # the LM head is the token embedding, as GPT-2
    layer_norm_eps: float = 1e-5  # GPT-2's
    kernels: str = "auto"  # the lmkern backend of every op: auto, torch, triton or native

    def __post_init__(self):
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_embd"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_embd % self.n_head:
            raise ValueError(f"n_embd ({self.n_embd}) must be a multiple of n_head ({self.n_head})")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kernels not in lmkern.backend.CHOICES:
            raise ValueError(f"kernels must be one of {lmkern.backend.CHOICES}, got {self.kernels!r}")


PRESETS = {
    "tiny": dict(n_layer=4, n_head=4, n_embd=128, context_length=256),  # trains on a CPU in minutes
    "gpt2": dict(n_layer=12, n_head=12, n_embd=768),  # 124M parameters
    "gpt2-medium": dict(n_layer=24, n_head=16, n_embd=1024),  # 350M
    "gpt2-large": dict(n_layer=36, n_head=20, n_embd=1280),  # 774M
    "gpt2-xl": dict(n_layer=48, n_head=25, n_embd=1600),  # 1558M
}


def preset(name, **overrides):
    """A GPTConfig from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown GPT preset {name!r}: choose one of {', '.join(PRESETS)}")
    return GPTConfig(**{**PRESETS[name], **overrides})


class CausalSelfAttention(torch.nn.Module):
    """Multi-head causal self-attention of block `layer` (its place in a KVCache)."""

    def __init__(self, config, layer):
        super().__init__()
        self.n_head, self.dropout, self.layer = config.n_head, config.dropout, layer
        self.qkv = torch.nn.Linear(config.n_embd, 3 * config.n_embd, bias=config.bias)
        self.proj = torch.nn.Linear(config.n_embd, config.n_embd, bias=config.bias)

    def forward(self, x, cache=None):
        """x: (B, T, C) -> (B, T, C). With a cache (no gradient), appends this call's keys and
        values to the cache and attends over all of it."""
        batch, length, width = x.shape  # (B, T, C)
        q, k, v = self.qkv(x).split(width, dim=2)  # (B, T, C) each
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in (q, k, v))  # (B, nh, T, hs)
        dropout_p = self.dropout if self.training else 0.0
        if cache is None:
            y = lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, dropout_p=dropout_p)  # (B, nh, T, hs)
        else:
            y = lmkern.attention_with_kv_cache(q, cache.keys[self.layer], cache.values[self.layer], cache.lengths,
                                               k, v)
        y = y.transpose(1, 2).reshape(batch, length, width)  # (B, T, C): the heads side by side again
        return F.dropout(self.proj(y), dropout_p)


class Block(torch.nn.Module):
    """A pre-LN transformer block. Its MLP is one fused module that owns ln_2 (as mlp.norm)
    and adds its own residual."""

    def __init__(self, config, layer):
        super().__init__()
        self.ln_1 = lmkern.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config, layer)
        self.mlp = lmkern.nn.FusedFFN(config.n_embd, 4 * config.n_embd, eps=config.layer_norm_eps, approximate="tanh",
                                      dropout=config.dropout, prenorm=True, residual=True, bias=config.bias)
        # Checkpoints saved before the MLP owned its norm name these ln_2, mlp.fc, mlp.proj.
        load_renamed(self, {"ln_2.": "mlp.norm.", "mlp.fc.": "mlp.fc1.", "mlp.proj.": "mlp.fc2."})

    def forward(self, x, cache=None):
        """x: the residual stream (B, T, C) -> (B, T, C)."""
        x = x + self.attn(self.ln_1(x), cache)
        x = self.mlp(x)  # x + mlp(ln_2(x)), ln_2 being mlp.norm
        return x


class GPT(CausalLM):
    """GPT-2: token and position embeddings, n_layer pre-LN blocks, ln_f and the LM head."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.wte = torch.nn.Embedding(config.vocab_size, config.n_embd)
        self.wpe = torch.nn.Embedding(config.context_length, config.n_embd)
        self.blocks = torch.nn.ModuleList(Block(config, layer) for layer in range(config.n_layer))
        self.ln_f = lmkern.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.lm_head = torch.nn.Linear(config.n_embd, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.wte.weight
        self.apply(init_weights)
        for block in self.blocks:  # GPT-2's scaled init of the projections into the residual stream
            for projection in (block.attn.proj, block.mlp.fc2):
                torch.nn.init.normal_(projection.weight, std=0.02 / math.sqrt(2 * config.n_layer))

    def num_parameters(self, non_embedding=True):
        """Parameters, counting tied ones once; without the position embedding by default
        (nanoGPT's convention: the token embedding counts, as it is also the LM head)."""
        count = sum(p.numel() for p in self.parameters())
        return count - self.wpe.weight.numel() if non_embedding else count

    def flops_per_token(self, sequence_length=None):
        """Training FLOPs per token, forward and backward: 6 N for the weights (N from
        num_parameters()) plus 12 L H Q T for attention's scores and weighted sums (PaLM,
        appendix B), at sequences of T = sequence_length tokens (default: context_length)."""
        c = self.config
        length = c.context_length if sequence_length is None else sequence_length
        return 6 * self.num_parameters() + 12 * c.n_layer * c.n_embd * length  # H Q = n_embd

    def estimate_mfu(self, tokens_per_second, peak_flops, sequence_length=None):
        """Model FLOPs utilisation: the training FLOP/s that tokens_per_second stands for, over
        the device's peak_flops (989e12 for an H100 SXM in bf16, say)."""
        return self.flops_per_token(sequence_length) * tokens_per_second / peak_flops

    def hidden_states(self, input_ids, cache):
        """The final normalised hidden states (B, T, C) of input_ids (B, T) (CausalLM.run)."""
        positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
        if cache is not None:
            positions = cache.lengths[:, None] + positions  # (B, T): each sequence goes on where it stopped
        x = F.dropout(self.wte(input_ids) + self.wpe(positions), self.config.dropout, self.training)  # (B, T, C)
        for block in self.blocks:
            x = block(x, cache)
        return self.ln_f(x)

    def cache_layout(self):
        """(layers, heads, head size) of the KV cache (CausalLM.new_cache)."""
        return self.config.n_layer, self.config.n_head, self.config.n_embd // self.config.n_head

    def cache_reference(self):
        return self.wte.weight

    # -- Hugging Face interop (names, layouts and config: models/gpt_hf.py) ---------------------

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A GPT with the weights of a Hugging Face GPT-2 checkpoint: a state dict of
        GPT2LMHeadModel or GPT2Model, or a local directory with config.json and
        model.safetensors (or pytorch_model.bin), read offline. The config is `config`, else
        the directory's config.json, else a state dict's shapes (with GPT-2's 64-wide heads
        unless n_head is among the overrides); `overrides` set fields (kernels, dropout).
        Raises ValueError naming the keys that are missing, unexpected or misshapen."""
        checkpoint, config = hf.checkpoint_and_config(source, config, overrides, GPTConfig, gpt_hf.config_from_hf,
                                                      gpt_hf.config_from_state, "GPT-2")
        model = cls(config)
        model.load_hf_state_dict(checkpoint)
        return model

    def load_hf_state_dict(self, checkpoint):
        """Loads a GPT2LMHeadModel or GPT2Model state dict (name -> tensor) into this model;
        the attention's mask buffers of old checkpoints are skipped."""
        self.load_state_dict(gpt_hf.from_hf_state_dict(checkpoint, self.config, self.state_dict()))

    def to_hf_state_dict(self):
        """This model's weights under GPT2LMHeadModel's names and layouts (views, not copies:
        the Conv1D weights are transposes of ours; a tied lm_head.weight is wte's)."""
        return gpt_hf.to_hf_state_dict(self.config, self.state_dict())

    def save_hf(self, directory):
        """Writes a directory that transformers' GPT2LMHeadModel.from_pretrained reads
        (config.json and model.safetensors, a tied lm_head.weight left out as
        save_pretrained does)."""
        tied = ("lm_head.weight",) if self.config.tie_embeddings else ()
        hf.write_directory(directory, self.to_hf_state_dict(), gpt_hf.config_to_hf(self.config), tied)
