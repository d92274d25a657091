"""A training run's options in one dataclass, RunConfig: each field is an option of `lmkern
train` (add_options makes the parser's arguments from the fields), the run's options.json
is the dataclass as JSON, and --resume reads it back with the options given again over it
(resumed_config). A RunConfig builds the run's TrainConfig and model config."""

import argparse
import dataclasses
import json
import os

from lmkern import backend
from lmkern.app.common import CommandError
from lmkern.app.models import MODELS, model_classes
from lmkern.models.checkpoint import newest_checkpoint
from lmkern.models.errors import ArgumentValueError, check_at_least
from lmkern.models.files import write_json
from lmkern.models.train import PRECISIONS, TrainConfig

OPTIONS_FILE = "options.json"  # a training run's options, for --resume


def option(default=dataclasses.MISSING, help="", *, flags=None, **settings):
    """A RunConfig field, with the command-line option that gives it: `flags` (by default
    --the-field-name) and argparse's other `settings` (metavar, choices). `help` may say
    {default}."""
    return dataclasses.field(default=default, metadata=dict(flags=flags, help=help, settings=settings))


@dataclasses.dataclass
class RunConfig:
    """A training run's options, checked on construction (the errors name the fields; FLAGS
    gives them as flags). Those of the training loop take TrainConfig's defaults."""

    model: str = option(help="the model to train", flags=("model",), choices=MODELS)
    data: str = option(None, "a folder from `lmkern prepare`", metavar="DIR")  # required; kept absolute
    preset: str = option(None, "model size: GPT tiny, gpt2, gpt2-medium, ...; Llama tiny, llama-3.2-1b, ...; BERT "
                         "tiny, bert-base, bert-large; T5 tiny, t5-small, flan-t5-small")
    # Fine-tuning: the weights and config to start from instead of a preset's fresh ones.
    init: str = option(None, "start from the weights of an lmkern checkpoint or run folder, or a Hugging Face model "
                       "directory (config.json, model.safetensors), instead of a fresh --preset model", metavar="DIR")
    kernels: str = option("auto", "the lmkern backend of every op (default {default})",  # the fastest here
                          choices=backend.CHOICES)
    # The model's sizes: None keeps the preset's.
    layers: int = option(None, "overrides the preset's number of layers", metavar="N")
    heads: int = option(None, "overrides the preset's attention heads per layer", metavar="N")
    width: int = option(None, "overrides the preset's hidden size (BERT's feed-forward: 4 x width; Llama's: 8/3 x "
                       "width)", metavar="N")
    context_length: int = option(None, "tokens per training sequence (default: GPT and Llama the preset's context, "
                                 "BERT 128; T5: of the span-corrupted input, 128)",
                                 flags=("--context-length", "--seq-length"), metavar="N")
    dropout: float = option(None, "dropout probability (default: the preset's)", metavar="P")
    nsp: bool = option(True, "BERT: masked language modelling alone, on single spans (RoBERTa's full sentences)",
                       flags=("--no-nsp",))  # BERT's pretraining has next-sentence prediction
    # The training loop's: models/train.py's TrainConfig gives the defaults' reasons.
    steps: int = option(TrainConfig.steps, "optimizer steps (default {default})", metavar="N")
    batch_size: int = option(TrainConfig.batch_size, "sequences per step, over all processes (default {default})",
                             metavar="N")
    micro_batch_size: int = option(TrainConfig.micro_batch_size, "sequences per forward pass (default {default})",
                                   metavar="N")
    learning_rate: float = option(TrainConfig.learning_rate, "peak learning rate (default {default})", flags=("--lr",),
                                  metavar="LR")
    # None: a tenth of learning_rate, as GPT-2-sized runs usually decay.
    min_learning_rate: float = option(None, "learning rate at the last step, after cosine decay (default a tenth of "
                                      "--lr)", flags=("--min-lr",), metavar="LR")
    warmup_steps: int = option(TrainConfig.warmup_steps, "linear warm-up steps (default {default})",
                               flags=("--warmup",), metavar="N")
    weight_decay: float = option(TrainConfig.weight_decay, "AdamW's (default {default})", metavar="X")
    grad_clip: float = option(TrainConfig.grad_clip, "gradient norm clip (default {default})", metavar="X")
    eval_every: int = option(TrainConfig.eval_every, "evaluate every N steps (default {default}; also before the "
                             "first)", metavar="N")
    # Enough tokens for a steady estimate, few enough to evaluate often on a CPU.
    eval_tokens: int = option(32768, "validation tokens per evaluation (default {default})", metavar="N")
    checkpoint_every: int = option(TrainConfig.checkpoint_every, "checkpoint every N steps (default {default})",
                                   metavar="N")
    # Two to fall back on should the newest be damaged.
    keep_checkpoints: int = option(3, "keep the newest K checkpoints (default {default})", metavar="K")
    divergence_factor: float = option(TrainConfig.divergence_factor, "a step whose loss is more than X times the first "
                                      "step's has diverged, as has one with a non-finite loss or gradient (default "
                                      "{default})", metavar="X")
    skip_bad_steps: int = option(TrainConfig.skip_bad_steps, "skip the update of up to N diverged steps (over the "
                                 "run) before stopping (default {default}: stop at the first, naming the last good "
                                 "checkpoint)", metavar="N")
    log_every: int = option(TrainConfig.log_every, "a progress line every N steps when stdout is not a terminal "
                            "(default {default})", metavar="N")
    precision: str = option(TrainConfig.precision, "fp32, or bf16 / fp16 under torch.autocast over fp32 weights (fp16 "
                            "with loss scaling); default auto: bf16 on a GPU, fp32 on CPU", choices=PRECISIONS)
    seed: int = option(TrainConfig.seed, "seeds the weights, batches, masks and dropout (default {default})",
                       metavar="N")

    def __post_init__(self):
        for name in ("data",) if self.init is not None else ("data", "preset"):
            if getattr(self, name) is None:
                raise ArgumentValueError("{name} is required (a resumed run remembers it)", name=name)
        self.data = os.path.abspath(self.data)  # so that --resume works from any folder
        if self.init is not None:
            self.init = os.path.abspath(self.init)
            # A Llama's rotary positions and T5's relative ones can train on sequences of any
            # length; GPT's learned positions and BERT's fix theirs.
            sizes = ("preset", "layers", "heads", "width") + (() if self.model in ("llama", "t5") else
                                                             ("context_length",))
            given = [name for name in sizes if getattr(self, name) is not None]
            if given:
                fields = ", ".join("{" + name + "}" for name in given)  # each named as its flag
                raise ArgumentValueError("{init} gives the model and its sizes: " + fields + " cannot be given with it")
        for name, minimum in (("layers", 1), ("heads", 1), ("width", 1), ("context_length", 2)):
            if getattr(self, name) is not None:
                check_at_least(name, getattr(self, name), minimum)
        check_at_least("eval_tokens", self.eval_tokens, 2)
        check_at_least("keep_checkpoints", self.keep_checkpoints, 1)
        if self.dropout is not None and not 0 <= self.dropout < 1:
            raise ArgumentValueError("{dropout} must be in [0, 1), got {}", self.dropout)
        if self.min_learning_rate is None:
            self.min_learning_rate = self.learning_rate / 10
        self.train_config()  # which checks the training loop's options

    def train_config(self):
        """The training loop's settings: this run's options of TrainConfig's field names
        (TrainConfig checks them)."""
        names = {field.name for field in dataclasses.fields(TrainConfig)}
        return TrainConfig(**{name: value for name, value in dataclasses.asdict(self).items() if name in names})

    def model_config(self, vocab_size):
        """The config of the run's model: its preset's, with the sizes, dropout and kernels
        of the run, for a vocabulary of vocab_size. (With init, initial_model gives it.)"""
        module, _, _ = model_classes(self.model)
        if self.model == "gpt":
            sizes = dict(n_embd=self.width, context_length=self.context_length)
        elif self.model == "llama":
            width = self.width
            sizes = dict(hidden_size=width, intermediate_size=None if width is None else module.gated_ffn_width(width),
                         context_length=self.context_length)
        elif self.model == "t5":
            return self.t5_config(module, vocab_size)
        else:
            sizes = dict(hidden_size=self.width, intermediate_size=None if self.width is None else 4 * self.width)
        sizes.update(n_layer=self.layers, n_head=self.heads, dropout=self.dropout)
        config = self.preset_config(module, vocab_size, **sizes)
        if self.model == "bert" and self.context_length is not None:
            # BERT trains on shorter sequences than it can take; it must take these.
            config = dataclasses.replace(config, max_position=max(config.max_position, self.context_length))
        return config

    def t5_config(self, module, vocab_size):
        """model_config's work for T5 (models/t5.py), whose fields have T5's names; the
        context length is the task's (relative positions take any length)."""
        config = self.preset_config(module, vocab_size, num_layers=self.layers, num_heads=self.heads,
                                    d_model=self.width, dropout_rate=self.dropout)
        if self.width is not None or self.heads is not None:
            # Heads split the width, and the feed-forward keeps the preset's multiple of it
            # (4 x for T5's ReLU one, 2 x for v1.1's gated one).
            config = dataclasses.replace(config, d_kv=max(1, config.d_model // config.num_heads),
                                         d_ff=config.d_model * (4 if config.feed_forward == "relu" else 2))
        return config

    def preset_config(self, module, vocab_size, **sizes):
        """The preset's config of `module` for a vocabulary of vocab_size, with the run's
        kernels and the sizes given (None: the preset's)."""
        overrides = {name: value for name, value in sizes.items() if value is not None}
        try:
            return module.preset(self.preset, vocab_size=vocab_size, kernels=self.kernels, **overrides)
        except ValueError as error:
            raise ArgumentValueError("{preset} {}: {}", self.preset, error) from None


def flags(field):
    """The command-line flags of a RunConfig field (or, for `model`, its positional argument's name)."""
    return field.metadata["flags"] or ("--" + field.name.replace("_", "-"),)


# What a training run's errors call each argument: RunConfig's fields by their flags, and
# the library's data_dir (models/data.py, models/tasks.py) by --data.
FLAGS = {**{field.name: flags(field)[0] for field in dataclasses.fields(RunConfig)}, "data_dir": "--data"}


def add_options(parser, config_class=RunConfig, title="run options (with --resume: the run's own unless given)", *,
                models=None, hidden=(), model_positional=True):
    """Adds the options of config_class (RunConfig, or another dataclass of option() fields)
    to `parser`: `model` as its positional argument (one of `models`, default the field's
    choices; none where model_positional is False: a subcommand names the model), the
    others in a group, those of the `hidden` fields left out of the help (but parsed, so
    that the config can say why they do not apply). An option that is not given is absent
    from the parsed arguments, so that given values can be told from defaults
    (resumed_config)."""
    group = parser.add_argument_group(title)
    for field in dataclasses.fields(config_class):
        settings = dict(field.metadata["settings"], help=field.metadata["help"].format(default=field.default))
        if field.name == "model":
            if not model_positional:
                continue
            if models is not None:
                settings["choices"] = models
        if field.name in hidden:
            settings["help"] = argparse.SUPPRESS
        if field.type is bool:
            settings.update(action="store_const", const=not field.default)
        elif "choices" not in settings:
            settings.update(type=field.type)
        if not flags(field)[0].startswith("-"):  # model
            parser.add_argument(*flags(field), **settings)
        else:
            group.add_argument(*flags(field), dest=field.name, default=argparse.SUPPRESS, **settings)


def holds_run(out_dir):
    """Whether out_dir holds a run: its options (written when it started) or a checkpoint."""
    return os.path.isfile(os.path.join(out_dir, OPTIONS_FILE)) or newest_checkpoint(out_dir) is not None


def given_options(args, config_class=RunConfig):
    """{field: value} of the options of config_class given on the command line (add_options)."""
    return {field.name: getattr(args, field.name) for field in dataclasses.fields(config_class)
            if hasattr(args, field.name)}


def resumed_config(args):
    """The RunConfig of the parsed arguments of `lmkern train`: the options given, over (with
    --resume) the run's saved ones in --out, over the defaults."""
    names = [field.name for field in dataclasses.fields(RunConfig)]
    given = given_options(args)
    saved = {}
    if args.resume:
        if not holds_run(args.out):
            raise CommandError(f"--resume: --out {args.out} holds no run to resume (no {OPTIONS_FILE} or checkpoint)")
        if os.path.isfile(os.path.join(args.out, OPTIONS_FILE)):
            saved = read_options(os.path.join(args.out, OPTIONS_FILE))
        if saved.get("model", args.model) != args.model:
            raise CommandError(f"--resume: {args.out} holds a {saved['model']} run, not {args.model}")
    return RunConfig(**{**{name: value for name, value in saved.items() if name in names}, **given})


def read_options(path):
    """The options saved at path (a JSON object)."""
    with open(path) as file:
        try:
            saved = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupted: {error}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is corrupted: not a JSON object")
    return saved


def write_options(out_dir, config):
    """Saves the run's options (a RunConfig, or another options dataclass) as
    out_dir/options.json, atomically."""
    write_json(os.path.join(out_dir, OPTIONS_FILE), dataclasses.asdict(config))
