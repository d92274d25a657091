"""Generation for a decoder (GPT): one loop, `new_tokens`, that GPT.generate and
`lmkern generate` (through stream_tokens) both run, over a static KV cache, with greedy or
sampled token picking (temperature, top-k, top-p, as transformers' warpers); and a stream of
tokens' text as soon as it is complete UTF-8, with each end-of-text token shown as a
document break.

What the loop needs of the model: config.context_length, check_input_ids(input_ids)
(raises for ids outside the vocabulary or the context), new_cache(batch, length) (a cache
with `lengths`, (B,) int64) and decode(input_ids, cache) (the logits (B, T, V), advancing
the cache by T; cache None: no cache)."""

import torch
from tokenizers.decoders import DecodeStream

from lmkern.models.common import check_attention_mask, check_ids

DOCUMENT_BREAK = "\n\n--- end of document ---\n\n"  # how an end-of-text token reads in a stream


@torch.no_grad()
def new_tokens(model, input_ids, max_new_tokens, *, attention_mask=None, temperature=1.0, top_k=None, top_p=None,
               do_sample=False, eos_token_id=None, min_new_tokens=0, seed=None, use_cache=True):
    """Yields each step's new token of every prompt, (B,) int64, up to max_new_tokens steps.

    input_ids: (B, T) int64 prompts. attention_mask: (B, T), 1 (or True) on the prompts'
        tokens and 0 on padding, on either side: each prompt's tokens are numbered from
        position 0, as transformers numbers left-padded prompts. None: no padding.
    do_sample: sample (after temperature, then top_k, then top_p, as transformers'
        warpers) instead of taking the most likely token; seed: sampling draws from its own
        generator, so that a seed gives the same tokens every time (None: from torch's, as
        transformers does).
    eos_token_id: a sequence stops when it produces it, and repeats it while others go on;
        the loop ends when every sequence has. min_new_tokens: eos_token_id cannot come
        before that many new tokens.
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
    cache = model.new_cache(batch, longest) if use_cache else None
    tokens = torch.cat([prompts, prompts.new_zeros(batch, max_new_tokens)], dim=1)  # a row: prompt, new tokens
    rows = torch.arange(batch, device=prompts.device)
    finished = torch.zeros(batch, dtype=torch.bool, device=prompts.device)
    was_training = model.training
    model.eval()
    try:
        for step in range(max_new_tokens):
            if cache is None:  # every position again
                logits = model.decode(tokens[:, : width + step], None)[rows, lengths - 1]  # (B, V)
            elif step == 0:  # the prompts into the cache; each sequence then continues after its own
                logits = model.decode(prompts, cache)[rows, lengths - 1]
                cache.lengths.copy_(lengths)
            else:  # each sequence's newest token over its cache
                logits = model.decode(tokens[rows, lengths - 1][:, None], cache)[:, -1]
            logits = logits.float()
            if eos_token_id is not None and step < min_new_tokens:  # out of place: logits may be a view
                logits = logits.index_fill(1, torch.tensor([eos_token_id], device=logits.device), float("-inf"))
            next_token = pick_token(logits, temperature, top_k, top_p, do_sample, generator)  # (B,)
            if eos_token_id is not None:
                next_token = torch.where(finished, eos_token_id, next_token)
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
    steps = list(new_tokens(model, input_ids, max_new_tokens, **options))
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
