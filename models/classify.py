"""Sequence classification (single texts or pairs) and regression with BERT: examples read
from CSV, TSV or JSONL files, labels mapped to ids, texts tokenized with truncation to the
model's positions, batches padded to their longest sequence, the fine-tuning task that
models/train.py's loop runs (with the best evaluation kept and early stopping), the
predictions of a classifier over many texts, and their metrics: accuracy, macro-F1 and the
confusion matrix, or mean squared error and Pearson's correlation.

The errors name their arguments — the files as train, validation and input, the columns
as text_column, text_pair_column and label_column — so that lmkern's command line can say
its flags instead.
"""

import csv
import dataclasses
import json
import math
import os

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from lmkern.models.errors import ArgumentValueError
from lmkern.models.tasks import TRAIN_STREAM, generator

FORMATS = {".csv": "csv", ".tsv": "tsv", ".tab": "tsv", ".jsonl": "jsonl", ".ndjson": "jsonl"}


# -- examples -------------------------------------------------------------------------------------


@dataclasses.dataclass
class Examples:
    """A file's examples: texts, the second texts of pairs (None for single texts) and
    labels as given (None where the file has no labels: what a classifier is to predict);
    path: the file's."""

    texts: list
    pairs: list = None
    labels: list = None
    path: str = "-"

    def __len__(self):
        return len(self.texts)

    def subset(self, indices):
        pick = lambda values: None if values is None else [values[i] for i in indices]  # noqa: E731
        return Examples(pick(self.texts), pick(self.pairs), pick(self.labels), self.path)


def file_format(path, argument):
    """csv, tsv or jsonl, from the extension of the file `argument` names."""
    extension = os.path.splitext(path)[1].lower()
    if extension not in FORMATS:
        raise ArgumentValueError("{argument} {}: expected a .csv, .tsv or .jsonl file", path, argument=argument)
    return FORMATS[extension]


def read_rows(path, argument):
    """(column names, rows as dicts) of a CSV, TSV or JSONL file (a JSON object a line). A
    JSONL file's columns are its first row's keys."""
    kind = file_format(path, argument)
    with open(path, encoding="utf-8", newline="") as file:
        if kind != "jsonl":
            reader = csv.DictReader(file, delimiter="," if kind == "csv" else "\t")
            rows = list(reader)
            return reader.fieldnames or [], rows
        rows = []
        for number, line in enumerate(file, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as error:
                raise ArgumentValueError("{argument} {}, line {}: not JSON ({})", path, number, error,
                                         argument=argument) from None
            if not isinstance(row, dict):
                raise ArgumentValueError("{argument} {}, line {}: not a JSON object", path, number, argument=argument)
            rows.append(row)
        return (list(rows[0]) if rows else []), rows


def read_examples(path, argument, text_column="text", text_pair_column=None, label_column="label"):
    """The Examples of the file `argument` names (path): the text of column text_column
    (and text_pair_column), and the label of label_column unless it is None. Raises
    ArgumentValueError for an empty file, a missing column (or value) and a text that is
    not a string."""
    columns, rows = read_rows(path, argument)
    if not rows:
        raise ArgumentValueError("{argument} {}: no examples (the file is empty)", path, argument=argument)
    wanted = {"text_column": text_column, "text_pair_column": text_pair_column, "label_column": label_column}
    wanted = {option: column for option, column in wanted.items() if column is not None}
    for option, column in wanted.items():
        if column not in columns:
            raise ArgumentValueError("{option} {!r} is not a column of {argument} {} (its columns: {})", column, path,
                                     ", ".join(map(str, columns)), option=option, argument=argument)
    values = {option: [] for option in wanted}
    for number, row in enumerate(rows, 1):
        for option, column in wanted.items():
            value = row.get(column)
            if value is None or (option != "label_column" and not isinstance(value, str)):
                raise ArgumentValueError("{argument} {}, example {}: its {option} {!r} is {!r}, not a text", path,
                                         number, column, value, option=option, argument=argument)
            values[option].append(value if isinstance(value, str) else json.dumps(value))
    return Examples(values["text_column"], values.get("text_pair_column"), values.get("label_column"), path)


def split_examples(examples, fraction, seed=0):
    """(train, validation) Examples: a fixed random `fraction` of examples held out."""
    if not 0 < fraction < 1:
        raise ArgumentValueError("{val_fraction} must be in (0, 1), got {}", fraction)
    order = torch.randperm(len(examples), generator=generator(TRAIN_STREAM, seed, 2**32)).tolist()
    held_out = max(1, round(fraction * len(examples)))
    if held_out >= len(examples):
        raise ArgumentValueError("{val_fraction} {} of {} examples leaves none to train on", fraction, len(examples))
    return examples.subset(sorted(order[held_out:])), examples.subset(sorted(order[:held_out]))


def label_names(train):
    """The classes of the training labels, sorted: their ids are their places here."""
    names = sorted(set(train.labels))
    if len(names) < 2:
        raise ArgumentValueError("{label_column} of {train} {}: every example has the label {!r}; a classifier "
                                 "needs two or more (or regression: numbers)", train.path, names[0])
    return names


def label_targets(examples, labels, argument):
    """The examples' labels as a tensor: class ids (int64) for the names in `labels`, or
    numbers (float32) for regression (labels None). Raises ArgumentValueError naming labels
    that are not in `labels`, or are not numbers."""
    if labels is None:
        numbers = []
        for number, value in enumerate(examples.labels, 1):
            try:
                numbers.append(float(value))
            except ValueError:
                raise ArgumentValueError("{label_column} of {argument} {}, example {}: {!r} is not a number "
                                         "(regression)", examples.path, number, value, argument=argument) from None
        return torch.tensor(numbers, dtype=torch.float32)
    ids = {name: index for index, name in enumerate(labels)}
    unseen = sorted(set(examples.labels) - set(ids))
    if unseen:
        shown = ", ".join(map(repr, unseen[:5])) + (f" and {len(unseen) - 5} more" if len(unseen) > 5 else "")
        raise ArgumentValueError("{label_column} of {argument} {}: labels not seen in training: {} (the classes: "
                                 "{})", examples.path, shown, ", ".join(map(repr, labels)), argument=argument)
    return torch.tensor([ids[name] for name in examples.labels], dtype=torch.int64)


# -- tokens ---------------------------------------------------------------------------------------


@dataclasses.dataclass
class Encoded:
    """Tokenized examples: per example its ids and segment ids (lists of ints), and how many
    were cut to max_length."""

    ids: list
    type_ids: list
    truncated: int

    def __len__(self):
        return len(self.ids)


def encode(tokenizer, examples, max_length):
    """The examples tokenized as BERT takes them ([CLS] A [SEP] (B [SEP])), each cut to
    max_length tokens (the longer text of a pair first)."""
    tokenizer.no_padding()
    tokenizer.enable_truncation(max_length, strategy="longest_first")
    inputs = examples.texts if examples.pairs is None else list(zip(examples.texts, examples.pairs))
    encodings = tokenizer.encode_batch(inputs)
    return Encoded([e.ids for e in encodings], [e.type_ids for e in encodings],
                   sum(1 for e in encodings if e.overflowing))


def pad_batch(encoded, indices, pad_id):
    """The inputs of a BERT for encoded's examples at `indices`, padded to the longest of
    them: input_ids, token_type_ids (B, L) int64 and attention_mask (B, L) bool."""
    length = max(len(encoded.ids[i]) for i in indices)
    input_ids = torch.full((len(indices), length), pad_id, dtype=torch.int64)
    token_type_ids = torch.zeros((len(indices), length), dtype=torch.int64)
    attention_mask = torch.zeros((len(indices), length), dtype=torch.bool)
    for row, index in enumerate(indices):
        size = len(encoded.ids[index])
        input_ids[row, :size] = torch.tensor(encoded.ids[index])
        token_type_ids[row, :size] = torch.tensor(encoded.type_ids[index])
        attention_mask[row, :size] = True
    return {"input_ids": input_ids, "token_type_ids": token_type_ids, "attention_mask": attention_mask}


@torch.no_grad()
def predict_logits(model, encoded, batch_size, pad_id, device, progress=False):
    """A classifier's logits (N, num_labels) float32 for encoded's N examples, in their
    order, computed in batches of similar lengths (sorted by length: little padding)."""
    was_training = model.training
    model.eval()
    order = sorted(range(len(encoded)), key=lambda index: len(encoded.ids[index]))
    logits = [None] * len(encoded)
    for first in tqdm(range(0, len(order), batch_size), disable=not progress, unit="batch"):
        indices = order[first : first + batch_size]
        batch = {name: value.to(device) for name, value in pad_batch(encoded, indices, pad_id).items()}
        for index, row in zip(indices, model(**batch).logits.float().cpu()):
            logits[index] = row
    model.train(was_training)
    return torch.stack(logits)


# -- metrics --------------------------------------------------------------------------------------


def classification_metrics(logits, targets):
    """loss (mean cross-entropy), accuracy, macro_f1 (F1 averaged over the classes, a class
    never predicted nor present counting as 0) and confusion (rows: true class, columns:
    predicted) of logits (N, C) against class ids targets (N,)."""
    classes = logits.shape[1]
    predicted = logits.argmax(-1)
    confusion = torch.zeros((classes, classes), dtype=torch.int64)
    confusion.index_put_((targets, predicted), torch.ones_like(targets), accumulate=True)
    true_positive = confusion.diag().double()
    f1 = 2 * true_positive / (confusion.sum(0) + confusion.sum(1)).double().clamp(min=1)
    return {"loss": F.cross_entropy(logits.float(), targets).item(),
            "accuracy": (predicted == targets).double().mean().item(), "macro_f1": f1.mean().item(),
            "confusion": confusion.tolist()}


def regression_metrics(predictions, targets):
    """mse and pearson (NaN where either side is constant) of predictions (N,) against targets (N,)."""
    predictions, targets = predictions.double(), targets.double()
    pearson = float(np.corrcoef(predictions.numpy(), targets.numpy())[0, 1]) if len(targets) > 1 else math.nan
    return {"mse": F.mse_loss(predictions, targets).item(), "pearson": pearson}


def majority_baseline(train_targets, val_targets):
    """The validation accuracy of always answering the most common training class."""
    majority = torch.bincount(train_targets).argmax()
    return (val_targets == majority).double().mean().item()


# -- the fine-tuning task -------------------------------------------------------------------------


class EpochTask:
    """What the fine-tuning tasks for models/train.py's loop share: epochs over `examples`
    training examples, shuffled afresh each epoch (by seed and epoch: any run with the seed
    sees the same batches), batch_size examples per step; and the best evaluation by
    `metric` (higher is better): record(step) keeps the last evaluation (self.last, a dict
    with `metric`) if it improves on the best (returning True: save a checkpoint), and
    finished() is True once `patience` evaluations in a row have not (None: never)."""

    def __init__(self, examples, batch_size, metric, seed=0, patience=None):
        self.examples, self.batch_size, self.metric = examples, batch_size, metric
        self.seed, self.patience = seed, patience
        self.steps_per_epoch = math.ceil(examples / batch_size)
        self.last = self.best = None
        self.best_step, self.evaluations_without_progress = None, 0

    def indices(self, step, part, parts):
        """The training examples (a list of indices) of the part-th of `parts` micro-batches of `step`."""
        epoch, index = divmod(step, self.steps_per_epoch)
        order = torch.randperm(self.examples, generator=generator(TRAIN_STREAM, self.seed, epoch))
        indices = order[index * self.batch_size : (index + 1) * self.batch_size].tolist()
        return np.array_split(indices, parts)[part].tolist()

    def record(self, step):
        """Whether the last evaluation, after `step`, is the best yet (then kept as self.best)."""
        value = self.last[self.metric]
        if self.best is None or value > self.best[self.metric] or math.isnan(self.best[self.metric]):
            self.best, self.best_step, self.evaluations_without_progress = self.last, step, 0
            return True
        self.evaluations_without_progress += 1
        return False

    def finished(self):
        return self.patience is not None and self.evaluations_without_progress >= self.patience


class FineTuningTask(EpochTask):
    """Fine-tuning a BertForSequenceClassification (an EpochTask): batch_size examples per
    step padded to their longest; evaluation on the validation examples. The metric that
    picks the best evaluation and stops early is accuracy (regression: Pearson's
    correlation)."""

    def __init__(self, train, train_targets, val, val_targets, batch_size, pad_id, *, seed=0, patience=None,
                 eval_batch_size=64):
        self.regression = train_targets.is_floating_point()
        super().__init__(len(train), batch_size, "pearson" if self.regression else "accuracy", seed, patience)
        self.train, self.train_targets, self.val, self.val_targets = train, train_targets, val, val_targets
        self.pad_id, self.eval_batch_size = pad_id, eval_batch_size

    def batch(self, step, part, parts):
        indices = self.indices(step, part, parts)
        return {**pad_batch(self.train, indices, self.pad_id), "labels": self.train_targets[indices]}

    def losses(self, model, batch):
        return {"loss": model(**batch).loss}

    def tokens(self, batch):
        return int(batch["attention_mask"].sum())

    def evaluate(self, model):
        device = next(model.parameters()).device
        logits = predict_logits(model, self.val, self.eval_batch_size, self.pad_id, device)
        if self.regression:
            self.last = regression_metrics(logits[:, 0], self.val_targets)
            self.last["loss"] = self.last["mse"]
        else:
            self.last = classification_metrics(logits, self.val_targets)
        return {f"val_{name}": value for name, value in self.last.items() if name not in ("confusion", "mse")}
