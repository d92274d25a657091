"""T5's span corruption: the noise's share and span lengths, sentinels, exact reconstruction,
determinism, short windows, and the tokenizer it needs."""

import numpy as np
import pytest
import torch

from lmkern.models import t5_data
from lmkern.models.t5_data import SpanCorruption, T5SpecialIds, corrupt, noise_mask
from lmkern.models.tokenizer import SENTINEL, train_tokenizer

SENTINELS = 20
# As a T5 vocabulary of 1000 lays them out: <pad> 0, </s> 1, <extra_id_0> the highest id.
SPECIALS = T5SpecialIds(pad=0, eos=1, sentinels=torch.arange(999, 999 - SENTINELS, -1))


def counting_stream(length):
    """Tokens 100, 101, ...: any window shows where it came from."""
    return (100 + np.arange(length)).astype(np.uint16)


def uncorrupt(inputs, targets, specials):
    """The window that corrupt() made inputs and targets (1-D, each ending with </s>) from:
    each sentinel of the input replaced by what follows it in the target."""
    sentinels, spans, sentinel = set(specials.sentinels.tolist()), {}, None
    for token in targets[:-1].tolist():
        if token in sentinels:
            sentinel = token
            spans[sentinel] = []
        else:
            spans[sentinel].append(token)
    window = []
    for token in inputs[:-1].tolist():
        window += spans[token] if token in spans else [token]
    return torch.tensor(window, dtype=torch.int64)


def spans_of(mask):
    """The lengths of the runs of True in a 1-D bool tensor."""
    padded = torch.cat([torch.tensor([False]), mask, torch.tensor([False])]).int()
    edges = torch.diff(padded)
    return ((edges == -1).nonzero() - (edges == 1).nonzero())[:, 0]


def test_noise_share_and_mean_span_length_are_t5s():
    generator = torch.Generator().manual_seed(0)
    noise, spans, tokens = 0, 0, 0
    for _ in range(400):
        length = int(torch.randint(20, 200, (), generator=generator))
        mask = noise_mask(length, generator)
        assert not mask[0] and mask[-1]  # kept tokens first, noise last
        expected_noise, expected_spans = t5_data.noise_counts(length)
        assert mask.sum() == expected_noise and len(spans_of(mask)) == expected_spans
        noise, spans, tokens = noise + int(mask.sum()), spans + len(spans_of(mask)), tokens + length
    assert noise / tokens == pytest.approx(0.15, abs=0.005)
    assert noise / spans == pytest.approx(3.0, abs=0.1)


def test_span_lengths_are_spread_and_positions_uniform():
    generator = torch.Generator().manual_seed(1)
    masks = torch.stack([noise_mask(100, generator) for _ in range(2000)])
    lengths = torch.cat([spans_of(mask) for mask in masks])
    assert lengths.min() == 1 and lengths.max() >= 8  # random lengths, not all 3
    # Evenly spread in the middle: near the ends, the kept run that starts a window and
    # the noise span that ends it weigh (as in T5).
    share = masks[:, 20:80].float().mean(0)
    assert share.min() > 0.1 and share.max() < 0.16


def test_counts_match_t5s_for_known_lengths():
    """Values of T5's random_spans_noise_mask and compute_input_and_target_lengths (568 raw
    tokens for inputs of 512, targets of 114)."""
    assert t5_data.noise_counts(100) == (15, 5)
    assert t5_data.noise_counts(2) == (1, 1)
    assert t5_data.window_length(512) == 568
    assert t5_data.corrupted_lengths(568) == (512, 114)


@pytest.mark.parametrize("length", [2, 3, 5, 17, 100])
def test_inputs_and_targets_merge_back_into_the_window(length):
    generator = torch.Generator().manual_seed(length)
    window = torch.from_numpy(counting_stream(length).astype(np.int64))
    for _ in range(20):
        mask = noise_mask(length, generator)
        inputs, targets = corrupt(window, mask, SPECIALS)
        assert inputs[-1] == targets[-1] == SPECIALS.eos
        spans = len(spans_of(mask))
        # The sentinels count down from <extra_id_0>, in the input and the target alike.
        assert inputs[inputs >= 999 - SENTINELS + 1].tolist() == list(range(999, 999 - spans, -1))
        assert targets[targets >= 999 - SENTINELS + 1].tolist() == list(range(999, 999 - spans, -1))
        assert targets[0] == 999  # the target starts with the first sentinel
        assert (len(inputs), len(targets)) == t5_data.corrupted_lengths(length)
        assert torch.equal(uncorrupt(inputs, targets, SPECIALS), window)


def test_batches_are_padded_deterministic_and_fresh_per_seed():
    spans = SpanCorruption(counting_stream(500), SPECIALS, input_length=24)
    assert spans.window == t5_data.window_length(24)
    batch = spans.batch([torch.Generator().manual_seed(seed) for seed in range(4)])
    again = spans.batch([torch.Generator().manual_seed(seed) for seed in range(4)])
    assert all(torch.equal(batch[name], again[name]) for name in batch)
    assert batch["input_ids"].shape[1] <= 24 and batch["attention_mask"].dtype == torch.bool
    other = spans.batch([torch.Generator().manual_seed(seed) for seed in range(4, 8)])
    assert not torch.equal(batch["input_ids"], other["input_ids"])
    for row in range(4):
        inputs = batch["input_ids"][row][batch["attention_mask"][row]]
        targets = batch["labels"][row][batch["labels"][row] != -100]
        window = uncorrupt(inputs, targets, SPECIALS)
        assert len(window) == spans.window and torch.equal(window, window[0] + torch.arange(len(window)))


def test_short_streams_give_short_windows_padded_per_batch():
    spans = SpanCorruption(counting_stream(7), SPECIALS, input_length=64)
    assert spans.window == 7
    inputs, targets = spans.sample(torch.Generator().manual_seed(0))
    assert torch.equal(uncorrupt(inputs, targets, SPECIALS), torch.arange(100, 107))
    tiny = SpanCorruption(counting_stream(2), SPECIALS, input_length=3)
    inputs, targets = tiny.sample(torch.Generator().manual_seed(0))
    assert inputs.tolist() == [100, 999, 1] and targets.tolist() == [999, 101, 1]
    with pytest.raises(ValueError, match="input_length must be at least 3"):
        SpanCorruption(counting_stream(10), SPECIALS, input_length=2)
    with pytest.raises(ValueError, match="at least 2 tokens"):
        SpanCorruption(counting_stream(1), SPECIALS, input_length=10)
    with pytest.raises(ValueError, match="more than the tokenizer's 20 sentinels"):
        SpanCorruption(counting_stream(1000), SPECIALS, input_length=512)


def test_a_t5_tokenizer_has_the_sentinels_at_the_top_and_ends_texts():
    tokenizer = train_tokenizer(["some words for a vocabulary"] * 5, "t5", 300, sentinels=8)
    size = tokenizer.get_vocab_size()  # at most 300: this text has few merges to learn
    assert 266 < size <= 300
    specials = T5SpecialIds.of(tokenizer)
    assert (specials.pad, specials.eos) == (0, 1)
    assert specials.sentinels.tolist() == list(range(size - 1, size - 9, -1))  # <extra_id_0> is the highest id
    assert tokenizer.encode("some words").ids[-1] == 1  # </s>
    assert tokenizer.decode(tokenizer.encode("some words").ids) == "some words"
    assert tokenizer.encode(SENTINEL.format(3), add_special_tokens=False).ids == [size - 4]
    with pytest.raises(ValueError, match="lacks T5's special tokens <pad> </s> <extra_id_0>"):
        T5SpecialIds.of(train_tokenizer(["some words"] * 5, "bpe", 300))
