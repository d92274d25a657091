"""`lmkern finetune t5`: a T5 fine-tuned on text-to-text pairs (an input and a target column
of a CSV, TSV or JSONL file) from an lmkern T5 checkpoint or a Hugging Face T5 directory,
through `lmkern finetune bert`'s run (lmkern/app/finetune.py: the same options where they
apply, run folder, best checkpoint and eval.json) on models/text_to_text.py's task. The
checkpoint is a plain T5's: `lmkern generate` continues a prompt with it."""

import dataclasses
import sys

from lmkern.app.common import CommandError, add_device, add_quiet, check_kernels
from lmkern.app.finetune import FLAGS, FinetuneConfig, read_splits, run_in_out
from lmkern.app.run_config import add_options, flags, given_options, option
from lmkern.models.errors import ArgumentValueError, check_at_least


@dataclasses.dataclass
class T5FinetuneConfig(FinetuneConfig):
    """FinetuneConfig with a T5's defaults (the columns, the learning rate for AdamW, the
    lengths of T5's fine-tuning) and the targets' length; BERT's pairs and regression do not
    apply."""

    model: str = option(help="the model to fine-tune", flags=("model",), choices=("t5",))
    init: str = option(None, "the model to start from: an lmkern T5 checkpoint (a run's folder or a checkpoint folder "
                       "of `lmkern train t5` or `finetune t5`) or a Hugging Face T5 directory (config.json, "
                       "model.safetensors, tokenizer.json)", metavar="DIR")  # required
    text_column: str = option("input", "the column of the input texts (default {default})", metavar="NAME",
                              flags=("--input-column", "--text-column"))
    label_column: str = option("target", "the column of the target texts (default {default})", metavar="NAME",
                               flags=("--target-column", "--label-column"))
    learning_rate: float = option(3e-4, "peak learning rate (default {default})", flags=("--lr",), metavar="LR")
    patience: int = option(3, "stop after N evaluations in a row without a better validation exact match; 0 never "
                           "stops early (default {default})", metavar="N")
    max_length: int = option(512, "input tokens per example at most, longer ones truncated (default {default})",
                             metavar="N")
    max_target_length: int = option(128, "target tokens per example at most, longer ones truncated, and the most "
                                    "tokens generated per example in evaluation (default {default})", metavar="N")

    def __post_init__(self):
        for name in ("text_pair_column", "regression"):
            if getattr(self, name):
                raise ArgumentValueError("{" + name + "} does not apply to T5: its examples are an input and a target")
        check_at_least("max_target_length", self.max_target_length, 1)
        super().__post_init__()


# FinetuneConfig's FLAGS, with this config's flags for its fields and --init for the tokenizer's folder.
T5_FLAGS = {**FLAGS, **{field.name: flags(field)[0] for field in dataclasses.fields(T5FinetuneConfig)},
            "tokenizer": "--init", "tokenizer_dir": "--init"}


def load_init(config):
    """(T5 on the CPU, its tokenizer) from --init: an lmkern T5 checkpoint or run folder, or a
    Hugging Face T5 directory with tokenizer.json."""
    from lmkern.app.models import initial_model, is_checkpoint
    from lmkern.models.checkpoint import load_checkpoint_tokenizer
    from lmkern.models.tokenizer import load_tokenizer

    overrides = dict(kernels=config.kernels, **({} if config.dropout is None else dict(dropout_rate=config.dropout)))
    model, folder = initial_model(config.init, "t5", **overrides)
    tokenizer = load_checkpoint_tokenizer(folder) if is_checkpoint(config.init) else load_tokenizer(folder)
    if tokenizer.get_vocab_size() > model.config.vocab_size:
        raise CommandError(f"--init {config.init}: its tokenizer has {tokenizer.get_vocab_size()} tokens, more than "
                           f"the model's {model.config.vocab_size}")
    return model, tokenizer


def encode(tokenizer, examples, config, eos_token_id, flag):
    """text_to_text.encode_pairs, warning on stderr how many texts of `flag` were truncated."""
    from lmkern.models.text_to_text import encode_pairs

    pairs = encode_pairs(tokenizer, examples, config.max_length, config.max_target_length, eos_token_id)
    if pairs.truncated:
        print(f"warning: {pairs.truncated:,} texts of {flag} are longer than --max-length {config.max_length} "
              f"(inputs) or --max-target-length {config.max_target_length} (targets) and were truncated",
              file=sys.stderr)
    return pairs


def finetune(args):
    from lmkern.models.text_to_text import TextToTextTask

    config = T5FinetuneConfig(**given_options(args, T5FinetuneConfig))
    check_kernels(config.kernels, args.device)
    columns = dict(text_column=config.text_column, label_column=config.label_column)
    train, val, _ = read_splits(config, columns)
    model, tokenizer = load_init(config)
    eos = model.config.eos_token_id
    flag = f"--train {config.train}"
    encoded_train = encode(tokenizer, train, config, eos, flag)
    encoded_val = encode(tokenizer, val, config, eos, f"--validation {config.validation}" if config.validation
                         else f"{flag} (held out)")
    task = TextToTextTask(encoded_train, encoded_val, config.batch_size, model.config.pad_token_id,
                          config.max_target_length, seed=config.seed, patience=config.patience or None)
    steps = config.epochs * task.steps_per_epoch
    train_config = config.train_config(steps, config.eval_every or task.steps_per_epoch)
    facts = dict(examples={"train": len(train), "validation": len(val)}, max_length=config.max_length,
                 max_target_length=config.max_target_length, **columns)
    result = run_in_out(args, config, model, tokenizer, task, train_config, "t5", "text to text", {}, facts)
    print(f"best validation at step {result['step']}: exact match {result['exact_match']:.2%}, loss "
          f"{result['loss']:.4g}; checkpoint in {args.out} (`lmkern generate --checkpoint {args.out}` uses it)")


def add_parser(models):
    """The `t5` parser under `finetune`'s subcommands `models` (lmkern/app/finetune.py makes them)."""
    tune = models.add_parser(
        "t5", help="fine-tune a T5 on input and target texts of a CSV/TSV/JSONL file",
        description="Fine-tunes a T5 (an lmkern checkpoint or a Hugging Face directory) to produce each example's "
        "target text from its input text, through the training loop of `lmkern train`: AdamW, warm-up then linear "
        "decay, batches padded to their longest input and target, evaluation after each epoch (or --eval-every): "
        "the validation loss and the exact match of greedy generation, early stopping on it (--patience). OUT gets "
        "options.json, metrics.jsonl, loss.png, the best evaluation's checkpoint (checkpoints/step-N and the "
        "`checkpoint` link: `lmkern generate` reads it) and eval.json.",
    )
    tune.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    tune.add_argument("--overwrite", action="store_true",
                      help="start anew in an --out holding a fine-tuning run (its checkpoints and metrics are "
                      "replaced) or other files (left as they are)")
    add_device(tune)
    add_quiet(tune)
    add_options(tune, T5FinetuneConfig, "fine-tuning options", model_positional=False,
                hidden=("text_pair_column", "regression"))
    tune.set_defaults(run=finetune, flags=T5_FLAGS, interrupted="the best checkpoint so far is in --out")
