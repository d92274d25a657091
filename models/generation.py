"""Generation for a decoder (GPT, Llama): one loop, `new_tokens`, that the models' generate
and `lmkern generate` (through stream_tokens) all run, over a static KV cache, with greedy
or sampled token picking (temperature, top-k, top-p, as transformers' warpers); a stream of
tokens' text as soon as it is complete UTF-8, with each end-of-text token shown as a
document break; and CausalLM, the decoders' common base: their forward, input checks, KV
cache and generate.

What the loop needs of the model: config.context_length, check_input_ids(input_ids)
(raises for ids outside the vocabulary or the context), new_cache(batch, length), decode(
input_ids, cache, last) (the logits (B, T, V), or (B, V) at the positions `last`, advancing
the cache by T, or with `last` each sequence by last + 1; cache None: no cache), and
training, eval() and train(mode). CausalLM gives them all; T5 (models/t5.py) gives its
decoder after one encoding of its inputs."""

import typing

import torch
from tokenizers.decoders import DecodeStream

import lmkern
from lmkern.models.common import check_attention_mask, check_ids


class LMOutput(typing.NamedTuple):
    logits: torch.Tensor  # (B, T, V) in the model's dtype (the autocast dtype under autocast), or None
    loss: torch.Tensor  # scalar in the model's dtype (fp32 under autocast), or None


class KVCache:
    """Preallocated keys and values of every layer, (layers, B, heads, length, head_dim)
    each, and each sequence's length so far, (B,) int64. The model's forward writes the new
    tokens' keys and values and advances the lengths. dtype: what attention computes in
    (CausalLM.new_cache picks it)."""

    def __init__(self, layers, batch, heads, length, head_dim, device, dtype):
        shape = (layers, batch, heads, length, head_dim)
        self.keys = torch.zeros(shape, device=device, dtype=dtype)
        self.values = torch.zeros(shape, device=device, dtype=dtype)
        self.lengths = torch.zeros(batch, dtype=torch.int64, device=device)


class CausalLM(torch.nn.Module):
    """The base of the decoder-only language models: forward with its checks, decode and
    generate (this module's loop), and their KV cache.

    A subclass sets self.config (with vocab_size, context_length and kernels) and
    self.lm_head (a torch.nn.Linear), and defines hidden_states(input_ids, cache) -> the
    final normalised hidden states (B, T, C) (run under the config's kernels; a cache is
    advanced here, after it), cache_layout() -> (layers, kv heads, head_dim) and
    cache_reference() -> a parameter whose device and dtype the cache takes."""

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
        return self.run(input_ids, targets, return_logits, cache)

    def decode(self, input_ids, cache=None, last=None):
        """forward(input_ids, cache=cache).logits without forward's input checks, which wait
        on the device: for generation loops that checked their prompts and total length once
        and feed back the model's own tokens. last: None, or (B,) int64, the one position of
        each row whose logits are wanted: then (B, V), the LM head run on those rows only
        (a prompt's last token; the others' logits are never formed), and a cache keeps each
        row's tokens up to `last` (the positions after it, padding, are written over next)."""
        return self.run(input_ids, None, True, cache, last).logits

    def run(self, input_ids, targets, return_logits, cache, last=None):
        """forward without its checks (last: as decode's)."""
        with lmkern.use_backend(self.config.kernels):
            h = self.hidden_states(input_ids, cache)  # (B, T, C)
            if last is not None:
                h = h[torch.arange(h.shape[0], device=h.device), last]  # (B, C)
            loss = None if targets is None else lmkern.linear_cross_entropy(h, self.lm_head.weight, targets)
        if cache is not None:
            cache.lengths += input_ids.shape[1] if last is None else last + 1
        want_logits = targets is None if return_logits is None else return_logits
        return LMOutput(self.lm_head(h) if want_logits else None, loss)  # logits (B, T, V)

    def check_input_ids(self, input_ids, cache=None):
        """Raises TypeError/ValueError unless input_ids (B, T) int64 are in the vocabulary
        and fit in the context (after the cache's tokens, with a cache)."""
        check_ids("input_ids", input_ids, self.config.vocab_size)
        longest = input_ids.shape[1] + (0 if cache is None else int(cache.lengths.max()))
        if longest > self.config.context_length:
            raise ValueError(f"input_ids reach {longest} tokens per sequence: more than context_length "
                             f"{self.config.context_length}")

    def new_cache(self, batch, length):
        """An empty KVCache for `batch` sequences of up to `length` tokens, in the dtype
        attention runs in: the autocast dtype under torch.autocast, else the weights'."""
        reference = self.cache_reference()
        device = reference.device
        autocast = device.type in ("cpu", "cuda") and torch.is_autocast_enabled(device.type)
        dtype = torch.get_autocast_dtype(device.type) if autocast else reference.dtype
        layers, heads, head_dim = self.cache_layout()
        return KVCache(layers, batch, heads, length, head_dim, device, dtype)

    def generate(self, input_ids, max_new_tokens, **options):
        """Continues each prompt, input_ids (B, T) int64, by up to max_new_tokens tokens,
        greedily or by sampling, over a static KV cache: this module's loop, whose options
        are attention_mask (prompts of different lengths, padded on either side),
        do_sample, temperature, top_k, top_p, seed, eos_token_id, min_new_tokens and
        use_cache (see new_tokens).

        Returns (B, N) int64: the new tokens only, without the prompts (transformers returns
        the padded prompts and the new tokens). N = max_new_tokens, or fewer when every
        sequence reached eos_token_id sooner.
        """
        return generate(self, input_ids, max_new_tokens, **options)

DOCUMENT_BREAK = "\n\n--- end of document ---\n\n"  # how an end-of-text token reads in a stream


@torch.no_grad()
def new_tokens(model, input_ids, max_new_tokens, *, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
               do_sample=False, eos_token_id=None, pad_token_id=None, min_new_tokens=0, seed=None, use_cache=True):
    """Yields each step's new token of every prompt, (B,) int64, up to max_new_tokens steps.

    input_ids: (B, T) int64 prompts. attention_mask: (B, T), 1 (or True) on the prompts'
        tokens and 0 on padding, on either side: each prompt's tokens are numbered from
        position 0, as transformers numbers left-padded prompts. None: no padding.
    do_sample: sample (after temperature, then top_k, then top_p, as transformers'
        warpers) instead of taking the most likely token; seed: sampling draws from its own
        generator, so that a seed gives the same tokens every time (None: from torch's, as
        transformers does).
    eos_token_id: a sequence stops when it produces it, and gives pad_token_id (None: it
        repeats eos_token_id) while others go on, as transformers; the loop ends when every
        sequence has. min_new_tokens: eos_token_id cannot come before that many new tokens.
    use_cache: attend over a static KV cache preallocated for the longest sequence (False
        recomputes every position at every step, for testing).

    The model is in eval mode meanwhile. The inputs are checked once, before the first
    step; the steps feed back the model's own tokens through model.decode, unchecked.
    """
    prompts, lengths = packed_prompts(model, input_ids, attention_mask)  # (B, T'), (B,)
    if not isinstance(max_new_tokens, int) or max_new_tokens < 0:
        raise ValueError(f"max_new_tokens must be an int >= 0, got {max_new_tokens!r}")
    check_sampling(temperature, top_k, top_p, do_sample)
    batch, width = prompts.shape
    longest = width + max_new_tokens
    if longest > model.config.context_length:
        raise ValueError(f"the longest prompt ({width} tokens) and max_new_tokens ({max_new_tokens}) reach "
                         f"{longest} tokens: more than context_length {model.config.context_length}")
    generator = None if seed is None else torch.Generator(prompts.device).manual_seed(seed)
    after_eos = eos_token_id if pad_token_id is None else pad_token_id
    tokens = torch.cat([prompts, prompts.new_zeros(batch, max_new_tokens)], dim=1)  # a row: prompt, new tokens
    rows = torch.arange(batch, device=prompts.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompts.device)
    was_training = model.training
    model.eval()
    try:
        cache = model.new_cache(batch, longest) if use_cache else None  # in eval mode: T5 encodes here
        for step in range(max_new_tokens):
            if cache is None:  # every position again
                logits = model.decode(tokens[:, : width + step], None, last=lengths - 1)  # (B, V)
            elif step == 0:  # the prompts into the cache; each sequence then continues after its own
                logits = model.decode(prompts, cache, last=lengths - 1)
            else:  # each sequence's newest token over its cache
                logits = model.decode(tokens[rows, lengths - 1][:, None], cache)[:, -1]
            logits = logits.float()
            if eos_token_id is not None and step < min_new_tokens:  # out of place: logits may be a view
                logits = logits.index_fill(1, torch.tensor([eos_token_id], device=logits.device), float("-inf"))
            next_token = pick_token(logits, temperature, top_k, top_p, do_sample, generator)  # (B,)
            if eos_token_id is not None:
                next_token = torch.where(finished, after_eos, next_token)
                finished |= next_token == eos_token_id
            yield next_token
            tokens[rows, lengths] = next_token
            lengths += 1
            if finished.all():
                return
    finally:
        model.train(was_training)


def generate(model, input_ids, max_new_tokens, **options):
    """The new tokens of new_tokens(model, input_ids, max_new_tokens, **options) as one
    (B, N) int64 tensor, without the prompts; N = max_new_tokens, or fewer when every
    sequence reached eos_token_id sooner."""
    return stacked(new_tokens(model, input_ids, max_new_tokens, **options), input_ids)


def stacked(steps, input_ids):
    """Each step's (B,) int64 tokens as one (B, N) int64 tensor, N >= 0, for input_ids (B, T)."""
    steps = list(steps)
    return torch.stack(steps, dim=1) if steps else input_ids.new_zeros(input_ids.shape[0], 0)


def stream_tokens(model, prompt_ids, max_new_tokens, **options):
    """Yields the new token ids (ints) of new_tokens(model, the prompt, max_new_tokens,
    **options) for one prompt, prompt_ids (a list of ints), one at a time as they come: the
    tokens of generate on that prompt."""
    input_ids = torch.tensor([prompt_ids], dtype=torch.int64, device=next(model.parameters()).device)  # (1, T)
    for token in new_tokens(model, input_ids, max_new_tokens, **options):
        yield int(token)


def packed_prompts(model, input_ids, attention_mask):
    """(prompts (B, T') with each row's tokens moved to its start in order and zeros after
    them, T' being the longest prompt; lengths (B,) int64), after checking the inputs."""
    check_ids("input_ids", input_ids)
    real = check_attention_mask(attention_mask, input_ids) != 0  # (B, T)
    lengths = real.sum(1)  # (B,)
    if not (lengths > 0).all():
        raise ValueError(f"attention_mask has a row without tokens (row {int((lengths == 0).nonzero()[0, 0])}): "
                         "every prompt needs at least one")
    order = torch.argsort((~real).to(torch.int8), dim=1, stable=True)  # a row's tokens first, in order
    prompts = torch.gather(input_ids.masked_fill(~real, 0), 1, order)[:, : int(lengths.max())]
    model.check_input_ids(prompts)
    return prompts, lengths


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
    """The next token (B,) int64 for each row of logits (B, V) float: the argmax, or a
    sample from softmax(filter_logits(logits / temperature, top_k, top_p)) drawn with
    generator."""
    if not do_sample:
        return logits.argmax(-1)
    probabilities = filter_logits(logits / temperature, top_k, top_p).softmax(-1)
    return torch.multinomial(probabilities, 1, generator=generator).squeeze(1)


# -- Text ------------------------------------------------------------------------------------


def stream_text(tokenizer, token_ids, end_of_text_id=None):
    """Yields the text of an iterable of token ids piece by piece, each piece as soon as its
    bytes form complete characters (a byte-level token may hold part of one), and
    DOCUMENT_BREAK for each end_of_text_id. Other special tokens are left out."""
    decoder = DecodeStream(skip_special_tokens=True)
    for token_id in token_ids:
        if token_id == end_of_text_id:
            yield DOCUMENT_BREAK
            decoder = DecodeStream(skip_special_tokens=True)  # the next document starts afresh
            continue
        piece = decoder.step(tokenizer, token_id)
        if piece:
            yield piece
