"""Streaming generation for `lmkern generate`: a GPT's new tokens one at a time as they are
produced (the loop of GPT.generate for one prompt, over the same static KV cache and
token picking), and their text as soon as it is complete UTF-8, with each end-of-text
token shown as a document break."""

import torch
from tokenizers.decoders import DecodeStream

from lmkern.models.gpt import pick_token

DOCUMENT_BREAK = "\n\n--- end of document ---\n\n"  # how an end-of-text token reads in a stream


@torch.no_grad()
def stream_tokens(model, prompt_ids, max_new_tokens, *, temperature=1.0, top_k=None, top_p=None, do_sample=False,
                  eos_token_id=None, min_new_tokens=0, seed=None):
    """Yields up to max_new_tokens new token ids (ints) continuing prompt_ids (a list of
    ints), stopping after eos_token_id, which cannot come before min_new_tokens new tokens;
    with min_new_tokens 0, the same tokens as model.generate on that prompt with the same
    arguments."""
    device = model.wte.weight.device
    input_ids = torch.tensor([prompt_ids], dtype=torch.int64, device=device)  # (1, T)
    model.check_input_ids(input_ids)
    longest = len(prompt_ids) + max_new_tokens
    if longest > model.config.context_length:
        raise ValueError(
            f"a prompt of {len(prompt_ids)} tokens and --max-new-tokens {max_new_tokens} reach {longest} tokens: "
            f"more than the model's context length {model.config.context_length}"
        )
    was_training = model.training
    model.eval()
    try:
        generator = None if seed is None else torch.Generator(device).manual_seed(seed)
        cache = model.new_cache(1, longest)
        for produced in range(max_new_tokens):
            logits = model.decode(input_ids, cache)[:, -1].float()  # (1, V); checked above
            if eos_token_id is not None and produced < min_new_tokens:
                logits = logits.index_fill(-1, torch.tensor([eos_token_id], device=device), -float("inf"))
            token = pick_token(logits, temperature, top_k, top_p, do_sample, generator)  # (1,)
            yield int(token)
            if int(token) == eos_token_id:
                return
            input_ids = token[:, None]
    finally:
        model.train(was_training)


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
