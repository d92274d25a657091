"""Text-to-text fine-tuning of a T5: (input, target) pairs tokenized, each ending with the
tokenizer's </s>, batches padded to their longest input and target, the task that
models/train.py's loop runs (models/classify.py's epochs, best evaluation and early
stopping), and its evaluation: the loss on the validation targets and the exact match of
greedy generation with them. The examples come from classify.read_examples (CSV, TSV or
JSONL), the target column read as its label column."""

import dataclasses

import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmkern.models.classify import EpochTask
from lmkern.models.errors import ArgumentValueError
from lmkern.models.t5_data import padded_pairs, pair_tokens


@dataclasses.dataclass
class Pairs:
    """Tokenized pairs: per example its input and target ids (lists of ints, each ending
    with </s>), and how many inputs and targets were cut to their maximum length."""

    inputs: list
    targets: list
    truncated: int

    def __len__(self):
        return len(self.inputs)


def encode_pairs(tokenizer, examples, max_length, max_target_length, eos_token_id):
    """The Examples' texts (inputs) and labels (targets) tokenized, cut to max_length and
    max_target_length tokens. Raises ArgumentValueError unless the tokenizer ends a text
    with eos_token_id (the model's), as T5's tokenizers do."""
    tokenizer.no_padding()
    encoded = {}
    for name, texts, length in (("inputs", examples.texts, max_length), ("targets", examples.labels,
                                                                          max_target_length)):
        tokenizer.enable_truncation(length)
        encoded[name] = tokenizer.encode_batch(texts)
    tokenizer.no_truncation()
    if encoded["inputs"][0].ids[-1:] != [eos_token_id]:
        raise ArgumentValueError("{tokenizer}'s tokenizer does not end a text with the model's end-of-sequence token "
                                 "(id {}), as T5's tokenizers do", eos_token_id, tokenizer="tokenizer")
    truncated = sum(1 for e in encoded["inputs"] + encoded["targets"] if e.overflowing)
    return Pairs([e.ids for e in encoded["inputs"]], [e.ids for e in encoded["targets"]], truncated)


def pairs_batch(pairs, indices, pad):
    """T5.forward's input_ids, attention_mask and labels of pairs' examples at `indices`."""
    return padded_pairs([torch.tensor(pairs.inputs[i]) for i in indices],
                        [torch.tensor(pairs.targets[i]) for i in indices], pad)


@torch.no_grad()
def text_to_text_metrics(model, pairs, batch_size, max_new_tokens, device="cpu", progress=False):
    """A T5's loss (mean over the target tokens, teacher-forced) and exact match (the share
    of examples whose greedy generation of up to max_new_tokens tokens is their target, up
    to and with </s>) on `pairs`."""
    was_training = model.training
    model.eval()
    pad = model.config.pad_token_id
    loss, tokens, matches = 0.0, 0, 0
    for first in tqdm(range(0, len(pairs), batch_size), disable=not progress, unit="batch"):
        batch = {name: value.to(device) for name, value in
                 pairs_batch(pairs, range(first, min(first + batch_size, len(pairs))), pad).items()}
        output = model(**batch, return_logits=True)
        scored = batch["labels"] != -100
        loss += F.cross_entropy(output.logits[scored].float(), batch["labels"][scored], reduction="sum").item()
        tokens += int(scored.sum())
        generated = model.generate(batch["input_ids"], max_new_tokens, attention_mask=batch["attention_mask"])
        for row, target in zip(generated.tolist(), batch["labels"].tolist()):
            target = [token for token in target if token != -100]
            matches += row[: len(target)] == target
    model.train(was_training)
    return {"loss": loss / tokens, "exact_match": matches / len(pairs)}


class TextToTextTask(EpochTask):
    """Fine-tuning a T5 on text-to-text pairs (an EpochTask): batch_size examples per step,
    padded to their longest input and target; evaluation on the validation pairs, the best
    by exact match."""

    def __init__(self, train, val, batch_size, pad, max_new_tokens, *, seed=0, patience=None, eval_batch_size=32):
        super().__init__(len(train), batch_size, "exact_match", seed, patience)
        self.train, self.val, self.pad, self.max_new_tokens = train, val, pad, max_new_tokens
        self.eval_batch_size = eval_batch_size

    def batch(self, step, part, parts):
        return pairs_batch(self.train, self.indices(step, part, parts), self.pad)

    def losses(self, model, batch):
        return {"loss": model(**batch).loss}

    def tokens(self, batch):
        return pair_tokens(batch)

    def evaluate(self, model):
        device = next(model.parameters()).device
        self.last = text_to_text_metrics(model, self.val, self.eval_batch_size, self.max_new_tokens, device)
        return {f"val_{name}": value for name, value in self.last.items()}
