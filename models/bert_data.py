"""BERT pretraining data: sequence pairs for next-sentence prediction (NSP) built from a
document stream, and dynamic masked-language-model (MLM) masking.

Everything random takes a torch.Generator, so a batch depends only on how that generator
was seeded: the training loop seeds it per step, which gives fresh masks every time a
sequence is seen (RoBERTa's dynamic masking) and the same batches on every run.
"""

import dataclasses

import torch


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    pad: int
    cls: int
    sep: int
    mask: int
    count: int  # special tokens take ids [0, count); random replacements come from above

    @classmethod
    def of(cls, tokenizer):
        ids = {name: tokenizer.token_to_id(f"[{name.upper()}]") for name in ("pad", "unk", "cls", "sep", "mask")}
        if None in ids.values():
            raise ValueError("the tokenizer lacks BERT's special tokens [PAD] [UNK] [CLS] [SEP] [MASK]: train a wordpiece one")
        return cls(ids["pad"], ids["cls"], ids["sep"], ids["mask"], max(ids.values()) + 1)


def mask_tokens(input_ids, maskable, vocab_size, specials, generator, probability=0.15):
    """MLM masking: each maskable token is chosen with `probability`; of those, 80 % become
    [MASK], 10 % a random non-special token and 10 % stay as they are.

    input_ids: (B, L) int64. maskable: (B, L) bool, False for special tokens and padding.
    Returns (masked input_ids, labels): labels hold the original id where chosen, else -100.
    """
    chosen = (torch.rand(input_ids.shape, generator=generator) < probability) & maskable
    labels = torch.where(chosen, input_ids, -100)
    action = torch.rand(input_ids.shape, generator=generator)
    random_ids = torch.randint(specials.count, vocab_size, input_ids.shape, generator=generator)
    masked = torch.where(chosen & (action < 0.8), specials.mask, input_ids)
    masked = torch.where(chosen & (action >= 0.8) & (action < 0.9), random_ids, masked)
    return masked, labels


class PairBuilder:
    """[CLS] A [SEP] B [SEP] sequences from a prepared token stream (TokenData).

    With NSP, B is the text that follows A in its document half of the time (label 0, as
    in Hugging Face's BertForPreTraining) and a span of another document otherwise (label
    1). Without NSP (RoBERTa's full sentences) a sequence is [CLS] span [SEP] and the label
    is -100.
    """

    def __init__(self, tokens, starts, specials, max_length, nsp=True):
        if max_length < 5:
            raise ValueError(f"max_length must be at least 5 ([CLS] a [SEP] b [SEP]), got {max_length}")
        self.tokens, self.specials, self.max_length, self.nsp = tokens, specials, max_length, nsp
        lengths = starts[1:] - starts[:-1]
        self.documents = [(int(s), int(n)) for s, n in zip(starts[:-1], lengths) if n >= 2]
        if len(self.documents) < 2:
            raise ValueError("pair building needs at least two documents of two or more tokens")

    def _document(self, generator, other_than=None):
        while True:
            index = int(torch.randint(len(self.documents), (), generator=generator))
            if index != other_than:
                return index

    def _span(self, index, generator, length, at=None):
        """Up to `length` tokens of document `index`, from a random start (or `at`)."""
        start, size = self.documents[index]
        offset = int(torch.randint(max(1, size - length + 1), (), generator=generator)) if at is None else at
        return torch.from_numpy(self.tokens[start + offset : start + min(size, offset + length)].astype("int64")), offset

    def sample(self, generator):
        """One sequence: (input_ids, token_type_ids, next_sentence_label) as 1-D tensors."""
        cls, sep = torch.tensor([self.specials.cls]), torch.tensor([self.specials.sep])
        if not self.nsp:
            span, _ = self._span(self._document(generator), generator, self.max_length - 2)
            ids = torch.cat([cls, span, sep])
            return ids, torch.zeros_like(ids), -100
        budget = self.max_length - 3
        index = self._document(generator)
        _, size = self.documents[index]
        # A leaves room for at least one token of B, and its document for one token after it.
        a_length = int(torch.randint(1, min(budget - 1, size - 1) + 1, (), generator=generator))
        a, offset = self._span(index, generator, a_length, at=int(torch.randint(size - a_length, (), generator=generator)))
        is_random = bool(torch.rand((), generator=generator) < 0.5)
        if is_random:
            b, _ = self._span(self._document(generator, other_than=index), generator, budget - len(a))
        else:
            b, _ = self._span(index, generator, budget - len(a), at=offset + len(a))
        ids = torch.cat([cls, a, sep, b, sep])
        types = torch.cat([torch.zeros(len(a) + 2, dtype=torch.int64), torch.ones(len(b) + 1, dtype=torch.int64)])
        return ids, types, int(is_random)

    def batch(self, size, generator, vocab_size, mask_probability=0.15):
        """A padded, masked batch: input_ids, token_type_ids, attention_mask (bool), labels
        (MLM, -100 where not masked) and next_sentence_label, each (size, max_length) or (size,)."""
        samples = [self.sample(generator) for _ in range(size)]
        input_ids = torch.full((size, self.max_length), self.specials.pad, dtype=torch.int64)
        token_type_ids = torch.zeros((size, self.max_length), dtype=torch.int64)
        attention_mask = torch.zeros((size, self.max_length), dtype=torch.bool)
        for row, (ids, types, _) in enumerate(samples):
            input_ids[row, : len(ids)] = ids
            token_type_ids[row, : len(ids)] = types
            attention_mask[row, : len(ids)] = True
        maskable = attention_mask & (input_ids != self.specials.cls) & (input_ids != self.specials.sep)
        masked, labels = mask_tokens(input_ids, maskable, vocab_size, self.specials, generator, mask_probability)
        return {
            "input_ids": masked,
            "token_type_ids": token_type_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "next_sentence_label": torch.tensor([label for _, _, label in samples]),
        }
