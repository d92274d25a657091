"""`lmkern finetune bert` and `lmkern predict`: a BERT fine-tuned for sequence
classification (single texts or pairs) or regression on examples from a CSV, TSV or JSONL
file, then its predictions over a file or stdin. (`lmkern finetune t5`, in finetune_t5,
shares the run: run_in_out.)

finetune starts from an lmkern BERT checkpoint (`lmkern train bert`) or a Hugging Face BERT
directory, runs models/train.py's loop on models/classify.py's task (AdamW, warm-up then
linear decay, dynamic padding, early stopping) and writes, into its own --out folder,
options.json, metrics.jsonl, loss.png, the best evaluation's checkpoint (kind
"bert-classifier", with labels.json) and eval.json (accuracy, macro-F1 and the confusion
matrix, or MSE and Pearson's correlation, with the majority-class baseline).
"""

import contextlib
import csv
import dataclasses
import json
import math
import os
import sys
import tempfile

from lmkern import backend
from lmkern.app import finetune_lm
from lmkern.app.common import (CommandError, add_device, add_kernels, add_quiet, check_kernels, output_folder,
                               show_progress)
from lmkern.app.models import CLASSIFIER, LABELS, load_model
from lmkern.app.run_config import add_options, flags, given_options, holds_run, option, write_options
from lmkern.models.errors import ArgumentValueError, check_at_least
from lmkern.models.train import PRECISIONS

EVAL_FILE = "eval.json"  # the best evaluation's metrics, in the run's folder


@dataclasses.dataclass
class FinetuneConfig:
    """A fine-tuning run's options, checked on construction (the errors name the fields;
    FLAGS gives them as flags). The defaults are BERT's fine-tuning recipe's."""

    model: str = option(help="the model to fine-tune", flags=("model",), choices=("bert",))
    init: str = option(None, "the model to start from: an lmkern BERT checkpoint (a run's folder or a checkpoint "
                       "folder of `lmkern train bert`) or a Hugging Face BERT directory (config.json, "
                       "model.safetensors, and tokenizer.json or vocab.txt)", metavar="DIR")  # required
    train: str = option(None, "the training examples: a .csv, .tsv or .jsonl file", metavar="FILE")  # required
    validation: str = option(None, "the validation examples (default: --val-fraction of --train)", metavar="FILE")
    val_fraction: float = option(0.1, "without --validation, the fraction of --train held out for validation, drawn "
                                 "by --seed (default {default})", metavar="F")
    text_column: str = option("text", "the column of the texts (default {default})", metavar="NAME")
    text_pair_column: str = option(None, "the column of the second texts, for sentence pairs", metavar="NAME")
    label_column: str = option("label", "the column of the labels (default {default})", metavar="NAME")
    regression: bool = option(False, "the labels are numbers, one per example (mean squared error), not classes",
                              flags=("--regression",))
    kernels: str = option("auto", "the lmkern backend of every op (default {default})", choices=backend.CHOICES)
    precision: str = option("auto", "fp32, or bf16 / fp16 under torch.autocast over fp32 weights; default auto: bf16 "
                            "on a GPU, fp32 on CPU", choices=PRECISIONS)
    epochs: int = option(3, "passes over the training examples (default {default})", metavar="N")
    batch_size: int = option(32, "examples per step, padded to the longest of them (default {default})", metavar="N")
    learning_rate: float = option(5e-5, "peak learning rate (default {default})", flags=("--lr",), metavar="LR")
    warmup_fraction: float = option(0.1, "the fraction of the steps that warm the learning rate up; it then decays "
                                    "linearly to 0 (default {default})", metavar="F")
    weight_decay: float = option(0.01, "AdamW's (default {default})", metavar="X")
    grad_clip: float = option(1.0, "gradient norm clip (default {default})", metavar="X")
    eval_every: int = option(None, "evaluate every N steps (default: after each epoch)", metavar="N")
    patience: int = option(3, "stop after N evaluations in a row without a better validation accuracy (regression: "
                           "Pearson's correlation); 0 never stops early (default {default})", metavar="N")
    max_length: int = option(None, "tokens per example at most, longer ones truncated (default: the model's "
                             "positions)", metavar="N")
    dropout: float = option(None, "dropout probability (default: the --init model's)", metavar="P")
    seed: int = option(0, "seeds the classifier's weights, the split, the batches and dropout (default {default})",
                       metavar="N")
    log_every: int = option(50, "a progress line every N steps when stdout is not a terminal (default {default})",
                            metavar="N")

    def __post_init__(self):
        for name in ("init", "train"):
            if getattr(self, name) is None:
                raise ArgumentValueError("{name} is required", name=name)
        for name in ("init", "train", "validation"):
            if getattr(self, name) is not None:
                setattr(self, name, os.path.abspath(getattr(self, name)))
        for name, minimum in (("epochs", 1), ("batch_size", 1), ("patience", 0), ("log_every", 1)):
            check_at_least(name, getattr(self, name), minimum)
        for name, minimum in (("eval_every", 1), ("max_length", 3)):  # [CLS] a token [SEP]
            if getattr(self, name) is not None:
                check_at_least(name, getattr(self, name), minimum)
        if not 0 <= self.warmup_fraction < 1:
            raise ArgumentValueError("{warmup_fraction} must be in [0, 1), got {}", self.warmup_fraction)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ArgumentValueError("{dropout} must be in [0, 1), got {}", self.dropout)
        self.train_config(1, 1)  # which checks the training loop's options

    def train_config(self, steps, eval_every):
        """The training loop's settings for a run of `steps`, evaluating (and saving the best
        checkpoint) every eval_every steps."""
        from lmkern.models.train import TrainConfig

        return TrainConfig(
            steps=steps, batch_size=self.batch_size, micro_batch_size=self.batch_size,
            learning_rate=self.learning_rate, min_learning_rate=0.0, schedule="linear",
            warmup_steps=round(self.warmup_fraction * steps), weight_decay=self.weight_decay,
            betas=(0.9, 0.999),  # BERT's Adam
            grad_clip=self.grad_clip, eval_every=eval_every, checkpoint_every=eval_every, seed=self.seed,
            # A fine-tuning loss swings more than a pretraining one: only a non-finite one is divergence.
            divergence_factor=math.inf, log_every=self.log_every, precision=self.precision,
        )


# What a fine-tuning run's errors call each argument: its fields by their flags, the
# library's checkpoint path by --init.
FLAGS = {**{field.name: flags(field)[0] for field in dataclasses.fields(FinetuneConfig)}, "path": "--init"}


# -- the starting model ---------------------------------------------------------------------------


def load_init(config, num_labels, device):
    """(BertForSequenceClassification with num_labels outputs on the CPU, its tokenizer) from
    --init: an lmkern checkpoint (its encoder; the classifier fresh) or a Hugging Face
    directory (with its classifier if it has one of num_labels outputs, as transformers'
    from_pretrained)."""
    import torch

    from lmkern.models import hf
    from lmkern.models.checkpoint import MANIFEST, find_checkpoint, load_checkpoint_tokenizer, load_config

    torch.manual_seed(config.seed)  # the classifier's initial weights
    overrides = dict(kernels=config.kernels, **({} if config.dropout is None else dict(dropout=config.dropout)))
    path = config.init
    if os.path.isfile(os.path.join(path, hf.CONFIG)) and not os.path.isfile(os.path.join(path, MANIFEST)):
        try:
            return load_hf_init(path, num_labels, overrides)
        except (ValueError, OSError, KeyError) as error:
            raise CommandError(f"--init {path}: {error}") from None
    folder = find_checkpoint(path)
    kind, _ = load_config(folder)
    if kind not in ("bert", CLASSIFIER):
        raise CommandError(f"--init {path} holds a {kind} model: finetune bert starts from a BERT (a checkpoint of "
                           "`lmkern train bert` or a Hugging Face BERT directory)")
    _, pretrained, folder = load_model(folder, config.kernels, device, kinds=("bert", CLASSIFIER))
    model = classifier(dataclasses.replace(pretrained.config, **overrides), num_labels)
    model.bert.load_state_dict(pretrained.bert.cpu().state_dict())
    return model, load_checkpoint_tokenizer(folder)


def classifier(config, num_labels):
    from lmkern.models.bert import BertForSequenceClassification

    return BertForSequenceClassification(config, num_labels=num_labels)


def load_hf_init(path, num_labels, overrides):
    """load_init's work for a Hugging Face BERT directory."""
    from lmkern.models import bert_hf, hf
    from lmkern.models.bert import BertConfig
    from lmkern.models.tokenizer import load_hf_tokenizer

    state, hf_config = hf.read_directory(path, "BERT")
    config = BertConfig(**{**bert_hf.config_from_hf(hf_config), **overrides})
    model = classifier(config, num_labels)
    head = state.get("classifier.weight")
    if head is not None and head.shape[0] == num_labels:
        model.load_hf_state_dict(state)
    else:
        model.bert.load_hf_state_dict(state)  # the encoder of a checkpoint with or without heads
    tokenizer = load_hf_tokenizer(path)
    if tokenizer.get_vocab_size() > config.vocab_size:
        raise ValueError(f"its tokenizer has {tokenizer.get_vocab_size()} tokens, more than the model's "
                         f"{config.vocab_size}")
    return model, tokenizer


def pad_id(tokenizer):
    return tokenizer.token_to_id("[PAD]") or 0


def encode_examples(tokenizer, examples, max_length, flag):
    """classify.encode, warning on stderr how many of the examples of `flag` were truncated."""
    from lmkern.models.classify import encode

    encoded = encode(tokenizer, examples, max_length)
    if encoded.truncated:
        print(f"warning: {encoded.truncated:,} of {len(examples):,} examples of {flag} are longer than {max_length} "
              "tokens and were truncated", file=sys.stderr)
    return encoded


def check_max_length(max_length, model_config, flag="--max-length"):
    """The tokens per example: max_length, or the model's positions by default."""
    if max_length is not None and max_length > model_config.max_position:
        raise CommandError(f"{flag} {max_length}: more than the model's {model_config.max_position} positions")
    return max_length or model_config.max_position


# -- lmkern finetune bert ------------------------------------------------------------------------


def finetune(args):
    from lmkern.models import classify

    config = FinetuneConfig(**given_options(args, FinetuneConfig))
    check_kernels(config.kernels, args.device)
    columns = dict(text_column=config.text_column, text_pair_column=config.text_pair_column,
                   label_column=config.label_column)
    train, val, val_argument = read_splits(config, columns)
    labels = None if config.regression else classify.label_names(train)
    train_targets = classify.label_targets(train, labels, "train")
    val_targets = classify.label_targets(val, labels, val_argument)
    model, tokenizer = load_init(config, 1 if labels is None else len(labels), args.device)
    max_length = check_max_length(config.max_length, model.config)
    flag = f"--train {config.train}"
    encoded_train = encode_examples(tokenizer, train, max_length, flag)
    encoded_val = encode_examples(tokenizer, val, max_length, f"--validation {config.validation}"
                                  if config.validation else f"{flag} (held out)")
    task = classify.FineTuningTask(encoded_train, train_targets, encoded_val, val_targets, config.batch_size,
                                   pad_id(tokenizer), seed=config.seed, patience=config.patience or None)
    steps = config.epochs * task.steps_per_epoch
    train_config = config.train_config(steps, config.eval_every or task.steps_per_epoch)
    info = dict(labels=labels or [], regression=config.regression, max_length=max_length, **columns)
    baseline = None if labels is None else classify.majority_baseline(train_targets, val_targets)
    summary = f"{len(labels)} classes" if labels else "regression"
    result = run_in_out(args, config, model, tokenizer, task, train_config, CLASSIFIER, summary, {LABELS: info},
                        dict(majority_baseline=baseline, examples={"train": len(train), "validation": len(val)},
                             **info))
    report(result, args.out)


def read_splits(config, columns):
    """(train, validation, the validation's argument) Examples of a fine-tuning run's
    options (a FinetuneConfig): --validation's, or --val-fraction of --train's held out.
    columns: read_examples' column keywords."""
    from lmkern.models import classify

    train = classify.read_examples(config.train, "train", **columns)
    if config.validation is not None:
        return train, classify.read_examples(config.validation, "validation", **columns), "validation"
    return *classify.split_examples(train, config.val_fraction, config.seed), "train"


def run_in_out(args, config, model, tokenizer, task, train_config, kind, summary, extras, facts):
    """Claims --out, fine-tunes model on task (an EpochTask) there (run), and writes eval.json:
    the best evaluation's step and metrics with `facts` (a dict); returns that."""
    from lmkern.models.files import write_json

    inputs = [("--init", config.init), ("--train", config.train)]
    inputs += [("--validation", config.validation)] if config.validation else []
    with output_folder(args.out, "lmkern finetune", inputs=inputs, overwrite=args.overwrite):
        if holds_run(args.out) and not args.overwrite:
            raise CommandError(f"--out {args.out} already holds a fine-tuning run: choose another --out, or pass "
                               "--overwrite to replace its checkpoints and metrics")
        with tempfile.TemporaryDirectory() as tokenizer_dir:
            run(args, config, model, tokenizer, tokenizer_dir, task, train_config, kind, summary, extras)
        result = {"step": task.best_step, "metric": task.metric, **task.best, **facts}
        write_json(os.path.join(args.out, EVAL_FILE), result)
    return result


def run(args, config, model, tokenizer, tokenizer_dir, task, train_config, kind, summary, extras):
    """Fine-tunes model on task in --out (claimed), saving the best evaluation's checkpoint
    (of `kind`, with the files of `extras`: {name: JSON}); summary: what the model learns,
    in words."""
    from lmkern.app.train import clear_run
    from lmkern.models.checkpoint import checkpoint_bytes, save_checkpoint
    from lmkern.models.files import check_free_space, remove_files
    from lmkern.models.tokenizer import save_tokenizer
    from lmkern.models.train import TrainingDiverged
    from lmkern.models.train import train as train_loop

    save_tokenizer(tokenizer, tokenizer_dir)
    check_free_space(args.out, checkpoint_bytes(model, tokenizer_dir), "a checkpoint")
    clear_run(args.out)  # the run --overwrite replaces
    remove_files(args.out, [EVAL_FILE])
    write_options(args.out, config)

    def save_best(step, model, state):
        if task.record(step):  # the state without the optimizer's: a fine-tuning run does not resume
            save_checkpoint(args.out, step, model, {name: state[name] for name in ("step", "train_config")},
                            kind=kind, config=dataclasses.asdict(model.config), tokenizer_dir=tokenizer_dir,
                            keep=1, extras=extras)

    parameters = sum(p.numel() for p in model.parameters()) / 1e6
    print(f"fine-tuning {config.model} ({parameters:.2f}M parameters, {summary}) from {config.init} on "
          f"{len(task.train):,} examples, validating on {len(task.val):,}: {config.epochs} epochs of "
          f"{task.steps_per_epoch} steps of {config.batch_size}; kernels {config.kernels}, precision "
          f"{config.precision}, device {args.device}; run in {args.out}", flush=True)
    try:
        train_loop(model, task, train_config, args.out, save=save_best, device=args.device, progress=not args.quiet)
    except TrainingDiverged as error:
        raise CommandError(f"{error}: try a lower --lr") from None


def report(result, out):
    """Prints the best evaluation: its metrics and the confusion matrix."""
    from lmkern.models.checkpoint import newest_checkpoint

    if result["regression"]:
        print(f"best validation at step {result['step']}: MSE {result['mse']:.4g}, Pearson {result['pearson']:.4f}")
    else:
        print(f"best validation at step {result['step']}: accuracy {result['accuracy']:.2%}, macro-F1 "
              f"{result['macro_f1']:.4f} (majority-class baseline {result['majority_baseline']:.2%})")
        print(confusion_table(result["confusion"], result["labels"]))
    print(f"checkpoint {newest_checkpoint(out)}; metrics {os.path.join(out, EVAL_FILE)}, "
          f"{os.path.join(out, 'metrics.jsonl')}, plot {os.path.join(out, 'loss.png')}")


def confusion_table(confusion, labels):
    """The confusion matrix as text: a row per true class, a column per predicted one."""
    width = max(len(str(value)) for row in confusion for value in row)
    names = [str(name) for name in labels]
    first = max(len("true \\ predicted"), *map(len, names))
    widths = [max(width, len(name)) for name in names]
    lines = ["true \\ predicted".ljust(first) + "".join(f"  {name:>{w}}" for name, w in zip(names, widths))]
    for name, row in zip(names, confusion):
        lines.append(name.ljust(first) + "".join(f"  {value:>{w}}" for value, w in zip(row, widths)))
    return "\n".join(lines)


# -- lmkern predict ------------------------------------------------------------------------------


def predict(args):
    import torch

    from lmkern.models import classify
    from lmkern.models.checkpoint import find_checkpoint, load_checkpoint_tokenizer, load_config, load_json
    from lmkern.models.files import atomic_file, overlap

    check_at_least("batch_size", args.batch_size, 1)
    folder = find_checkpoint(args.checkpoint)
    kind, _ = load_config(folder)
    if kind != CLASSIFIER:
        raise CommandError(f"--checkpoint {folder} holds a {kind} model: predict takes a classifier of `lmkern "
                           "finetune bert`")
    info = load_json(folder, LABELS)
    text_column = args.text_column or info["text_column"]
    pair_column = args.text_pair_column or info["text_pair_column"]
    output_kind = None if args.output is None else classify.file_format(args.output, "output")
    if args.output is not None:
        if args.input != "-" and overlap(args.output, args.input) == "same":
            raise CommandError(f"--output {args.output} is the --input: write the predictions to a file of their own")
        if os.path.exists(args.output) and not args.overwrite:
            raise CommandError(f"--output {args.output} exists: choose another file, or pass --overwrite to replace it")
    if args.input == "-":
        if pair_column is not None:
            raise CommandError(f"--input -: one text a line, but the model classifies pairs ({text_column}, "
                               f"{pair_column}): give a .csv, .tsv or .jsonl file")
        examples = classify.Examples(sys.stdin.read().splitlines())
        if not examples.texts:
            raise CommandError("--input -: no text on stdin")
    else:
        examples = classify.read_examples(args.input, "input", text_column, pair_column, label_column=None)
    _, model, folder = load_model(folder, args.kernels, args.device, kinds=(CLASSIFIER,))
    tokenizer = load_checkpoint_tokenizer(folder)
    max_length = check_max_length(args.max_length or info["max_length"], model.config)
    encoded = encode_examples(tokenizer, examples, max_length, f"--input {args.input}")
    logits = classify.predict_logits(model, encoded, args.batch_size, pad_id(tokenizer), args.device,
                                     show_progress(args))
    labels = info["labels"]
    if labels:
        probabilities = torch.softmax(logits, -1).tolist()
        rows = [{"label": labels[max(range(len(p)), key=p.__getitem__)],
                 "probabilities": dict(zip(labels, p))} for p in probabilities]
    else:
        rows = [{"score": value} for value in logits[:, 0].tolist()]
    with (contextlib.nullcontext(sys.stdout) if args.output is None else
          atomic_file(args.output, encoding="utf-8", newline="")) as file:
        write_predictions(file, rows, output_kind or "jsonl")
    if args.output is not None:
        print(f"{len(rows):,} predictions in {args.output}", file=sys.stderr)


def write_predictions(file, rows, kind):
    """Writes prediction rows as JSONL, or as CSV/TSV (label, then a probability_<class>
    column per class; regression: score)."""
    if kind == "jsonl":
        file.writelines(json.dumps(row) + "\n" for row in rows)
        return
    writer = csv.writer(file, delimiter="," if kind == "csv" else "\t")
    if "score" in rows[0]:
        writer.writerow(["score"])
        writer.writerows([row["score"]] for row in rows)
        return
    labels = list(rows[0]["probabilities"])
    writer.writerow(["label", *(f"probability_{label}" for label in labels)])
    writer.writerows([row["label"], *(f"{p:.6g}" for p in row["probabilities"].values())] for row in rows)


# -- parsers ---------------------------------------------------------------------------------------


def add_parser(commands):
    models = commands.add_parser(
        "finetune", help="fine-tune a model: a BERT classifier or regressor (bert), a T5 on text-to-text pairs (t5), "
        "or a GPT or Llama on your text",
        description="`lmkern finetune bert`: sequence classification or regression from a CSV/TSV/JSONL file. "
        "`lmkern finetune t5`: text to text, inputs and targets from a CSV/TSV/JSONL file. "
        "`lmkern finetune gpt|llama`: continued pretraining on prepared data, `lmkern train`'s options.",
    ).add_subparsers(dest="model", required=True, metavar="MODEL")
    tune = models.add_parser(
        "bert", help="fine-tune a BERT for sequence classification or regression on a CSV/TSV/JSONL file",
        description="Fine-tunes a BERT (an lmkern checkpoint or a Hugging Face directory) to classify texts or pairs "
        "of texts, or to score them (--regression), through the training loop of `lmkern train`: AdamW, warm-up then "
        "linear decay, batches padded to their longest example, evaluation after each epoch (or --eval-every), "
        "early stopping (--patience). OUT gets options.json, metrics.jsonl, loss.png, the best evaluation's "
        "checkpoint (checkpoints/step-N with labels.json, and the `checkpoint` link: `lmkern predict` reads it) and "
        "eval.json (accuracy, macro-F1, confusion matrix, majority baseline; regression: MSE, Pearson).",
    )
    tune.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    tune.add_argument("--overwrite", action="store_true",
                      help="start anew in an --out holding a fine-tuning run (its checkpoints and metrics are "
                      "replaced) or other files (left as they are)")
    add_device(tune)
    add_quiet(tune)
    add_options(tune, FinetuneConfig, "fine-tuning options", model_positional=False)
    tune.set_defaults(run=finetune, flags=FLAGS, interrupted="the best checkpoint so far is in --out")
    finetune_lm.add_parsers(models)
    from lmkern.app import finetune_t5  # which builds on this module

    finetune_t5.add_parser(models)

    pred = commands.add_parser(
        "predict", help="a fine-tuned classifier's labels and probabilities for texts from a file or stdin",
        description="Classifies the texts of --input (a .csv, .tsv or .jsonl file with the text columns the model was "
        "fine-tuned on, or one text a line from stdin with `--input -`) with a checkpoint of `lmkern finetune bert`, "
        "in batches of similar lengths, and writes a label and the class probabilities (regression: a score) per "
        "text, in the input's order, to --output (.csv, .tsv or .jsonl) or as JSON lines to stdout.",
    )
    pred.add_argument("--checkpoint", required=True, metavar="DIR",
                      help="a checkpoint folder of `lmkern finetune bert`, or its run's --out")
    pred.add_argument("--input", required=True, metavar="FILE", help="the texts: a .csv, .tsv or .jsonl file, or - "
                      "(stdin, one text a line)")
    pred.add_argument("--output", metavar="FILE", help="a .csv, .tsv or .jsonl file (default: JSON lines on stdout)")
    pred.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    pred.add_argument("--text-column", metavar="NAME", help="the column of the texts (default: the fine-tuning's)")
    pred.add_argument("--text-pair-column", metavar="NAME",
                      help="the column of the second texts (default: the fine-tuning's, if it had pairs)")
    pred.add_argument("--batch-size", type=int, default=64, metavar="N", help="texts per forward pass (default 64)")
    pred.add_argument("--max-length", type=int, metavar="N",
                      help="tokens per text at most, longer ones truncated (default: the fine-tuning's)")
    add_device(pred)
    add_quiet(pred)
    add_kernels(pred)
    pred.set_defaults(run=predict, flags={"path": "--checkpoint", "input": "--input", "output": "--output",
                                          "text_column": "--text-column", "text_pair_column": "--text-pair-column",
                                          "batch_size": "--batch-size"})
