"""T5 encoder-decoders on lmkern's kernels: config, presets, relative position bias,
attention, feed-forward, blocks, stacks, model, generation. The same module serves T5 v1.0
(ReLU feed-forward, LM head tied to the embedding) and v1.1 / Flan-T5 (gated tanh-GELU
feed-forward, untied LM head).

    encoder:  branch, x = shared(input_ids), None     h: the normalised stream, x: the residual stream
              for each block:
                  h, x = layer[0].layer_norm(branch, x)    lmkern.add_rms_norm: the residual add and T5's
                  branch = SelfAttention(h, bias + padding)  RMSNorm in one pass (the first adds nothing)
                  h, x = layer[1].layer_norm(branch, x)
                  branch = DenseReluDense(h)
              encoder_out, _ = final_layer_norm(branch, x)
    decoder:  the same, with causal self-attention and, between it and the feed-forward,
              layer[1]: EncDecAttention(h, encoder_out, encoder padding) (no position bias)
    loss = cross_entropy(scale * h @ lm_head.T, labels)  linear_cross_entropy; scale = d_model**-0.5
                                                          when the head is the tied embedding (v1.0)

Attention is unscaled (scale=1.0: T5's initialisation folds 1/sqrt(d_kv) into the query
weights) and adds a learned (buckets, heads) table of relative positions, held by each
stack's first block only and gathered once per stack for all its blocks, as transformers
does: per key-minus-query distance, (H, Lq + Lk - 1), which lmkern's attention takes as
relative_bias and adds in its kernels, beside the encoder's boolean key-padding mask and the
decoder's causal bound; see AttentionMask.

The parameters carry the names of transformers' T5ForConditionalGeneration (shared.weight,
encoder.block.0.layer.0.SelfAttention.q.weight, ...), so Hugging Face state dicts load as
they are (models/t5_hf.py: configs, checks, files). `kernels` picks the backend of every op
at once; "torch" runs the same model on the reference ops.
"""

import dataclasses
import math
import types

import torch

import lmkern
from lmkern.models import generation, hf, t5_hf
from lmkern.models.common import check_attention_mask, check_ids
from lmkern.models.errors import ArgumentValueError
from lmkern.models.generation import LMOutput


@dataclasses.dataclass
class T5Config:
    vocab_size: int = 32128  # T5's SentencePiece vocabulary (32100), padded to a multiple of 128
    d_model: int = 512
    d_kv: int = 64  # each head's width: heads * d_kv need not be d_model
    d_ff: int = 2048  # the feed-forward's width
    num_layers: int = 6  # encoder blocks
    num_decoder_layers: int = None  # decoder blocks; num_layers if None
    num_heads: int = 8
    relative_attention_num_buckets: int = 32  # rows of the position-bias table
    relative_attention_max_distance: int = 128  # distances from here on share the last bucket
    feed_forward: str = "relu"  # "relu" (v1.0) or "gated-gelu" (v1.1, Flan-T5: tanh GELU gate * up)
    layer_norm_epsilon: float = 1e-6
    tie_word_embeddings: bool = True  # the LM head is `shared`, its input scaled by d_model**-0.5 (v1.0)
    # On the embeddings, each sub-layer's output and the attention probabilities (fused into
    # the ops); transformers also drops the ReLU/GELU units and the final norm's output.
    dropout_rate: float = 0.0
    pad_token_id: int = 0
    eos_token_id: int = 1
    decoder_start_token_id: int = 0  # the decoder's first input: T5 starts from the pad token
    kernels: str = "auto"  # the lmkern backend of every op: auto, torch, triton or native

    def __post_init__(self):
        if self.num_decoder_layers is None:
            self.num_decoder_layers = self.num_layers
        for name in ("vocab_size", "d_model", "d_kv", "d_ff", "num_layers", "num_decoder_layers", "num_heads",
                     "relative_attention_num_buckets", "relative_attention_max_distance"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be a positive int, got {getattr(self, name)!r}")
        if self.relative_attention_num_buckets < 4:  # halved for the two directions, then for exact and log buckets
            raise ValueError(f"relative_attention_num_buckets must be at least 4, got "
                             f"{self.relative_attention_num_buckets}")
        if self.feed_forward not in t5_hf.FEED_FORWARDS:
            raise ValueError(f"feed_forward must be one of {', '.join(t5_hf.FEED_FORWARDS)}, got {self.feed_forward!r}")
        for name in ("pad_token_id", "eos_token_id", "decoder_start_token_id"):
            value = getattr(self, name)
            if not isinstance(value, int) or not 0 <= value < self.vocab_size:
                raise ValueError(f"{name} must be an int in [0, vocab_size={self.vocab_size}), got {value!r}")
        if not self.layer_norm_epsilon > 0:
            raise ValueError(f"layer_norm_epsilon must be > 0, got {self.layer_norm_epsilon}")
        if not 0 <= self.dropout_rate < 1:
            raise ValueError(f"dropout_rate must be in [0, 1), got {self.dropout_rate}")
        if self.kernels not in lmkern.backend.CHOICES:
            raise ValueError(f"kernels must be one of {lmkern.backend.CHOICES}, got {self.kernels!r}")


PRESETS = {
    # trains on a CPU in minutes
    "tiny": dict(vocab_size=512, d_model=128, d_kv=32, d_ff=256, num_layers=2, num_heads=4, feed_forward="gated-gelu",
                 tie_word_embeddings=False),
    # shapes of real checkpoints (nothing is downloaded: from_hf loads their weights from a directory)
    "t5-small": dict(),  # T5Config's defaults are t5-small's
    "flan-t5-small": dict(d_ff=1024, num_layers=8, num_heads=6, feed_forward="gated-gelu", tie_word_embeddings=False),
}


def preset(name, **overrides):
    """A T5Config from a preset name, with fields overridden (vocab_size from a tokenizer, say)."""
    if name not in PRESETS:
        raise ValueError(f"unknown T5 preset {name!r}: choose one of {', '.join(PRESETS)}")
    return T5Config(**{**PRESETS[name], **overrides})


# -- Relative positions ----------------------------------------------------------------------


def relative_position_bucket(relative_position, bidirectional, num_buckets, max_distance):
    """The bucket (same shape, int64) of each key-minus-query distance in relative_position
    (int64), as Mesh TensorFlow's T5 (and transformers) computes it: with bidirectional,
    half the buckets for keys after the query; of the rest, half for the exact distances
    0, 1, ... and half for logarithmically wider bins up to max_distance, beyond which all
    share the last. Without bidirectional, keys after the query count as distance 0."""
    buckets = torch.zeros_like(relative_position)
    if bidirectional:
        num_buckets //= 2
        buckets += (relative_position > 0).to(torch.int64) * num_buckets
        distance = relative_position.abs()
    else:
        distance = (-relative_position).clamp(min=0)
    max_exact = num_buckets // 2
    # fp32 logs, as transformers takes them: a distance on a bin's edge falls in the same bin
    logarithmic = max_exact + (torch.log(distance.float() / max_exact) / math.log(max_distance / max_exact)
                               * (num_buckets - max_exact)).to(torch.int64)
    return buckets + torch.where(distance < max_exact, distance, logarithmic.clamp(max=num_buckets - 1))


@dataclasses.dataclass(frozen=True)
class AttentionMask:
    """What an attention adds to its scores, built once per stack and shared by its blocks;
    the arguments of lmkern.scaled_dot_product_attention of these names. attn_mask: None or
    (B, 1, 1, Lk) bool, True where a key takes part (the encoder's padding). relative_bias:
    None (cross-attention) or (H, Lq + Lk - 1), the position bias per distance (see
    Attention.position_bias): the kernels add it in place, so that no (B, H, Lq, Lk) mask
    exists. window_size: (-1, s) for the decoder, whose queries sit at positions s, s + 1,
    ... (s > 0 with a DecoderCache): query i sees keys j <= s + i; (-1, -1) for none.

    A query that sees no key gets zeros from lmkern's attention (transformers' finfo.min
    gives a uniform average over padding); neither model makes one: every encoder row keeps
    a real token (T5.forward checks it) and a decoder query sees itself."""

    attn_mask: torch.Tensor = None
    relative_bias: torch.Tensor = None
    window_size: tuple = (-1, -1)


# -- Attention and feed-forward --------------------------------------------------------------


class Attention(torch.nn.Module):
    """T5's multi-head attention, self or cross, of decoder block `layer` (its place in a
    DecoderCache; None in the encoder): bias-free q, k, v, o projections, unscaled scores
    plus a float mask. With has_relative_attention_bias, also the position-bias table
    (buckets, heads) of its stack."""

    def __init__(self, config, layer=None, has_relative_attention_bias=False):
        super().__init__()
        self.config, self.layer = config, layer
        inner = config.num_heads * config.d_kv
        self.q = torch.nn.Linear(config.d_model, inner, bias=False)
        self.k = torch.nn.Linear(config.d_model, inner, bias=False)
        self.v = torch.nn.Linear(config.d_model, inner, bias=False)
        self.o = torch.nn.Linear(inner, config.d_model, bias=False)
        if has_relative_attention_bias:
            self.relative_attention_bias = torch.nn.Embedding(config.relative_attention_num_buckets, config.num_heads)

    def heads(self, x):
        """(B, L, H * d_kv) -> (B, H, L, d_kv), a view."""
        return x.view(*x.shape[:2], self.config.num_heads, self.config.d_kv).transpose(1, 2)

    def keys_values(self, x):
        """(k, v) of x (B, L, C), each (B, H, L, d_kv)."""
        return self.heads(self.k(x)), self.heads(self.v(x))

    def position_bias(self, query_start, query_length, key_length, bidirectional):
        """(H, Lq + Lk - 1) in the table's dtype, as relative_bias: the bias of queries at
        positions query_start .. query_start + Lq - 1 for keys at 0 .. Lk - 1, per distance.
        Column t is what query i and key j with j - i + Lq - 1 = t get: the bias of key-minus-
        query distance t - (Lq - 1) - query_start. A gather of Lq + Lk - 1 rows of the
        table, whose gradient autograd sums into it."""
        c = self.config
        columns = torch.arange(query_length + key_length - 1, device=self.relative_attention_bias.weight.device)
        buckets = relative_position_bucket(columns - (query_length - 1 + query_start), bidirectional,
                                           c.relative_attention_num_buckets, c.relative_attention_max_distance)
        return self.relative_attention_bias(buckets).T  # (Lq + Lk - 1, H) -> (H, Lq + Lk - 1)

    def forward(self, x, mask, keys_values=None, cache=None):
        """x (B, Lq, C) -> (B, Lq, C), attending to keys_values ((k, v), each (B, H, Lk,
        d_kv): cross-attention's, of the encoder output) or, if None, to x's own (self-
        attention; with a DecoderCache, x's are written into it first and the query attends
        to all of the cache, Lk = its size). mask: an AttentionMask."""
        if keys_values is None:
            keys_values = self.keys_values(x)
            if cache is not None:
                keys_values = cache.write(self.layer, *keys_values)
        dropout = self.config.dropout_rate if self.training else 0.0
        y = lmkern.scaled_dot_product_attention(
            self.heads(self.q(x)), *keys_values, attn_mask=mask.attn_mask, relative_bias=mask.relative_bias,
            window_size=mask.window_size, scale=1.0, dropout_p=dropout,
        )  # (B, H, Lq, d_kv)
        return self.o(y.transpose(1, 2).flatten(2))


class ReluFeedForward(torch.nn.Module):
    """T5 v1.0's feed-forward, wo(relu(wi(x))): plain torch (lmkern has no fused ReLU FFN)."""

    def __init__(self, config):
        super().__init__()
        self.wi = torch.nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = torch.nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return self.wo(torch.relu(self.wi(x)))


class GatedGeluFeedForward(torch.nn.Module):
    """T5 v1.1's feed-forward, wo(gelu_tanh(wi_0(x)) * wi_1(x)), in one fused op
    (lmkern.swiglu); transformers' names (wi_0: the gate, wi_1: the up projection)."""

    def __init__(self, config):
        super().__init__()
        self.wi_0 = torch.nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wi_1 = torch.nn.Linear(config.d_model, config.d_ff, bias=False)
        self.wo = torch.nn.Linear(config.d_ff, config.d_model, bias=False)

    def forward(self, x):
        return lmkern.swiglu(x, self.wi_0.weight, self.wi_1.weight, self.wo.weight, activation="gelu_tanh")


# -- Blocks ----------------------------------------------------------------------------------


def add_norm(config):
    """T5's layer norm (RMSNorm: no mean subtracted, no bias) with the residual add before it."""
    return lmkern.nn.AddRMSNorm(config.d_model, eps=config.layer_norm_epsilon, dropout=config.dropout_rate)


class SelfAttentionLayer(torch.nn.Module):
    """A block's self-attention sub-layer (transformers' T5LayerSelfAttention): forward
    (branch, stream, ...) takes the previous sub-layer's output and the residual stream and
    returns this one's output and the stream before it is added."""

    def __init__(self, config, layer=None, has_relative_attention_bias=False):
        super().__init__()
        self.SelfAttention = Attention(config, layer, has_relative_attention_bias)
        self.layer_norm = add_norm(config)

    def forward(self, branch, stream, mask, cache=None):
        h, stream = self.layer_norm(branch, stream)
        return self.SelfAttention(h, mask, cache=cache), stream


class CrossAttentionLayer(torch.nn.Module):
    """A decoder block's attention to the encoder output (T5LayerCrossAttention)."""

    def __init__(self, config, layer):
        super().__init__()
        self.EncDecAttention = Attention(config, layer)
        self.layer_norm = add_norm(config)

    def forward(self, branch, stream, mask, keys_values):
        h, stream = self.layer_norm(branch, stream)
        return self.EncDecAttention(h, mask, keys_values), stream


class FeedForwardLayer(torch.nn.Module):
    """A block's feed-forward sub-layer (T5LayerFF)."""

    def __init__(self, config):
        super().__init__()
        self.DenseReluDense = (ReluFeedForward if config.feed_forward == "relu" else GatedGeluFeedForward)(config)
        self.layer_norm = add_norm(config)

    def forward(self, branch, stream):
        h, stream = self.layer_norm(branch, stream)
        return self.DenseReluDense(h), stream


class EncoderBlock(torch.nn.Module):
    """layer: self-attention, feed-forward (T5Block's names)."""

    def __init__(self, config, first):
        super().__init__()
        self.layer = torch.nn.ModuleList([SelfAttentionLayer(config, has_relative_attention_bias=first),
                                          FeedForwardLayer(config)])

    def forward(self, branch, stream, mask):
        branch, stream = self.layer[0](branch, stream, mask)
        return self.layer[1](branch, stream)


class DecoderBlock(torch.nn.Module):
    """layer: causal self-attention, cross-attention, feed-forward."""

    def __init__(self, config, layer):
        super().__init__()
        self.layer = torch.nn.ModuleList([SelfAttentionLayer(config, layer, has_relative_attention_bias=layer == 0),
                                          CrossAttentionLayer(config, layer), FeedForwardLayer(config)])

    def forward(self, branch, stream, self_mask, cross_mask, cross_keys_values, cache=None):
        branch, stream = self.layer[0](branch, stream, self_mask, cache)
        branch, stream = self.layer[1](branch, stream, cross_mask, cross_keys_values)
        return self.layer[2](branch, stream)


# -- Stacks ----------------------------------------------------------------------------------


class Encoder(torch.nn.Module):
    """embed_tokens (the model's shared embedding), block, final_layer_norm (T5Stack's names)."""

    def __init__(self, config, shared):
        super().__init__()
        self.embed_tokens = shared
        self.block = torch.nn.ModuleList(EncoderBlock(config, first=i == 0) for i in range(config.num_layers))
        self.final_layer_norm = add_norm(config)

    def forward(self, input_ids, padding):
        """input_ids (B, L) -> the encoder output (B, L, C); padding: (B, L) bool, True on padding."""
        length = input_ids.shape[1]
        bias = self.block[0].layer[0].SelfAttention.position_bias(0, length, length, bidirectional=True)  # (H, 2L - 1)
        mask = AttentionMask(~padding[:, None, None, :], bias)  # shared by every block
        branch, stream = self.embed_tokens(input_ids), None
        for block in self.block:
            branch, stream = block(branch, stream, mask)
        return self.final_layer_norm(branch, stream)[0]


class Decoder(torch.nn.Module):
    """embed_tokens (the model's shared embedding), block, final_layer_norm."""

    def __init__(self, config, shared):
        super().__init__()
        self.embed_tokens = shared
        self.block = torch.nn.ModuleList(DecoderBlock(config, i) for i in range(config.num_decoder_layers))
        self.final_layer_norm = add_norm(config)

    def cross_keys_values(self, encoder_out):
        """Each block's cross-attention (k, v) of the encoder output (B, L, C), each (B, H, L, d_kv)."""
        return [block.layer[1].EncDecAttention.keys_values(encoder_out) for block in self.block]

    def forward(self, input_ids, encoder_out, padding, cache=None):
        """input_ids (B, T) -> the final normalised hidden states (B, T, C). encoder_out:
        (B, L, C); padding: (B, L) bool, True on the encoder's padding. cache: a
        DecoderCache (no gradient): input_ids continue every sequence at cache.length, their
        keys and values go into it, and the cross-attention's are taken from it."""
        length = input_ids.shape[1]
        start = 0 if cache is None else cache.length
        keys = length if cache is None else cache.keys.shape[3]  # with a cache: all of it, the rest masked
        bias = self.block[0].layer[0].SelfAttention.position_bias(start, length, keys, bidirectional=False)
        self_mask = AttentionMask(relative_bias=bias, window_size=(-1, start))  # causal at the queries' positions
        cross_mask = AttentionMask(~padding[:, None, None, :])  # (B, 1, 1, L): a boolean key-padding mask
        cross = self.cross_keys_values(encoder_out) if cache is None else cache.cross
        branch, stream = self.embed_tokens(input_ids), None
        for block, keys_values in zip(self.block, cross):
            branch, stream = block(branch, stream, self_mask, cross_mask, keys_values, cache)
        if cache is not None:
            cache.length += length
        return self.final_layer_norm(branch, stream)[0]


class DecoderCache:
    """The decoder's caches for generation: every block's self-attention keys and values,
    preallocated for `length` tokens, (layers, B, H, length, d_kv) each, of which the first
    self.length positions are filled (a Python int: the sequences of a batch decode in
    step); and each block's cross-attention (k, v) of the encoder output, (B, H, L, d_kv)
    each, computed once per sequence.

    Attention runs over the whole preallocated cache, one shape at every step: the keys
    not yet written are hidden by the causal bound of the self-attention (AttentionMask's
    window_size), which is what a key after its query is."""

    def __init__(self, config, batch, length, cross):
        reference = cross[0][0]  # the dtype attention computes in (the autocast dtype under autocast)
        shape = (config.num_decoder_layers, batch, config.num_heads, length, config.d_kv)
        self.keys = reference.new_zeros(shape)
        self.values = reference.new_zeros(shape)
        self.length = 0
        self.cross = cross

    def write(self, layer, keys, values):
        """Writes keys and values (B, H, T, d_kv) of layer `layer` at the cache's length, and
        returns that layer's whole cache (k, v), each (B, H, size, d_kv)."""
        end = self.length + keys.shape[2]
        self.keys[layer, :, :, self.length:end] = keys
        self.values[layer, :, :, self.length:end] = values
        return self.keys[layer], self.values[layer]


# -- The model -------------------------------------------------------------------------------


class T5(torch.nn.Module):
    """A T5 encoder-decoder with its LM head (transformers' T5ForConditionalGeneration)."""

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.shared = torch.nn.Embedding(config.vocab_size, config.d_model)
        self.encoder = Encoder(config, self.shared)
        self.decoder = Decoder(config, self.shared)
        self.lm_head = torch.nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_word_embeddings:
            self.lm_head.weight = self.shared.weight
        self.apply(init_weights)

    def num_parameters(self):
        """Parameters, counting tied ones once."""
        return sum(p.numel() for p in self.parameters())

    def forward(self, input_ids, attention_mask=None, decoder_input_ids=None, labels=None, *, return_logits=None):
        """input_ids: (B, L) int64 in [0, vocab_size), the encoder's input.
        attention_mask: (B, L), nonzero on input_ids' tokens and 0 on padding (either side);
        every row needs a token. None: no padding.
        decoder_input_ids: (B, T) int64, the decoder's input; None: labels shifted right
        after decoder_start_token_id (-100 read as pad_token_id), as transformers does.
        labels: (B, T) int64, the tokens the decoder should produce (-100 where no loss is
        wanted): the mean cross-entropy is computed chunk by chunk, without the (B, T, V) logits.
        return_logits: also compute the logits (default: only when there are no labels).
        Returns LMOutput(logits (B, T, V) or None, loss (scalar) or None), in the model's dtype.
        """
        vocab_size = self.config.vocab_size
        padding = self.padding(input_ids, attention_mask)
        if decoder_input_ids is None:
            if labels is None:
                raise ArgumentValueError("{decoder_input_ids} or {labels} must be given: the decoder needs an input",
                                         decoder_input_ids="decoder_input_ids", labels="labels")
            check_ids("labels", labels, vocab_size, ignore_index=-100)
            decoder_input_ids = self.shift_right(labels)
        else:
            check_ids("decoder_input_ids", decoder_input_ids, vocab_size)
            if labels is not None:
                check_ids("labels", labels, vocab_size, decoder_input_ids.shape, ignore_index=-100)
        with lmkern.use_backend(self.config.kernels):
            h = self.head_input(self.decoder(decoder_input_ids, self.encoder(input_ids, padding), padding))
            loss = None if labels is None else lmkern.linear_cross_entropy(h, self.lm_head.weight, labels)
        want_logits = labels is None if return_logits is None else return_logits
        return LMOutput(self.lm_head(h) if want_logits else None, loss)  # logits (B, T, V)

    def padding(self, input_ids, attention_mask):
        """(B, L) bool, True on the padding of input_ids (B, L), after checking both."""
        check_ids("input_ids", input_ids, self.config.vocab_size)
        padding = check_attention_mask(attention_mask, input_ids) == 0
        empty = padding.all(1)
        if empty.any():
            raise ArgumentValueError("{attention_mask} has a row without tokens (row {}): every input needs one",
                                     int(empty.nonzero()[0, 0]), attention_mask="attention_mask")
        return padding

    def shift_right(self, labels):
        """The decoder's input for labels (B, T): decoder_start_token_id, then labels[:, :-1]
        with -100 read as pad_token_id (transformers' _shift_right)."""
        start = torch.full_like(labels[:, :1], self.config.decoder_start_token_id)
        shifted = torch.cat([start, labels[:, :-1]], dim=1)
        return shifted.masked_fill(shifted == -100, self.config.pad_token_id)

    def head_input(self, h):
        """The decoder's output h (B, T, C) as the LM head takes it: scaled by d_model**-0.5
        when the head is the tied embedding (T5 v1.0, whose embeddings are large)."""
        return h * self.config.d_model**-0.5 if self.config.tie_word_embeddings else h

    def encode(self, input_ids, padding):
        """The encoder output (B, L, C) of input_ids (B, L), padding: (B, L) bool (unchecked)."""
        with lmkern.use_backend(self.config.kernels):
            return self.encoder(input_ids, padding)

    def decode(self, decoder_input_ids, encoder_out, padding, cache=None):
        """The logits (B, T, V) of decoder_input_ids (B, T) (unchecked) after the encoder
        output (B, L, C) with its padding (B, L) bool; cache: a DecoderCache, advanced by T."""
        with lmkern.use_backend(self.config.kernels):
            h = self.head_input(self.decoder(decoder_input_ids, encoder_out, padding, cache))
        return self.lm_head(h)

    def new_cache(self, encoder_out, length):
        """A DecoderCache for up to `length` decoder tokens after the encoder output (B, L, C)."""
        with lmkern.use_backend(self.config.kernels):
            cross = self.decoder.cross_keys_values(encoder_out)
        return DecoderCache(self.config, encoder_out.shape[0], length, cross)

    def new_tokens(self, input_ids, max_new_tokens, *, attention_mask=None, use_cache=True, **options):
        """An iterator over generate's tokens as they come: each step's new token of every
        input, (B,) int64 (the inputs are checked here, before the first step)."""
        c = self.config
        start = input_ids.new_full((input_ids.shape[0], 1), c.decoder_start_token_id)
        decoding = EncodedDecoding(self, input_ids, self.padding(input_ids, attention_mask))
        return generation.new_tokens(decoding, start, max_new_tokens, eos_token_id=c.eos_token_id,
                                     pad_token_id=c.pad_token_id, use_cache=use_cache, **options)

    def generate(self, input_ids, max_new_tokens, **options):
        """The decoder's output for each input, input_ids (B, L) int64, up to max_new_tokens
        tokens after decoder_start_token_id, greedily or by sampling, on the decoders' loop
        (models/generation.py's new_tokens).

        attention_mask: (B, L), nonzero on tokens and 0 on padding (either side); None: no padding.
        use_cache: run the encoder once and decode each new token over a DecoderCache (False
        recomputes the encoder output and every decoder position at every step, for testing).
        do_sample, temperature, top_k, top_p, seed, min_new_tokens: as in models/generation.py's
        new_tokens.
        A sequence ends at eos_token_id and is padded with pad_token_id after it, as
        transformers does; the loop stops when every sequence has ended.

        Returns (B, N) int64, the new tokens without decoder_start_token_id (transformers
        returns it first): N = max_new_tokens, or fewer when every sequence ended sooner.
        The model is in eval mode meanwhile.
        """
        return generation.stacked(self.new_tokens(input_ids, max_new_tokens, **options), input_ids)

    # -- Hugging Face interop (configs and checks: models/t5_hf.py) ------------------------------

    @classmethod
    def from_hf(cls, source, config=None, **overrides):
        """A T5 with the weights of a Hugging Face T5ForConditionalGeneration (v1.0: ReLU,
        tied head; v1.1 / Flan-T5: gated GELU, untied head): a transformers model, a state
        dict, or a local directory with config.json and model.safetensors (or
        pytorch_model.bin), read offline. The config is `config`, else the model's or the
        directory's config, else a state dict's shapes (the heads from the position-bias
        table; relative_attention_max_distance, which no shape shows, 128 unless
        overridden); `overrides` set fields (kernels). Raises
        ValueError naming the keys that are missing, unexpected or misshapen, and for the
        variants this model does not build."""
        if hasattr(source, "state_dict") and hasattr(source, "config"):  # a transformers model
            source, config = source.state_dict(), config or T5Config(**t5_hf.config_from_hf(source.config.to_dict()))
        checkpoint, config = hf.checkpoint_and_config(source, config, overrides, T5Config, t5_hf.config_from_hf,
                                                      t5_hf.config_from_state, "T5")
        model = cls(config)
        model.load_state_dict(t5_hf.from_hf_state_dict(checkpoint, config, model.state_dict()))
        return model

    def to_hf_state_dict(self):
        """This model's weights under transformers' names: its own state dict (the
        embed_tokens and a tied lm_head.weight are `shared`'s)."""
        return self.state_dict()

    def save_hf(self, directory):
        """Writes a directory that transformers' AutoModelForSeq2SeqLM.from_pretrained reads
        as a T5ForConditionalGeneration: config.json and model.safetensors, the tied copies
        of `shared` left out as save_pretrained does."""
        hf.write_directory(directory, self.to_hf_state_dict(), t5_hf.config_to_hf(self.config),
                           t5_hf.tied_names(self.config))


class EncodedDecoding:
    """A T5's decoder after the encoding of its inputs, input_ids (B, L) with their padding
    (B, L) bool, as models/generation.py's loop takes a model: its prompts are
    decoder_start_token_id alone, (B, 1), and no context length bounds it (relative
    positions). new_cache encodes the inputs once (the loop calls it in eval mode) and
    computes the cross-attention's keys and values; without a cache, each decode encodes
    them again."""

    config = types.SimpleNamespace(context_length=math.inf)  # relative positions: no length bound

    def __init__(self, model, input_ids, padding):
        self.model, self.input_ids, self.padding = model, input_ids, padding
        self.encoder_out = None

    @property
    def training(self):
        return self.model.training

    def eval(self):
        self.model.eval()

    def train(self, mode=True):
        self.model.train(mode)

    def check_input_ids(self, input_ids):
        """Nothing to check: the prompts are T5.generate's start tokens."""

    def new_cache(self, batch, length):
        self.encoder_out = self.model.encode(self.input_ids, self.padding)
        return self.model.new_cache(self.encoder_out, length)

    def decode(self, input_ids, cache=None, last=None):
        """The logits (B, T, V) of input_ids (B, T), or (B, V) at the positions last (B,);
        a cache advances by T (every row's last + 1 being T: the rows decode in step)."""
        encoder_out = self.encoder_out if cache is not None else self.model.encode(self.input_ids, self.padding)
        logits = self.model.decode(input_ids, encoder_out, self.padding, cache)
        return logits if last is None else logits[torch.arange(logits.shape[0], device=logits.device), last]


def init_weights(module):
    """T5's initialisation (Mesh TensorFlow's, as transformers has it) of one module, for
    model.apply: normal with std 1 for the embedding and an untied LM head, d_model**-0.5
    for k, v, the FFN's input weights and the position bias, (d_model * d_kv)**-0.5 for q
    (1/sqrt(d_kv) of attention's scale folded in), fan-in**-0.5 for o and wo."""
    if isinstance(module, T5):
        torch.nn.init.normal_(module.shared.weight, std=1.0)
        if not module.config.tie_word_embeddings:
            torch.nn.init.normal_(module.lm_head.weight, std=1.0)
    elif isinstance(module, Attention):
        c = module.config
        torch.nn.init.normal_(module.q.weight, std=(c.d_model * c.d_kv) ** -0.5)
        for weight in (module.k.weight, module.v.weight):
            torch.nn.init.normal_(weight, std=c.d_model**-0.5)
        torch.nn.init.normal_(module.o.weight, std=(c.num_heads * c.d_kv) ** -0.5)
        if hasattr(module, "relative_attention_bias"):
            torch.nn.init.normal_(module.relative_attention_bias.weight, std=c.d_model**-0.5)
    elif isinstance(module, (ReluFeedForward, GatedGeluFeedForward)):
        for linear in module.children():
            torch.nn.init.normal_(linear.weight, std=linear.in_features**-0.5)
