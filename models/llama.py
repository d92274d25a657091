"""Llama-style decoders on lmkern's kernels: config, presets, attention, layer, model. The
same module serves Llama 2/3, Mistral (a sliding attention window) and Qwen2 (biases on
the query, key and value projections).

    x = embed_tokens(tokens)
    for each layer:                  h: the normalised stream, x: the residual stream
        h, x = input_layernorm(branch, x)          lmkern.add_rms_norm: the residual add and
        branch = self_attn(h)                        RMSNorm in one pass (the first layer's
        h, x = post_attention_layernorm(branch, x)   adds nothing)
        branch = mlp(h)                            lmkern.swiglu: gate and up in one matmul pass
    h, _ = norm(branch, x)
    loss = cross_entropy(h @ lm_head.T, targets)   linear_cross_entropy: no (B, T, V) logits

Attention: grouped-query (n_kv_head key and value heads shared by n_head query heads),
rotary embeddings on the queries and keys (lmkern.apply_rotary; in decoding, fused into
lmkern.attention_with_kv_cache, which rotates the new keys as it writes them to the cache),
causal, within a sliding window of the last `sliding_window` tokens if set.

The parameters carry the names of transformers' LlamaForCausalLM (model.layers.0.self_attn.
q_proj.weight, ...), so Hugging Face state dicts load as they are (models/llama_hf.py:
configs, checks, files). `kernels` picks the backend of every op at once; "torch" runs the
same model on the reference ops. Forward's checks, the KV cache and generation:
models/generation.py (CausalLM).
"""

import dataclasses
import functools
import math

import torch

import lmkern
from lmkern.models import hf, llama_hf
from lmkern.models.common import init_weights
from lmkern.models.generation import CausalLM


@dataclasses.dataclass
class LlamaConfig:
    vocab_size: int = 32000
    context_length: int = 2048  # the positions the rotary cache holds: the longest sequence
    n_layer: int = 16
    n_head: int = 32  # query heads
    n_kv_head: int = 8  # key and value heads, a divisor of n_head (grouped-query attention)
    hidden_size: int = 2048
    intermediate_size: int = 5632  # the gated FFN's width
    head_dim: int = None  # hidden_size // n_head if None
    rope_theta: float = 10000.0  # the rotary frequencies' base
    rope_scaling: dict = None  # None, or a Hugging Face rope_scaling dict (linear, dynamic, llama3): lmkern.rotary_cache
    rms_norm_eps: float = 1e-5
    tie_embeddings: bool = False  # the LM head is the token embedding (Llama 3.2 1B, Qwen2 0.5B)
    qkv_bias: bool = False  # biases on the query, key and value projections (Qwen2)
    sliding_window: int = None  # each token attends to itself and the sliding_window - 1 before it (Mistral)
    dropout: float = 0.0  # on the attention probabilities (Hugging Face's attention_dropout)
    kernels: str = "auto"  # the lmkern backend of every op: auto, torch, triton or native

    def __post_init__(self):
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.n_head if self.n_head > 0 else 0
        for name in ("vocab_size", "context_length", "n_layer", "n_head", "n_kv_head", "hidden_size",
                     "intermediate_size", "head_dim"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.n_head % self.n_kv_head:
            raise ValueError(f"n_head ({self.n_head}) must be a multiple of n_kv_head ({self.n_kv_head})")
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even (rotary embeddings turn pairs), got {self.head_dim}")
        if self.sliding_window is not None and (not isinstance(self.sliding_window, int) or self.sliding_window < 1):
            raise ValueError(f"sliding_window must be None or a positive int, got {self.sliding_window!r}")
        if not self.rope_theta > 0 or not self.rms_norm_eps > 0:
            raise ValueError(f"rope_theta and rms_norm_eps must be > 0, got {self.rope_theta} and {self.rms_norm_eps}")
        if not 0 <= self.dropout < 1:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if self.kernels not in lmkern.backend.CHOICES:
            raise ValueError(f"kernels must be one of {lmkern.backend.CHOICES}, got {self.kernels!r}")


LLAMA3_SCALING = {"rope_type": "llama3", "factor": 32.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
                  "original_max_position_embeddings": 8192}

PRESETS = {
    # trains on a CPU in minutes
    "tiny": dict(n_layer=4, n_head=4, n_kv_head=2, hidden_size=128, intermediate_size=352, context_length=256,
                 tie_embeddings=True),
    # shapes of real checkpoints (nothing is downloaded: from_hf loads their weights from a directory)
    "llama-3.2-1b": dict(vocab_size=128256, n_layer=16, n_head=32, n_kv_head=8, hidden_size=2048,
                         intermediate_size=8192, context_length=131072, rope_theta=500000.0,
                         rope_scaling=LLAMA3_SCALING, tie_embeddings=True),
    "mistral-7b": dict(vocab_size=32000, n_layer=32, n_head=32, n_kv_head=8, hidden_size=4096,
                       intermediate_size=14336, context_length=32768, sliding_window=4096),
    "qwen2-0.5b": dict(vocab_size=151936, n_layer=24, n_head=14, n_kv_head=2, hidden_size=896,
                       intermediate_size=4864, context_length=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                       tie_embeddings=True, qkv_bias=True),
}


def preset(name, **overrides):
    """A LlamaConfig from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown Llama preset {name!r}: choose one of {', '.join(PRESETS)}")
    return LlamaConfig(**{**PRESETS[name], **overrides})


def gated_ffn_width(hidden_size):
    """Llama's FFN width for a hidden size: 8/3 of it (the gated FFN's three matrices hold
    as many weights as a 4x GELU FFN's two), rounded up to a multiple of 32."""
    return 32 * math.ceil(8 * hidden_size / 3 / 32)


class Attention(torch.nn.Module):
    """Grouped-query causal self-attention with rotary embeddings, of layer `layer` (its
    place in a KVCache)."""

    def __init__(self, config, layer):
        super().__init__()
        self.config, self.layer = config, layer
        width, head_dim = config.hidden_size, config.head_dim
        self.q_proj = torch.nn.Linear(width, config.n_head * head_dim, bias=config.qkv_bias)
        self.k_proj = torch.nn.Linear(width, config.n_kv_head * head_dim, bias=config.qkv_bias)
        self.v_proj = torch.nn.Linear(width, config.n_kv_head * head_dim, bias=config.qkv_bias)
        self.o_proj = torch.nn.Linear(config.n_head * head_dim, width, bias=False)
        # flash-attention's window: a query sees itself and the sliding_window - 1 keys before it
        self.window = (-1, -1) if config.sliding_window is None else (config.sliding_window - 1, 0)

    def forward(self, x, cos, sin, cache=None):
        """x: (B, T, C) -> (B, T, C); cos, sin: the rotary caches (context_length, head_dim / 2).
        With a cache (no gradient), appends this call's keys and values, rotated at each
        sequence's positions, to the cache and attends over all of it."""
        batch, length, _ = x.shape
        c = self.config
        q = self.q_proj(x).view(batch, length, c.n_head, c.head_dim).transpose(1, 2)  # (B, H, T, hd)
        k = self.k_proj(x).view(batch, length, c.n_kv_head, c.head_dim).transpose(1, 2)  # (B, H_kv, T, hd)
        v = self.v_proj(x).view(batch, length, c.n_kv_head, c.head_dim).transpose(1, 2)
        if cache is None:
            q, k = lmkern.apply_rotary(q, cos, sin), lmkern.apply_rotary(k, cos, sin)
            y = lmkern.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True, window_size=self.window,
                                                    dropout_p=c.dropout if self.training else 0.0)
        else:
            y = lmkern.attention_with_kv_cache(q, cache.keys[self.layer], cache.values[self.layer], cache.lengths, k, v,
                                               rotary_cos=cos, rotary_sin=sin, window_size=self.window)
        return self.o_proj(y.transpose(1, 2).reshape(batch, length, c.n_head * c.head_dim))


class DecoderLayer(torch.nn.Module):
    """A pre-norm layer whose norms also add the residual: forward(branch, stream) takes
    the previous layer's MLP output and the residual stream (None before the first layer)
    and returns this layer's MLP output and the stream before it is added."""

    def __init__(self, config, layer):
        super().__init__()
        width, eps = config.hidden_size, config.rms_norm_eps
        self.self_attn = Attention(config, layer)
        self.mlp = lmkern.nn.FusedGatedFFN(width, config.intermediate_size, activation="silu")
        self.input_layernorm = lmkern.nn.AddRMSNorm(width, eps=eps)
        self.post_attention_layernorm = lmkern.nn.AddRMSNorm(width, eps=eps)

    def forward(self, branch, stream, cos, sin, cache=None):
        h, stream = self.input_layernorm(branch, stream)  # stream + branch, and its RMSNorm
        h, stream = self.post_attention_layernorm(self.self_attn(h, cos, sin, cache), stream)
        return self.mlp(h), stream


class LlamaModel(torch.nn.Module):
    """The decoder stack: embed_tokens, layers, norm (transformers' LlamaModel's names)."""

    def __init__(self, config):
        super().__init__()
        self.embed_tokens = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.layers = torch.nn.ModuleList(DecoderLayer(config, layer) for layer in range(config.n_layer))
        self.norm = lmkern.nn.AddRMSNorm(config.hidden_size, eps=config.rms_norm_eps)

    def forward(self, input_ids, cos, sin, cache=None):
        """input_ids (B, T) -> the final normalised hidden states (B, T, C)."""
        branch, stream = self.embed_tokens(input_ids), None
        for layer in self.layers:
            branch, stream = layer(branch, stream, cos, sin, cache)
        return self.norm(branch, stream)[0]


class Llama(CausalLM):
    """A Llama-style causal LM: LlamaModel and the LM head (transformers' LlamaForCausalLM)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.model = LlamaModel(config)
        self.lm_head = torch.nn.Linear(config.hidden_size, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight
        self.apply(init_weights)
        self.rotary = {}  # (device, dtype) -> the (cos, sin) caches, built on first use (never cast with the weights)

    def rotary_caches(self, device, dtype):
        """(cos, sin), each (context_length, head_dim / 2) on device: fp32 (fp64 for an fp64 model)."""
        dtype = torch.float64 if dtype == torch.float64 else torch.float32
        if (device, dtype) not in self.rotary:
            c = self.config
            self.rotary[device, dtype] = lmkern.rotary_cache(c.head_dim, c.context_length, base=c.rope_theta,
                                                             scaling=c.rope_scaling, device=device, dtype=dtype)
        return self.rotary[device, dtype]

    def num_parameters(self):
        """Parameters, counting tied ones once."""
        return sum(p.numel() for p in self.parameters())

    def flops_per_token(self, sequence_length=None):
        """Training FLOPs per token, forward and backward: 6 N for the weights but the
        embedding (a lookup, unless it is the tied LM head), plus 12 L H Q T for attention's
        scores and weighted sums at sequences of T = sequence_length tokens (default:
        context_length; at most sliding_window keys per query)."""
        c = self.config
        length = c.context_length if sequence_length is None else sequence_length
        keys = length if c.sliding_window is None else min(length, c.sliding_window)
        lookup = 0 if c.tie_embeddings else self.model.embed_tokens.weight.numel()
        return 6 * (self.num_parameters() - lookup) + 12 * c.n_layer * c.n_head * c.head_dim * keys

    def hidden_states(self, input_ids, cache):
        """The final normalised hidden states (B, T, C) of input_ids (B, T) (CausalLM.run)."""
        cos, sin = self.rotary_caches(input_ids.device, self.lm_head.weight.dtype)
        return self.model(input_ids, cos, sin, cache)

    def cache_layout(self):
        """(layers, key and value heads, head_dim) of the KV cache (CausalLM.new_cache)."""
        return self.config.n_layer, self.config.n_kv_head, self.config.head_dim

    def cache_reference(self):
        return self.model.embed_tokens.weight

    # -- Hugging Face interop (configs and checks: models/llama_hf.py) ---------------------------

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A Llama with the weights of a Hugging Face LlamaForCausalLM, MistralForCausalLM or
        Qwen2ForCausalLM checkpoint (or of their bare models, without the LM head when it
        is tied): a state dict, or a local directory with config.json and
        model.safetensors (or pytorch_model.bin), read offline. The config is `config`,
        else the directory's config.json, else a state dict's shapes (heads of 64 unless
        head_dim, n_head or n_kv_head are among the overrides); `overrides` set fields
        (kernels, context_length). Raises ValueError naming the keys that are missing,
        unexpected or misshapen, and for the configs this model does not build."""
        checkpoint, config = hf.checkpoint_and_config(source, config, overrides, LlamaConfig, llama_hf.config_from_hf,
                                                      functools.partial(llama_hf.config_from_state, overrides=overrides),
                                                      "Llama")
        model = cls(config)
        model.load_hf_state_dict(checkpoint)
        return model

    def load_hf_state_dict(self, checkpoint):
        """Loads a Hugging Face state dict (name -> tensor) into this model."""
        self.load_state_dict(llama_hf.from_hf_state_dict(checkpoint, self.config, self.state_dict()))

    def to_hf_state_dict(self):
        """This model's weights under transformers' names: its own state dict (a tied
        lm_head.weight is embed_tokens')."""
        return self.state_dict()

    def save_hf(self, directory):
        """Writes a directory that transformers' AutoModelForCausalLM.from_pretrained reads
        as a LlamaForCausalLM, MistralForCausalLM (sliding window) or Qwen2ForCausalLM (qkv
        biases): config.json and model.safetensors, a tied lm_head.weight left out as
        save_pretrained does."""
        tied = ("lm_head.weight",) if self.config.tie_embeddings else ()
        hf.write_directory(directory, self.to_hf_state_dict(), llama_hf.config_to_hf(self.config), tied)
