"""`lmkern train gpt|llama|bert|t5`: a pretraining run in its own folder (--out), through the loop of
models/train.py, with the run's options saved for --resume.

The run folder holds options.json (written once the run has started), metrics.jsonl,
loss.png and the checkpoints (models/checkpoint.py: checkpoints/step-N folders and the
`checkpoint` link to the newest). Under `torchrun --nproc_per_node=N -m lmkern train ...`
every process trains (DistributedDataParallel); only rank 0 claims the folder and writes.
"""

import contextlib
import dataclasses
import functools
import os

import torch

from lmkern.app.common import CommandError, add_device, add_quiet, check_kernels, is_rank_zero, output_folder
from lmkern.app.models import CAUSAL, MODELS, check_same_tokenizer, initial_model, model_classes, tokenizer_folder
from lmkern.app.run_config import FLAGS, add_options, holds_run, resumed_config, write_options


def clear_run(out_dir):
    """Removes a run's own files from out_dir (its checkpoints, metrics and plot), for a run
    started anew in its place."""
    from lmkern.models.checkpoint import remove_checkpoints
    from lmkern.models.files import remove_files
    from lmkern.models.train import METRICS, PLOT

    remove_checkpoints(out_dir)
    remove_files(out_dir, [METRICS, PLOT])


def build(config, vocab_size):
    """(model, task) of the run of `config` (a RunConfig): its model freshly initialised
    (seeded by config.seed) for a vocabulary of vocab_size, or with config.init's weights,
    and its pretraining task."""
    from lmkern.models import tasks

    torch.manual_seed(config.seed)  # the initial weights
    if config.init is None:
        _, model_class, _ = model_classes(config.model)
        model = model_class(config.model_config(vocab_size))
    else:
        # T5's config calls its dropout dropout_rate and has no context length (the task's).
        given = (dict(dropout_rate=config.dropout) if config.model == "t5" else
                 dict(dropout=config.dropout, context_length=config.context_length))
        overrides = {name: value for name, value in given.items() if value is not None}
        model, _ = initial_model(config.init, config.model, kernels=config.kernels, **overrides)
    common = dict(batch_size=config.batch_size, seed=config.seed, eval_tokens=config.eval_tokens,
                  eval_batch_size=config.micro_batch_size)
    if config.model in CAUSAL:
        return model, tasks.CausalLMTask(config.data, model.config.context_length, **common)
    if config.model == "t5":
        task = tasks.SpanCorruptionTask(config.data, config.context_length or 128, **common)
        check_special_ids(model.config, task.train_spans.specials)
        return model, task
    if not config.nsp:
        # Without NSP the pooler and NSP head get no gradient: frozen, AdamW and DDP skip them.
        model.bert.pooler.requires_grad_(False)
        model.nsp.requires_grad_(False)
    seq_length = config.context_length or min(128, model.config.max_position)
    return model, tasks.MaskedLMTask(config.data, seq_length, nsp=config.nsp, **common)


def check_special_ids(model_config, specials):
    """Raises unless a T5's config has the pad and end-of-sequence ids of its data's tokenizer
    (T5SpecialIds): generation stops at the model's, the data ends targets with the tokenizer's."""
    for name, model_id, token_id in (("pad", model_config.pad_token_id, specials.pad),
                                     ("eos", model_config.eos_token_id, specials.eos)):
        if model_id != token_id:
            raise ValueError(f"the model's {name}_token_id is {model_id}, but the tokenizer's {name} token is "
                             f"{token_id}")


def origin(config):
    """Where the run's model came from, in words."""
    return f"preset {config.preset}" if config.init is None else f"from {config.init}"


def checkpoint_writer(config, out_dir, model):
    """The training loop's save callback for the run of `config` in out_dir: checkpoints of
    the model with its config and the tokenizer of the run's data."""
    from lmkern.models.checkpoint import save_checkpoint

    return functools.partial(save_checkpoint, out_dir, kind=config.model, config=dataclasses.asdict(model.config),
                             tokenizer_dir=config.data, keep=config.keep_checkpoints)


def train(args):
    from lmkern.models.checkpoint import newest_checkpoint
    from lmkern.models.train import BOOKKEEPING, METRICS, PLOT, finish_distributed

    config = resumed_config(args)  # checked before anything is written
    writes = is_rank_zero()
    claim = output_folder(args.out, f"lmkern {args.command}", inputs=[("--data", config.data)],
                          overwrite=args.overwrite)
    try:
        with claim if writes else contextlib.nullcontext():
            rows = run(args, config, writes)
    finally:
        finish_distributed()  # after an error too: under torchrun the exit could abort otherwise
    if writes:
        last = rows[-1] if rows else {}  # a resumed run that had already finished, its metrics removed
        shown = {name: value for name, value in last.items() if name not in (*BOOKKEEPING, "lr")}
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in shown.items())
        print(f"trained {config.model} ({origin(config)}, kernels {config.kernels}) to step "
              f"{last.get('step', config.steps)}: {metrics}")
        print(f"checkpoint {newest_checkpoint(args.out)}; metrics {os.path.join(args.out, METRICS)}, plot "
              f"{os.path.join(args.out, PLOT)}")


def run(args, config, writes):
    """Trains the run of `config` in --out (claimed, on the writing rank); returns its metric rows."""
    from lmkern.models.checkpoint import checkpoint_bytes, load_state, load_weights, newest_checkpoint
    from lmkern.models.data import TokenData
    from lmkern.models.files import check_free_space
    from lmkern.models.train import TrainingDiverged
    from lmkern.models.train import train as train_loop

    if writes and not args.resume and not args.overwrite and holds_run(args.out):
        raise CommandError(f"--out {args.out} already holds a run: --resume it, start it anew with --overwrite "
                           "(which replaces its checkpoints and metrics), or choose another --out")
    check_kernels(config.kernels, args.device)
    data = TokenData(config.data, "train")
    model, task = build(config, data.meta["vocab_size"])
    resumed = newest_checkpoint(args.out) if args.resume else None
    if config.init is not None and resumed is None:
        check_same_tokenizer(data, tokenizer_folder(config.init), model.config.vocab_size)
    state = None
    if resumed is not None:  # (a run killed before its first checkpoint starts again from step 0)
        check_same_tokenizer(data, resumed, model.config.vocab_size)
        load_weights(resumed, model)
        state = load_state(resumed)
    if writes:
        if not args.resume:
            clear_run(args.out)  # the run --overwrite replaces
        check_free_space(args.out, checkpoint_bytes(model, config.data), "a checkpoint")
        write_options(args.out, config)
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        start = (f"resuming {config.model} at step {state['step']}" if state else
                 f"resuming {config.model} from the start (it had no complete checkpoint)" if args.resume else
                 f"training {config.model}")
        print(f"{start} ({origin(config)}, {parameters:.2f}M parameters) on {len(data):,} tokens of "
              f"{config.data} for {config.steps} steps of {config.batch_size} sequences; kernels {config.kernels}, "
              f"precision {config.precision}, device {args.device}; run in {args.out}", flush=True)
    try:
        return train_loop(model, task, config.train_config(), args.out, save=checkpoint_writer(config, args.out, model),
                          device=args.device, state=state, progress=not args.quiet)
    except TrainingDiverged as error:
        last = newest_checkpoint(args.out)
        raise CommandError(f"{error}{f' ({last})' if last else ''}: resume with a lower --lr, or pass "
                           "--skip-bad-steps N to skip up to N bad steps") from None


def add_run_parser(commands, name, models, run_command, hidden=(), command=None, **descriptions):
    """The parser of a training command `name` (train; finetune's gpt, llama): --out,
    --resume or --overwrite, --device, --quiet and RunConfig's options (those of the
    `hidden` fields not in its help), the model one of `models` (None: named by the
    subcommand `name` itself); command: how a user calls it (default `name`);
    descriptions: its help and description."""
    parser = commands.add_parser(name, **descriptions)
    parser.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    start = parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start anew in an --out holding a run (its checkpoints and metrics are replaced) or "
                       "other files (left as they are)")
    add_device(parser)
    add_quiet(parser)
    add_options(parser, models=models, hidden=hidden, model_positional=models is not None)
    parser.set_defaults(run=run_command, flags=FLAGS,
                        interrupted=f"`lmkern {command or name} ... --resume` continues from the last checkpoint")
    return parser


def add_parser(commands):
    add_run_parser(
        commands, "train", MODELS, train,
        help="pretrain a GPT or Llama (causal LM), BERT (MLM + NSP) or T5 (span corruption) on data from `lmkern "
        "prepare`",
        description="Pretrains a GPT or Llama (causal language modelling), a BERT (masked language modelling and "
        "next-sentence prediction) or a T5 (span corruption; data prepared with a `--kind t5` tokenizer) through "
        "models/train.py. OUT gets checkpoints/step-N folders (weights, config, "
        "tokenizer, training state, manifest) with a `checkpoint` link to the newest, metrics.jsonl, loss.png and "
        "options.json. With --resume the run continues exactly where its newest complete checkpoint left off, with "
        "its saved options unless given again. Under torchrun it trains on every process (DDP).",
    )
