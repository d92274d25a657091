"""Sentence embeddings from a BERT-family encoder: each text's hidden states averaged over
its real tokens (the attention mask), as sentence-transformers' default pooling, optionally
L2-normalised. Texts are batched by length (little padding), results come back in input
order, and a text longer than the model's positions is cut to fit and counted."""

import typing

import torch
import torch.nn.functional as F

from lmkern.models.errors import ArgumentValueError, check_at_least


class Embeddings(typing.NamedTuple):
    vectors: torch.Tensor  # (N, H) float32, row i for texts[i]
    truncated: int  # how many texts were cut to max_length tokens


def encoder_of(model):
    """The BertModel of a BERT model: itself, or the `bert` of one with heads."""
    return getattr(model, "bert", model)


def mean_pool(hidden, attention_mask):
    """hidden: (B, L, H), attention_mask: (B, L) 1 on real tokens -> (B, H) float32, the
    mean over each row's real tokens."""
    mask = attention_mask.to(torch.float32).unsqueeze(-1)  # (B, L, 1)
    return (hidden.float() * mask).sum(1) / mask.sum(1).clamp(min=1e-9)


def encode(tokenizer, texts, max_length):
    """(token ids, token type ids, truncated count) of each text, special tokens added, cut
    to max_length tokens (tokenizers' truncation, which keeps the special tokens)."""
    tokenizer = tokenizer.__class__.from_str(tokenizer.to_str())  # a copy: truncation is the tokenizer's state
    tokenizer.enable_truncation(max_length)
    tokenizer.no_padding()
    encodings = tokenizer.encode_batch(list(texts))
    truncated = sum(1 for encoding in encodings if encoding.overflowing)
    return [e.ids for e in encodings], [e.type_ids for e in encodings], truncated


@torch.inference_mode()
def embed(model, tokenizer, texts, *, batch_size=32, normalize=False, max_length=None, device=None):
    """Sentence embeddings of `texts` (a sequence of str): Embeddings((N, H) float32 on the
    CPU, truncated count). model: a BertModel, or a BERT model with heads (its encoder
    runs); tokenizer: a `tokenizers.Tokenizer` that adds [CLS] and [SEP]; batch_size:
    texts per forward pass, sorted by length; normalize: L2-normalise each row;
    max_length: tokens per text at most (default and limit: the model's max_position);
    device: where the model runs (default: where its weights are). Allocates the (N, H)
    result."""
    encoder = encoder_of(model).eval()
    check_at_least("batch_size", batch_size, 1)
    limit = encoder.config.max_position
    max_length = limit if max_length is None else max_length
    if not 2 <= max_length <= limit:
        raise ArgumentValueError("{max_length} must be in [2, {}] (the model's max_position), got {}", limit,
                                 max_length)
    device = next(encoder.parameters()).device if device is None else torch.device(device)
    encoder.to(device)
    ids, type_ids, truncated = encode(tokenizer, texts, max_length)
    vectors = torch.empty(len(ids), encoder.config.hidden_size)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]))
    for start in range(0, len(order), batch_size):
        rows = order[start:start + batch_size]
        length = max(len(ids[i]) for i in rows)
        batch = torch.zeros(3, len(rows), length, dtype=torch.long)  # ids, type ids, mask; padding: 0
        for row, i in enumerate(rows):
            batch[0, row, :len(ids[i])] = torch.tensor(ids[i])
            batch[1, row, :len(ids[i])] = torch.tensor(type_ids[i])
            batch[2, row, :len(ids[i])] = 1
        batch = batch.to(device)
        hidden, _ = encoder(batch[0], token_type_ids=batch[1], attention_mask=batch[2])  # (b, L, H)
        vectors[rows] = mean_pool(hidden, batch[2]).cpu()
    return Embeddings(F.normalize(vectors, dim=-1) if normalize else vectors, truncated)
