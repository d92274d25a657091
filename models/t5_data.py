"""T5 pretraining data: span corruption (Raffel et al. 2020, section 3.1.4) of windows of a
prepared token stream.

A window of raw tokens loses about `noise_density` of them in spans of about
`mean_noise_span_length` tokens. The counts are fixed by the window's length, as in T5's
(and transformers') random_spans_noise_mask: round(length * density) noise tokens (at least
one, and at least one token left), round(noise / mean span length) spans (at least one);
where the spans fall is random. The window starts with kept tokens and ends with a noise
span; each span is replaced in the input by a sentinel, <extra_id_0> for the first, and the
target is each sentinel followed by the tokens it replaced:

    window   Thank you for inviting me to your party last week
    input    Thank you <extra_id_0> me to your party last <extra_id_1> </s>
    target   <extra_id_0> for inviting <extra_id_1> week </s>

Everything random takes a torch.Generator, so an example depends only on how that
generator was seeded (models/tasks.py seeds one per step and sequence: resumable, and the
same batches on every run).
"""

import dataclasses

import numpy as np
import torch

from lmkern.models.tokenizer import SENTINEL, T5_SPECIALS

NOISE_DENSITY = 0.15  # T5's: the share of a window's tokens that are corrupted
MEAN_NOISE_SPAN_LENGTH = 3.0  # T5's: tokens per corrupted span, on average


@dataclasses.dataclass(frozen=True)
class T5SpecialIds:
    """The ids span corruption and its batches use: <pad>, </s> and the sentinels."""

    pad: int
    eos: int
    sentinels: torch.Tensor  # (N,) int64: sentinels[i] is the id of <extra_id_i>

    @classmethod
    def of(cls, tokenizer):
        """The ids of a tokenizer's <pad>, </s> and sentinels <extra_id_0>, <extra_id_1>, ...
        (as many as it has in a row from 0); raises ValueError naming what it lacks."""
        missing = [token for token in (*T5_SPECIALS, SENTINEL.format(0)) if tokenizer.token_to_id(token) is None]
        if missing:
            raise ValueError(f"the tokenizer lacks T5's special tokens {' '.join(missing)} (pad, end of sequence, "
                             "span-corruption sentinels <extra_id_0> ...): train a t5 one")
        sentinels = []
        while (token := tokenizer.token_to_id(SENTINEL.format(len(sentinels)))) is not None:
            sentinels.append(token)
        pad, eos = (tokenizer.token_to_id(token) for token in T5_SPECIALS)
        return cls(pad, eos, torch.tensor(sentinels, dtype=torch.int64))


def noise_counts(length, density=NOISE_DENSITY, mean_span_length=MEAN_NOISE_SPAN_LENGTH):
    """(noise tokens, noise spans) of a window of `length` >= 2 tokens."""
    noise = min(max(round(length * density), 1), length - 1)
    # No more spans than kept tokens: a kept token separates every two spans.
    spans = max(round(min(noise, length - noise) / mean_span_length), 1)
    return noise, spans


def corrupted_lengths(length, density=NOISE_DENSITY, mean_span_length=MEAN_NOISE_SPAN_LENGTH):
    """(input length, target length) of a corrupted window of `length` tokens, </s> included."""
    noise, spans = noise_counts(length, density, mean_span_length)
    return length - noise + spans + 1, noise + spans + 1


def window_length(input_length, density=NOISE_DENSITY, mean_span_length=MEAN_NOISE_SPAN_LENGTH):
    """The most raw tokens whose corrupted input has at most input_length tokens (T5's
    compute_input_and_target_lengths: 568 raw tokens for inputs of 512); 0 if none fits."""
    fitting = [length for length in range(2, 2 * input_length + 2)
               if corrupted_lengths(length, density, mean_span_length)[0] <= input_length]
    return max(fitting, default=0)


def random_segmentation(items, segments, generator):
    """(segments,) int64: a uniformly random split of `items` into `segments` runs of at
    least one item each (items >= segments >= 1), from segments - 1 distinct cut points."""
    cuts = (torch.randperm(items - 1, generator=generator)[: segments - 1] + 1).sort().values
    return torch.diff(torch.cat([torch.tensor([0]), cuts, torch.tensor([items])]))


def noise_mask(length, generator, density=NOISE_DENSITY, mean_span_length=MEAN_NOISE_SPAN_LENGTH):
    """(length,) bool, True on the noise: noise_counts(length) tokens in as many spans,
    alternating with runs of kept tokens, the first run kept and the last one noise."""
    noise, spans = noise_counts(length, density, mean_span_length)
    lengths = torch.stack([random_segmentation(length - noise, spans, generator),
                           random_segmentation(noise, spans, generator)], dim=1).flatten()  # kept, noise, kept, ...
    return torch.tensor([False, True]).repeat(spans).repeat_interleave(lengths)


def corrupt(window, mask, specials):
    """(input, target) 1-D int64 of window (L,) int64 with its noise mask (L,) bool: each
    noise span replaced by the next sentinel in the input, the target each sentinel
    followed by its span's tokens; both end with </s>. Raises ValueError if the spans
    outnumber the sentinels."""
    starts = mask & ~torch.cat([torch.tensor([False]), mask[:-1]])  # each span's first token
    spans = int(starts.sum())
    if spans > len(specials.sentinels):
        raise ValueError(f"a window of {len(window)} tokens has {spans} noise spans, more than the tokenizer's "
                         f"{len(specials.sentinels)} sentinels")
    sentinel = specials.sentinels[(starts.cumsum(0) - 1).clamp(min=0)]  # (L,): that of the span a token is in
    eos = torch.tensor([specials.eos])
    kept = ~mask | starts
    inputs = torch.where(starts, sentinel, window)[kept]
    targets = torch.stack([sentinel, window], dim=1).flatten()[torch.stack([starts, mask], dim=1).flatten()]
    return torch.cat([inputs, eos]), torch.cat([targets, eos])


class SpanCorruption:
    """Span-corrupted examples from a token stream (a 1-D array: TokenData.tokens) whose
    corrupted inputs have at most input_length tokens: windows of window_length(input_length)
    raw tokens (all the stream, if it is shorter) from a random start. Windows cross
    document boundaries, each document ending with </s>, as T5's packed examples do."""

    def __init__(self, tokens, specials, input_length, density=NOISE_DENSITY,
                 mean_span_length=MEAN_NOISE_SPAN_LENGTH):
        self.window = window_length(input_length, density, mean_span_length)
        if self.window == 0:
            raise ValueError(f"input_length must be at least 3 (a token, a sentinel and </s>), got {input_length}")
        if len(tokens) < 2:
            raise ValueError(f"span corruption needs at least 2 tokens, got {len(tokens)}")
        self.window = min(self.window, len(tokens))
        _, spans = noise_counts(self.window, density, mean_span_length)
        if spans > len(specials.sentinels):
            raise ValueError(f"windows of {self.window} tokens have {spans} noise spans, more than the tokenizer's "
                             f"{len(specials.sentinels)} sentinels")
        self.tokens, self.specials = tokens, specials
        self.density, self.mean_span_length = density, mean_span_length

    def sample(self, generator):
        """One example: (input, target), 1-D int64 tensors."""
        start = int(torch.randint(len(self.tokens) - self.window + 1, (), generator=generator))
        window = torch.from_numpy(self.tokens[start : start + self.window].astype(np.int64))
        return corrupt(window, noise_mask(len(window), generator, self.density, self.mean_span_length), self.specials)

    def batch(self, generators):
        """One example per generator, padded to the longest input and target: the inputs of
        T5.forward: input_ids (B, L) int64 (<pad> after the input), attention_mask (B, L)
        bool, labels (B, T) int64 (-100 after the target)."""
        inputs, targets = zip(*(self.sample(generator) for generator in generators))
        return padded_pairs(inputs, targets, self.specials.pad)


def padded_pairs(inputs, targets, pad):
    """T5.forward's input_ids (B, L) int64 (pad after each input), attention_mask (B, L)
    bool and labels (B, T) int64 (-100 after each target) of B inputs and targets (1-D
    int64 tensors), padded to the longest of each."""
    lengths = torch.tensor([len(sequence) for sequence in inputs])
    input_ids = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True, padding_value=pad)
    return {"input_ids": input_ids, "attention_mask": torch.arange(input_ids.shape[1]) < lengths[:, None],
            "labels": torch.nn.utils.rnn.pad_sequence(targets, batch_first=True, padding_value=-100)}


def pair_tokens(batch):
    """The input and target tokens of padded_pairs' batch."""
    return int(batch["attention_mask"].sum()) + int((batch["labels"] != -100).sum())
