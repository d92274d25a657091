"""BERT's pretraining data: NSP pairs from a document stream and dynamic MLM masking."""

import numpy as np
import pytest
import torch

from lmkern.models.bert_data import PairBuilder, SpecialIds, mask_tokens
from lmkern.models.tokenizer import train_tokenizer

SPECIALS = SpecialIds(pad=0, cls=2, sep=3, mask=4, count=5)
VOCAB = 1000


def stream(document_lengths):
    """Documents whose tokens count up from 100 * (document + 1), so that any span shows
    which document it came from and where."""
    tokens = np.concatenate([100 * (d + 1) + np.arange(n) for d, n in enumerate(document_lengths)]).astype(np.uint16)
    starts = np.concatenate([[0], np.cumsum(document_lengths)]).astype(np.int64)
    return tokens, starts


def test_special_ids_come_from_the_tokenizer():
    tokenizer = train_tokenizer(["some words for a vocabulary"] * 5, "wordpiece", 100)
    assert SpecialIds.of(tokenizer) == SPECIALS  # the trainer puts them first, in order
    with pytest.raises(ValueError, match="lacks BERT's special tokens"):
        SpecialIds.of(train_tokenizer(["some words"] * 5, "bpe", 300))


def test_masking_proportions_specials_and_labels():
    generator = torch.Generator().manual_seed(0)
    input_ids = torch.randint(SPECIALS.count, VOCAB, (256, 512), generator=generator)
    maskable = torch.rand(input_ids.shape, generator=generator) < 0.9  # the rest: specials and padding
    masked, labels = mask_tokens(input_ids, maskable, VOCAB, SPECIALS, generator)
    chosen = labels != -100
    assert not chosen[~maskable].any() and torch.equal(masked[~maskable], input_ids[~maskable])
    assert torch.equal(labels[chosen], input_ids[chosen])
    n = maskable.sum().item()
    share = chosen.sum().item() / n
    assert abs(share - 0.15) < 4 * (0.15 * 0.85 / n) ** 0.5
    became_mask = (masked == SPECIALS.mask) & chosen
    unchanged = (masked == input_ids) & chosen
    replaced = chosen & ~became_mask & ~unchanged
    k = chosen.sum().item()
    for count, expected in ((became_mask, 0.8), (replaced, 0.1 * (1 - 1 / VOCAB)), (unchanged, 0.1)):
        assert abs(count.sum().item() / k - expected) < 4 * (expected * (1 - expected) / k) ** 0.5 + 1 / VOCAB
    assert (masked[replaced] >= SPECIALS.count).all()
    again = mask_tokens(input_ids, maskable, VOCAB, SPECIALS, torch.Generator().manual_seed(5))
    same = mask_tokens(input_ids, maskable, VOCAB, SPECIALS, torch.Generator().manual_seed(5))
    assert torch.equal(again[1], same[1]) and not torch.equal(again[1], labels)  # fresh per seed, fixed by it


def test_pairs_are_well_formed_and_half_are_next():
    tokens, starts = stream([30, 3, 50, 1, 80, 12])
    builder = PairBuilder(tokens, starts, SPECIALS, max_length=24)
    generator = torch.Generator().manual_seed(0)
    next_count = 0
    for _ in range(400):
        ids, types, label = builder.sample(generator)
        assert len(ids) <= 24 and ids[0] == SPECIALS.cls and ids[-1] == SPECIALS.sep
        first_sep = (ids == SPECIALS.sep).nonzero()[0, 0]
        a, b = ids[1:first_sep], ids[first_sep + 1 : -1]
        assert len(a) >= 1 and len(b) >= 1
        assert torch.equal(types, torch.cat([torch.zeros(len(a) + 2), torch.ones(len(b) + 1)]).long())
        assert (torch.diff(a) == 1).all() and (torch.diff(b) == 1).all()  # contiguous spans
        same_document = a[0] // 100 == b[0] // 100
        if label == 0:
            next_count += 1
            assert same_document and b[0] == a[-1] + 1  # B is what follows A
        else:
            assert label == 1 and not same_document
    assert abs(next_count / 400 - 0.5) < 4 * (0.25 / 400) ** 0.5


def test_batch_pads_masks_and_can_drop_nsp():
    tokens, starts = stream([30, 50, 80])
    generator = torch.Generator().manual_seed(0)
    batch = PairBuilder(tokens, starts, SPECIALS, max_length=32).batch(16, generator, VOCAB)
    assert batch["input_ids"].shape == (16, 32) and batch["next_sentence_label"].shape == (16,)
    padding = ~batch["attention_mask"]
    assert (batch["input_ids"][padding] == SPECIALS.pad).all() and (batch["labels"][padding] == -100).all()
    full = PairBuilder(tokens, starts, SPECIALS, max_length=32, nsp=False).batch(16, generator, VOCAB)
    assert (full["next_sentence_label"] == -100).all() and (full["token_type_ids"] == 0).all()
    assert (full["attention_mask"].sum(1) >= 3).all()


def test_bad_input():
    tokens, starts = stream([30, 1])
    with pytest.raises(ValueError, match="at least two documents"):
        PairBuilder(tokens, starts, SPECIALS, max_length=16)
    with pytest.raises(ValueError, match="max_length must be at least 5"):
        PairBuilder(*stream([30, 30]), SPECIALS, max_length=4)
