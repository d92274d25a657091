"""GPT-2 on lmkern's kernels: config, attention, MLP, block, model, generation with a static
KV cache, and Hugging Face interop.

The architecture is GPT-2's (learned positions, pre-LN blocks, tanh GELU, tied LM head).
The residual stream runs through lmkern's fused ops:

    h, x = LN1_0(s), s  with  s = dropout(wte + wpe)          add_layer_norm (no residual yet)
    for each block i:
        x = x + dropout(attention(h))                          scaled_dot_product_attention
        d = dropout(fc2(gelu(fc1(LN2_i(x)))))                  ffn (LayerNorm + MLP in one op)
        h, x = LN1_{i+1}(x + d), x + d                         add_layer_norm (LN_f after the last)
    loss = cross_entropy(h @ wte.T, targets)                   linear_cross_entropy: no logits

`kernels` picks the backend of every op at once (lmkern.use_backend); "torch" runs the same
model on the reference ops. Weights are torch.nn.Linear's, (out, in); Hugging Face's GPT-2
stores the four Conv1D weights of each block (in, out), so its interop transposes them.
"""

import dataclasses
import math
import os
import typing

import torch
import torch.nn.functional as F

import lmkern
from lmkern.models import hf
from lmkern.ops.autocast import autocast_dtype


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


class LMOutput(typing.NamedTuple):
    logits: torch.Tensor  # (B, T, V) in the model's dtype, or None
    loss: torch.Tensor  # scalar in the model's dtype, or None


class KVCache:
    """Preallocated keys and values of every layer, (n_layer, B, n_head, length, head size)
    each, and each sequence's length so far, (B,) int64. The model's forward writes the new
    tokens' keys and values and advances the lengths. dtype: what attention computes in (the
    model's, or under torch.autocast the autocast dtype: GPT.new_cache picks it)."""

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

    def forward(self, h, dropout_p, cache=None, layer=None):
        """h: (B, T, C) -> (B, T, C). With a cache (no gradient), attends over the cached keys
        of `layer` too, after appending this call's keys and values."""
        batch, length, width = h.shape
        q, k, v = (t.view(batch, length, self.n_head, -1).transpose(1, 2) for t in self.qkv(h).split(width, dim=2))
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

    def forward(self, x, norm, dropout_p):
        """dropout(proj(gelu_tanh(fc(norm(x))))) for x (B, T, C), in one fused op."""
        return lmkern.ffn(
            x, norm.weight, norm.bias, self.fc.weight, self.fc.bias, self.proj.weight, self.proj.bias,
            eps=norm.eps, approximate="tanh", dropout_p=dropout_p, residual=False,
        )


class Block(torch.nn.Module):
    def __init__(self, config):
        super().__init__()
        self.ln_1 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.attn = CausalSelfAttention(config)
        self.ln_2 = torch.nn.LayerNorm(config.n_embd, eps=config.layer_norm_eps, bias=config.bias)
        self.mlp = MLP(config)

    def forward(self, x, h, next_norm, dropout_p, cache=None, layer=None):
        """x: the residual stream, h: ln_1(x), both (B, T, C). Returns (next_norm(x'), x'),
        x' being the stream after this block: next_norm is the next block's ln_1 (or ln_f),
        fused with the residual add."""
        x = x + F.dropout(self.attn(h, dropout_p, cache, layer), dropout_p)
        return lmkern.add_layer_norm(self.mlp(x, self.ln_2, dropout_p), x, next_norm.weight, next_norm.bias,
                                     next_norm.eps)


class GPT(torch.nn.Module):
    """GPT-2: token and position embeddings, n_layer pre-LN blocks, ln_f and the LM head."""

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

    def forward(self, input_ids, targets=None, *, return_logits=None, cache=None):
        """input_ids: (B, T) int64 in [0, vocab_size), T <= context_length.
        targets: (B, T) int64, the next tokens (-100 where no loss is wanted): the mean
        cross-entropy is computed chunk by chunk, without the (B, T, V) logits.
        return_logits: also compute the logits (default: only when there are no targets).
        cache: a KVCache for generation (no gradient): input_ids continue each sequence at
        cache.lengths, which advance by T.
        Returns LMOutput(logits (B, T, V) or None, loss (scalar) or None), in the model's dtype.
        """
        self.check_input_ids(input_ids, cache)
        if targets is not None:
            check_ids("targets", targets, self.config.vocab_size, input_ids.shape, ignore_index=-100)
        return self._run(input_ids, targets, return_logits, cache)

    def decode(self, input_ids, cache=None):
        """forward(input_ids, cache=cache).logits without forward's input checks, which wait
        on the device: for generation loops that checked their prompts and total length once
        and feed back the model's own tokens (generate, lmkern generate)."""
        return self._run(input_ids, None, True, cache).logits

    def _run(self, input_ids, targets, return_logits, cache):
        dropout_p = self.config.dropout if self.training else 0.0
        with lmkern.use_backend(self.config.kernels):
            positions = torch.arange(input_ids.shape[1], device=input_ids.device)  # (T,)
            if cache is not None:
                positions = cache.lengths[:, None] + positions  # (B, T): each sequence goes on where it stopped
            first_norm = self.blocks[0].ln_1
            h, x = lmkern.add_layer_norm(self.wte(input_ids) + self.wpe(positions), None, first_norm.weight,
                                         first_norm.bias, first_norm.eps, dropout_p=dropout_p)  # (B, T, C) each
            for layer, block in enumerate(self.blocks):
                next_norm = self.blocks[layer + 1].ln_1 if layer + 1 < len(self.blocks) else self.ln_f
                h, x = block(x, h, next_norm, dropout_p, cache, layer)
            loss = None if targets is None else lmkern.linear_cross_entropy(h, self.lm_head.weight, targets)
        if cache is not None:
            cache.lengths += input_ids.shape[1]
        want_logits = targets is None if return_logits is None else return_logits
        return LMOutput(self.lm_head(h) if want_logits else None, loss)

    def check_input_ids(self, input_ids, cache=None):
        """Raises ValueError unless input_ids (B, T) int64 are in the vocabulary and fit in
        the context (after the cache's tokens, with a cache)."""
        check_ids("input_ids", input_ids, self.config.vocab_size)
        longest = input_ids.shape[1] + (0 if cache is None else int(cache.lengths.max()))
        if longest > self.config.context_length:
            raise ValueError(f"input_ids reach {longest} tokens per sequence: more than context_length "
                             f"{self.config.context_length}")

    # -- Generation --------------------------------------------------------------------------

    @torch.no_grad()
    def generate(self, input_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, do_sample=False,
                 eos_token_id=None, attention_mask=None, seed=None, use_cache=True):
        """Continues each prompt by up to max_new_tokens tokens, greedily or by sampling.

        input_ids: (B, T) int64 prompts. attention_mask: (B, T), 1 (or True) on the prompts'
            tokens and 0 on padding, on either side: each prompt's tokens are numbered from
            position 0, as transformers numbers left-padded prompts. None: no padding.
        do_sample: sample (after temperature, then top_k, then top_p, as transformers'
            warpers) instead of taking the most likely token; seed: sampling draws from its
            own generator, so that a seed gives the same tokens every time.
        eos_token_id: a sequence stops when it produces it; later positions repeat it.
        use_cache: attend over a static KV cache preallocated for the longest sequence
            (False recomputes every position at every step, for testing).

        Returns (B, N) int64: the new tokens only, without the prompts (transformers returns
        the padded prompts and the new tokens). N = max_new_tokens, or fewer when every
        sequence reached eos_token_id sooner. The model is in eval mode meanwhile.
        """
        prompts, lengths = self._packed_prompts(input_ids, attention_mask)  # (B, T'), (B,)
        if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
            raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
        longest = prompts.shape[1] + max_new_tokens
        if longest > self.config.context_length:
            raise ValueError(f"the longest prompt ({prompts.shape[1]} tokens) and max_new_tokens ({max_new_tokens}) "
                             f"reach {longest} tokens: more than context_length {self.config.context_length}")
        batch, device = prompts.shape[0], prompts.device
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        cache = self.new_cache(batch, longest) if use_cache else None
        tokens = torch.cat([prompts, prompts.new_zeros(batch, max_new_tokens)], dim=1)  # a row: prompt, new tokens
        rows = torch.arange(batch, device=device)
        finished = torch.zeros(batch, dtype=torch.bool, device=device)
        new_tokens = []
        was_training = self.training
        self.eval()
        try:
            for step in range(max_new_tokens):
                if cache is None:  # every position again
                    logits = self.decode(tokens[:, : prompts.shape[1] + step])[rows, lengths - 1]
                elif step == 0:  # the prompts into the cache; each sequence then continues after its own
                    logits = self.decode(prompts, cache)[rows, lengths - 1]
                    cache.lengths.copy_(lengths)
                else:  # each sequence's last token over its cache
                    logits = self.decode(next_token[:, None], cache)[:, -1]
                next_token = pick_token(logits.float(), temperature, top_k, top_p, do_sample, generator)  # (B,)
                if eos_token_id is not None:
                    next_token = torch.where(finished, eos_token_id, next_token)
                    finished |= next_token == eos_token_id
                new_tokens.append(next_token)
                tokens[rows, lengths] = next_token
                lengths += 1
                if finished.all():
                    break
        finally:
            self.train(was_training)
        return torch.stack(new_tokens, dim=1) if new_tokens else tokens.new_zeros(batch, 0)

    def new_cache(self, batch, length):
        """An empty KVCache for `batch` sequences of up to `length` tokens, in the dtype
        attention runs in: the autocast dtype under torch.autocast, else the weights'."""
        device = self.wte.weight.device
        return KVCache(self.config, batch, length, device, autocast_dtype(device.type) or self.wte.weight.dtype)

    def _packed_prompts(self, input_ids, attention_mask):
        """(prompts (B, T') with each row's tokens moved to its start in order and zeros after
        them, T' being the longest prompt; lengths (B,) int64), after checking the inputs."""
        check_ids("input_ids", input_ids)
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
            got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask)
            raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
        real = attention_mask != 0
        lengths = real.sum(1)  # (B,)
        if not (lengths > 0).all():
            raise ValueError(f"attention_mask has a row without tokens (row {int((lengths == 0).nonzero()[0, 0])}): "
                             "every prompt needs at least one")
        order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # a row's tokens first, in order
        prompts = torch.gather(input_ids.masked_fill(~real, 0), 1, order)[:, : int(lengths.max())]
        self.check_input_ids(prompts)
        return prompts, lengths

    # -- Hugging Face interop --------------------------------------------------------------

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A GPT with the weights of a Hugging Face GPT-2 checkpoint: a state dict of
        GPT2LMHeadModel or GPT2Model, or a local directory with config.json and
        model.safetensors (or pytorch_model.bin), read offline. The config is `config`, else
        the directory's config.json, else a state dict's shapes (with GPT-2's 64-wide heads
        unless n_head is among the overrides); `overrides` set fields (kernels, dropout).
        Raises ValueError naming the keys that are missing, unexpected or misshapen."""
        hf_config = None
        if isinstance(source, (str, os.PathLike)):
            source, hf_config = hf.read_directory(source, "GPT-2")
        if config is not None:
            config = dataclasses.replace(config, **overrides)
        elif hf_config is not None:
            config = config_from_hf(hf_config, **overrides)
        else:
            config = config_from_state(source, **overrides)
        model = cls(config)
        model.load_hf_state_dict(source)
        return model

    def load_hf_state_dict(self, checkpoint):
        """Loads a GPT2LMHeadModel or GPT2Model state dict (name -> tensor) into this model;
        the attention's mask buffers of old checkpoints are skipped."""
        checkpoint = {hf_full_name(name): tensor for name, tensor in checkpoint.items() if not is_hf_buffer(name)}
        tied = ("lm_head.weight",) if self.config.tie_embeddings else ()
        tensors = hf.take_tensors(checkpoint, self.to_hf_state_dict(), optional=tied,
                                  what="the Hugging Face GPT-2 checkpoint")
        embedding = tensors["transformer.wte.weight"]
        if tied and "lm_head.weight" in tensors and not torch.equal(tensors["lm_head.weight"], embedding):
            raise ValueError("the checkpoint's lm_head.weight differs from its transformer.wte.weight, but this "
                             "model ties them: load it with tie_embeddings=False")
        tensors.setdefault("lm_head.weight", embedding)
        self.load_state_dict({name: hf_layout(hf_name(name), tensors[hf_name(name)]) for name in self.state_dict()})

    def to_hf_state_dict(self):
        """This model's weights under GPT2LMHeadModel's names and layouts (views, not copies:
        the Conv1D weights are transposes of ours; a tied lm_head.weight is wte's)."""
        if not self.config.bias:
            raise ValueError("Hugging Face's GPT-2 has biases: to_hf_state_dict needs config.bias=True, got False")
        return {hf_name(name): hf_layout(hf_name(name), tensor) for name, tensor in self.state_dict().items()}


def check_ids(name, ids, vocab_size=None, shape=None, ignore_index=None):
    """Raises TypeError/ValueError unless ids is a 2-D int64 tensor (of `shape`) with values
    in [0, vocab_size) or equal to ignore_index."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 tensor, got {got}")
    if ids.dim() != 2 or (shape is not None and ids.shape != shape):
        expected = "shape (B, T)" if shape is None else f"input_ids' shape {tuple(shape)}"
        raise ValueError(f"{name} must have {expected}, got {tuple(ids.shape)}")
    if vocab_size is None:
        return
    bad = ((ids < 0) | (ids >= vocab_size)) & (ids != ignore_index)
    if bad.any():
        allowed = f"[0, {vocab_size})" + ("" if ignore_index is None else f" or {ignore_index}")
        raise ValueError(f"{name} must hold token ids in {allowed}, got {int(ids[bad][0])}")


# -- Token picking ---------------------------------------------------------------------------


def check_sampling(temperature, top_k, top_p, do_sample):
    """Raises ValueError for a sampling argument out of its range (temperature only when sampling)."""
    if do_sample and not temperature > 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    if top_k is not None and (not isinstance(top_k, int) or top_k < 1):
        raise ValueError(f"top_k must be None or an int >= 1, got {top_k!r}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be None or in (0, 1], got {top_p}")


def filter_logits(logits, top_k=None, top_p=None):
    """logits (B, V) float with -inf outside each row's top_k largest, then outside the
    fewest most likely tokens whose probabilities sum to at least top_p (always at least
    one): transformers' TopKLogitsWarper and TopPLogitsWarper. Ties at the k-th value stay."""
    if top_k is not None:
        kth = torch.topk(logits, min(top_k, logits.shape[-1])).values[:, -1:]  # (B, 1)
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None:
        ascending, order = torch.sort(logits, dim=-1)
        # A token goes when the tokens less likely than it, and itself, hold at most 1 - top_p.
        remove = ascending.softmax(-1).cumsum(-1) <= 1 - top_p
        remove[:, -1] = False
        logits = logits.masked_fill(torch.zeros_like(remove).scatter(1, order, remove), float("-inf"))
    return logits


def pick_token(logits, temperature, top_k, top_p, do_sample, generator):
    """The next token (B,) int64 for each row of logits (B, V): the argmax, or a sample from
    softmax(filter_logits(logits / temperature, top_k, top_p)) drawn with generator."""
    check_sampling(temperature, top_k, top_p, do_sample)
    if not do_sample:
        return logits.argmax(-1)
    probabilities = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


# -- Hugging Face names ----------------------------------------------------------------------

HF_CONV1D = ("attn.c_attn", "attn.c_proj", "mlp.c_fc", "mlp.c_proj")  # their weights are stored (in, out)
HF_NAMES = {  # ours -> Hugging Face's, in each block
    "ln_1": "ln_1",
    "attn.qkv": "attn.c_attn",
    "attn.proj": "attn.c_proj",
    "ln_2": "ln_2",
    "mlp.fc": "mlp.c_fc",
    "mlp.proj": "mlp.c_proj",
}


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


def config_from_hf(hf_config, **overrides):
    """A GPTConfig from a Hugging Face GPT-2 config.json (a dict), with fields overridden.
    Raises ValueError for a GPT-2 variant this model does not build."""
    if hf_config.get("activation_function", "gelu_new") not in ("gelu_new", "gelu_pytorch_tanh"):
        raise ValueError(f"config.json's activation_function must be GELU's tanh approximation (gelu_new), "
                         f"got {hf_config['activation_function']!r}")
    if hf_config.get("n_inner") not in (None, 4 * hf_config["n_embd"]):
        raise ValueError(f"config.json's n_inner must be null or 4 * n_embd = {4 * hf_config['n_embd']}, "
                         f"got {hf_config['n_inner']}")
    fields = dict(
        vocab_size=hf_config["vocab_size"], context_length=hf_config["n_positions"], n_layer=hf_config["n_layer"],
        n_head=hf_config["n_head"], n_embd=hf_config["n_embd"],
        layer_norm_eps=hf_config.get("layer_norm_epsilon", 1e-5),
        tie_embeddings=hf_config.get("tie_word_embeddings", True),
    )
    return GPTConfig(**{**fields, **overrides})


def config_from_state(state, **overrides):
    """A GPTConfig from a GPT-2 state dict's shapes (n_head = n_embd / 64, as every GPT-2,
    unless overridden), with fields overridden."""
    state = {hf_full_name(name): tensor for name, tensor in state.items()}
    for needed in ("transformer.wte.weight", "transformer.wpe.weight"):
        if needed not in state:
            raise ValueError(f"the Hugging Face GPT-2 checkpoint must hold {needed}: missing")
    vocab_size, width = state["transformer.wte.weight"].shape
    layers = 1 + max((int(name.split(".")[2]) for name in state if name.startswith("transformer.h.")), default=-1)
    lm_head = state.get("lm_head.weight")
    fields = dict(
        vocab_size=vocab_size, context_length=state["transformer.wpe.weight"].shape[0], n_layer=layers,
        n_head=max(1, width // 64), n_embd=width,
        tie_embeddings=lm_head is None or torch.equal(lm_head, state["transformer.wte.weight"]),
    )
    return GPTConfig(**{**fields, **overrides})
