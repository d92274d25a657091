"""Pretraining tasks for the loop in models/train.py — GPT's causal language modelling,
BERT's masked language modelling (with next-sentence prediction) and T5's span corruption —
and the evaluations they run, which also serve on their own: a GPT's perplexity over a
token stream with a sliding window, a BERT's MLM loss and accuracy and NSP accuracy, and a
T5's loss and accuracy on the targets of span-corrupted windows.

A training batch depends only on (seed, step, sequence index): every sequence is drawn
from its own generator, so the global batch of a step is the same however it is split
into micro-batches and processes, and a resumed run sees the batches it would have seen.
"""

import math

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmkern.models.bert_data import PairBuilder, SpecialIds
from lmkern.models.data import TokenData
from lmkern.models.errors import ArgumentValueError
from lmkern.models.t5_data import SpanCorruption, T5SpecialIds, pair_tokens
from lmkern.models.tokenizer import load_tokenizer

# Separate random streams for training batches and held-out evaluation sequences.
TRAIN_STREAM, EVAL_STREAM = 0, 1


def generator(*numbers):
    """A CPU torch.Generator seeded from non-negative ints: distinct tuples, unrelated streams."""
    seed = int(np.random.SeedSequence(numbers).generate_state(1, np.uint64)[0])
    return torch.Generator().manual_seed(seed)


def micro_batch(batch_size, part, parts):
    """The sequence indices of the part-th of `parts` equal micro-batches of a global batch."""
    size = batch_size // parts
    return range(part * size, (part + 1) * size)


def check_kind(data, kind, model):
    """Raises unless `data` (TokenData) was prepared with a tokenizer of `kind`."""
    if data.meta["tokenizer_kind"] != kind:
        raise ArgumentValueError("{data_dir} {} was prepared with a {} tokenizer; {} needs a {} one", data.data_dir,
                                 data.meta["tokenizer_kind"], model, kind)


# -- GPT: causal language modelling ------------------------------------------------------------


class CausalLMTask:
    """Next-token prediction on random windows of context_length + 1 tokens of the train
    split (windows cross document boundaries, marked by the end-of-text token); evaluation
    is the loss and perplexity over the first `eval_tokens` validation tokens."""

    def __init__(self, data_dir, context_length, batch_size, seed=0, eval_tokens=32768, eval_batch_size=8):
        self.train_data = TokenData(data_dir, "train")
        self.val_data = TokenData(data_dir, "val")
        check_kind(self.train_data, "bpe", "GPT")
        if len(self.train_data) < context_length + 1:
            raise ArgumentValueError("{data_dir} {}: the train split has {} tokens, fewer than {context_length} {} + 1",
                                     data_dir, len(self.train_data), context_length)
        if len(self.val_data) < 2:
            raise ArgumentValueError("{data_dir} {}: the val split has no tokens to evaluate on (prepare the text with "
                                     "a validation fraction above 0)", data_dir)
        self.context_length, self.batch_size, self.seed = context_length, batch_size, seed
        self.eval_tokens, self.eval_batch_size = eval_tokens, eval_batch_size

    def batch(self, step, part, parts):
        highest_start = len(self.train_data) - self.context_length - 1
        windows = []
        for index in micro_batch(self.batch_size, part, parts):
            draw = generator(TRAIN_STREAM, self.seed, step, index)
            start = int(torch.randint(highest_start + 1, (), generator=draw))
            windows.append(self.train_data.tokens[start : start + self.context_length + 1].astype(np.int64))
        windows = torch.from_numpy(np.stack(windows))  # (B, T + 1)
        return {"input_ids": windows[:, :-1], "targets": windows[:, 1:]}

    def losses(self, model, batch):
        return {"loss": model(batch["input_ids"], batch["targets"]).loss}

    def tokens(self, batch):
        return batch["targets"].numel()

    def evaluate(self, model):
        device = next(model.parameters()).device
        tokens = self.val_data.tokens[: self.eval_tokens]
        result = perplexity(model, tokens, self.context_length, batch_size=self.eval_batch_size, device=device)
        return {"val_loss": result["loss"], "val_perplexity": result["perplexity"]}


def sliding_windows(length, context_length, stride):
    """(begin, first) per window over a stream of `length` tokens: the window's inputs are
    tokens[begin : begin + context_length], its targets the next tokens, and it scores the
    targets from stream position `first` on (the ones no earlier window scored)."""
    windows, scored = [], 1  # the first token has nothing to be predicted from
    for begin in range(0, length - 1, stride):
        windows.append((begin, scored))
        scored = begin + context_length + 1
        if scored >= length:
            break
    return windows


@torch.no_grad()
def perplexity(model, tokens, context_length, stride=None, batch_size=8, device="cpu", progress=False):
    """A GPT's loss and perplexity on a token stream (a 1-D array of ids), every token but
    the first predicted once: windows of context_length tokens advance by `stride` (default
    context_length: no overlap) and each scores only the tokens the window before did not,
    so every scored token beyond the first window sees at least context_length - stride
    tokens before it (Hugging Face's sliding-window perplexity).

    Returns {"loss": mean negative log-likelihood in nats, "perplexity": exp(loss), "tokens": how many}.
    """
    stride = stride or context_length
    if not 1 <= stride <= context_length:
        raise ArgumentValueError("{stride} must be in [1, {context_length} {}], got {}", context_length, stride)
    if len(tokens) < 2:
        raise ArgumentValueError("{tokens} must hold at least 2 tokens, got {}", len(tokens))
    was_training = model.training
    model.eval()
    windows = sliding_windows(len(tokens), context_length, stride)
    total, count = 0.0, 0
    for first_window in tqdm(range(0, len(windows), batch_size), disable=not progress, unit="batch"):
        batch = windows[first_window : first_window + batch_size]
        inputs = torch.zeros((len(batch), context_length), dtype=torch.int64)  # the last window is padded at its end
        targets = torch.full((len(batch), context_length), -100, dtype=torch.int64)
        for row, (begin, first_scored) in enumerate(batch):
            window = torch.from_numpy(tokens[begin : begin + context_length + 1].astype(np.int64))
            inputs[row, : len(window) - 1] = window[:-1]
            targets[row, : len(window) - 1] = window[1:]
            targets[row, : max(0, first_scored - begin - 1)] = -100  # scored by an earlier window
        inputs, targets = inputs.to(device), targets.to(device)
        scored = int((targets != -100).sum())
        total += model(inputs, targets).loss.double().item() * scored  # the loss is the mean over scored tokens
        count += scored
    model.train(was_training)
    loss = total / count
    return {"loss": loss, "perplexity": math.exp(loss), "tokens": count}


# -- BERT: masked language modelling and next-sentence prediction --------------------------------


class MaskedLMTask:
    """BERT pretraining: [CLS] A [SEP] B [SEP] pairs of up to seq_length tokens with dynamic
    masking (models/bert_data.py); MLM plus, with nsp, next-sentence prediction. Evaluation
    is the MLM loss and accuracy (and NSP's) over about `eval_tokens` tokens of fixed
    validation sequences."""

    def __init__(self, data_dir, seq_length, batch_size, seed=0, nsp=True, eval_tokens=32768, eval_batch_size=8):
        train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
        check_kind(train_data, "wordpiece", "BERT")
        self.specials = SpecialIds.of(load_tokenizer(data_dir))
        self.vocab_size = train_data.meta["vocab_size"]
        self.train_pairs = pair_builder(train_data, "train", self.specials, seq_length, nsp)
        self.val_pairs = pair_builder(val_data, "val", self.specials, seq_length, nsp)
        self.batch_size, self.seed, self.nsp = batch_size, seed, nsp
        self.eval_sequences = max(1, eval_tokens // seq_length)
        self.eval_batch_size = eval_batch_size

    def batch(self, step, part, parts):
        indices = micro_batch(self.batch_size, part, parts)
        generators = [generator(TRAIN_STREAM, self.seed, step, index) for index in indices]
        return masked_batch(self.train_pairs, generators, self.vocab_size, self.nsp)

    def losses(self, model, batch):
        """The MLM + NSP loss, and (with NSP) each of them apart."""
        output = model(**batch)
        if not self.nsp:
            return {"loss": output.loss}
        nsp_loss = F.cross_entropy(output.nsp_logits.detach().float(), batch["next_sentence_label"])
        return {"loss": output.loss, "mlm_loss": output.loss.detach() - nsp_loss, "nsp_loss": nsp_loss}

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model):
        device = next(model.parameters()).device
        metrics = masked_lm_metrics(model, self.val_pairs, self.vocab_size, self.eval_sequences,
                                    self.eval_batch_size, self.nsp, device)
        return {f"val_{name}": value for name, value in metrics.items() if name != "sequences"}


def pair_builder(data, split, specials, seq_length, nsp):
    """A PairBuilder over a split (TokenData), with errors that name the data."""
    try:
        return PairBuilder(data.tokens, data.starts, specials, seq_length, nsp)
    except ValueError as error:
        raise ArgumentValueError("{data_dir} {} ({} split): {}", data.data_dir, split, error) from None


def masked_batch(pairs, generators, vocab_size, nsp):
    """One masked sequence per generator, stacked: the inputs of BertForPreTraining.

    Like BERT's original data, every sequence has at least one masked token (one at a random
    maskable position when the 15 % draw chose none), so that no batch has an empty MLM loss.
    """
    rows = []
    specials = pairs.specials
    for draw in generators:
        row = pairs.batch(1, draw, vocab_size)
        ids, labels = row["input_ids"][0], row["labels"][0]  # views: writing them writes the row
        if (labels == -100).all():
            positions = (row["attention_mask"][0] & (ids != specials.cls) & (ids != specials.sep)).nonzero()[:, 0]
            position = positions[int(torch.randint(len(positions), (), generator=draw))]
            labels[position] = ids[position]
            ids[position] = specials.mask
        rows.append(row)
    batch = {name: torch.cat([row[name] for row in rows]) for name in rows[0]}
    if not nsp:  # the labels are -100: leave the NSP loss out rather than average over nothing
        del batch["next_sentence_label"]
    return batch


@torch.no_grad()
def masked_lm_metrics(model, pairs, vocab_size, sequences, batch_size, nsp=True, device="cpu", progress=False):
    """A BertForPreTraining's MLM loss and accuracy (over the masked tokens) and, with nsp,
    NSP loss and accuracy, on `sequences` fixed sequences from `pairs` (a PairBuilder): the
    same ones on every call, whatever the training seed."""
    was_training = model.training
    model.eval()
    sums = dict.fromkeys(("mlm_loss", "mlm_correct", "masked", "nsp_loss", "nsp_correct"), 0.0)
    for first in tqdm(range(0, sequences, batch_size), disable=not progress, unit="batch"):
        generators = [generator(EVAL_STREAM, index) for index in range(first, min(first + batch_size, sequences))]
        batch = {name: value.to(device) for name, value in masked_batch(pairs, generators, vocab_size, nsp).items()}
        output = model(batch["input_ids"], attention_mask=batch["attention_mask"],
                       token_type_ids=batch["token_type_ids"], labels=batch["labels"], return_logits=True)
        targets = batch["labels"][batch["labels"] != -100]  # (M,): the order of output.mlm_logits' rows
        sums["mlm_loss"] += F.cross_entropy(output.mlm_logits.float(), targets, reduction="sum").item()
        sums["mlm_correct"] += (output.mlm_logits.argmax(-1) == targets).sum().item()
        sums["masked"] += len(targets)
        if nsp:
            labels = batch["next_sentence_label"]
            sums["nsp_loss"] += F.cross_entropy(output.nsp_logits.float(), labels, reduction="sum").item()
            sums["nsp_correct"] += (output.nsp_logits.argmax(-1) == labels).sum().item()
    model.train(was_training)
    metrics = {"mlm_loss": sums["mlm_loss"] / sums["masked"], "mlm_accuracy": sums["mlm_correct"] / sums["masked"]}
    if nsp:
        metrics.update(nsp_loss=sums["nsp_loss"] / sequences, nsp_accuracy=sums["nsp_correct"] / sequences)
    return {**metrics, "sequences": sequences}


# -- T5: span corruption ---------------------------------------------------------------------


class SpanCorruptionTask:
    """T5 pretraining: span-corrupted windows of the train split (models/t5_data.py) whose
    inputs have at most seq_length tokens. Evaluation is the loss and accuracy over the
    target tokens of about `eval_tokens` tokens' worth of fixed validation windows."""

    def __init__(self, data_dir, seq_length, batch_size, seed=0, eval_tokens=32768, eval_batch_size=8):
        train_data, val_data = TokenData(data_dir, "train"), TokenData(data_dir, "val")
        check_kind(train_data, "t5", "T5")
        specials = T5SpecialIds.of(load_tokenizer(data_dir))
        self.train_spans = span_corruption(train_data, "train", specials, seq_length)
        self.val_spans = span_corruption(val_data, "val", specials, seq_length)
        self.batch_size, self.seed = batch_size, seed
        self.eval_sequences = max(1, eval_tokens // self.train_spans.window)
        self.eval_batch_size = eval_batch_size

    def batch(self, step, part, parts):
        indices = micro_batch(self.batch_size, part, parts)
        return self.train_spans.batch([generator(TRAIN_STREAM, self.seed, step, index) for index in indices])

    def losses(self, model, batch):
        return {"loss": model(**batch).loss}

    def tokens(self, batch):
        return pair_tokens(batch)

    def evaluate(self, model):
        device = next(model.parameters()).device
        metrics = span_corruption_metrics(model, self.val_spans, self.eval_sequences, self.eval_batch_size, device)
        return {f"val_{name}": value for name, value in metrics.items() if name != "sequences"}


def span_corruption(data, split, specials, seq_length):
    """A SpanCorruption over a split (TokenData), with errors that name the data."""
    try:
        return SpanCorruption(data.tokens, specials, seq_length)
    except ValueError as error:
        raise ArgumentValueError("{data_dir} {} ({} split): {}", data.data_dir, split, error) from None


@torch.no_grad()
def span_corruption_metrics(model, spans, sequences, batch_size, device="cpu", progress=False):
    """A T5's loss (mean over target tokens) and accuracy (of the most likely token at each
    target position, teacher-forced) on `sequences` fixed examples from `spans` (a
    SpanCorruption): the same ones on every call, whatever the training seed."""
    was_training = model.training
    model.eval()
    loss, correct, count = 0.0, 0, 0
    for first in tqdm(range(0, sequences, batch_size), disable=not progress, unit="batch"):
        generators = [generator(EVAL_STREAM, index) for index in range(first, min(first + batch_size, sequences))]
        batch = {name: value.to(device) for name, value in spans.batch(generators).items()}
        output = model(**batch, return_logits=True)
        scored = batch["labels"] != -100
        targets = batch["labels"][scored]
        loss += F.cross_entropy(output.logits[scored].float(), targets, reduction="sum").item()
        correct += (output.logits[scored].argmax(-1) == targets).sum().item()
        count += len(targets)
    model.train(was_training)
    return {"loss": loss / count, "accuracy": correct / count, "sequences": sequences}
