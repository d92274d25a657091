"""`lmkern train gpt|bert`: a pretraining run in its own folder (--out), through the loop of
models/train.py, with the run's options saved for --resume.

The run folder holds options.json (written once the run has started), metrics.jsonl,
loss.png and the checkpoints (models/checkpoint.py: checkpoints/step-N folders and the
`checkpoint` link to the newest). Under `torchrun --nproc_per_node=N -m lmkern train ...`
every process trains (DistributedDataParallel); only rank 0 claims the folder and writes.
"""

import contextlib
import dataclasses
import functools
import json
import os

import torch

from lmkern import backend
from lmkern.app.common import CommandError, add_quiet, check_kernels, default_device, is_rank_zero, output_folder
from lmkern.app.models import MODELS, build_model, check_same_tokenizer

OPTIONS_FILE = "options.json"  # a training run's options, for --resume


def run_defaults():
    """The defaults of a training run's options (TrainConfig's, and the task's)."""
    from lmkern.models.train import TrainConfig

    return {
        "data": None, "preset": None, "kernels": "auto", "layers": None, "heads": None, "width": None,
        "context_length": None, "dropout": None, "nsp": True,
        **{field.name: field.default for field in dataclasses.fields(TrainConfig) if field.name != "betas"},
        "min_learning_rate": None,  # a tenth of the learning rate
        "eval_tokens": 32768,
        "keep_checkpoints": 3,
    }


def holds_run(out_dir):
    """Whether out_dir holds a run: its options (written when it started) or a checkpoint."""
    from lmkern.models.checkpoint import newest_checkpoint

    return os.path.isfile(os.path.join(out_dir, OPTIONS_FILE)) or newest_checkpoint(out_dir) is not None


def read_options(path):
    with open(path) as file:
        try:
            saved = json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupted: {error}") from None
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is corrupted: not a JSON object")
    return saved


def run_options(args):
    """A training run's options: those given, then (with --resume) the run's saved ones, then
    the defaults. --data is kept as an absolute path, so --resume works from anywhere."""
    defaults = run_defaults()
    given = {name: getattr(args, name) for name in defaults if getattr(args, name, None) is not None}
    if "data" in given:
        given["data"] = os.path.abspath(given["data"])
    saved = {}
    if args.resume:
        if not holds_run(args.out):
            raise CommandError(f"--resume: --out {args.out} holds no run to resume (no {OPTIONS_FILE} or checkpoint)")
        if os.path.isfile(os.path.join(args.out, OPTIONS_FILE)):
            saved = read_options(os.path.join(args.out, OPTIONS_FILE))
        if saved.get("model", args.model) != args.model:
            raise CommandError(f"--resume: {args.out} holds a {saved['model']} run, not {args.model}")
    options = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, **given, "model": args.model}
    for name in ("data", "preset"):
        if options[name] is None:
            raise CommandError(f"--{name} is required (a --resume'd run remembers it)")
    for name, minimum in (("layers", 1), ("heads", 1), ("width", 1), ("context_length", 2), ("eval_tokens", 2),
                          ("keep_checkpoints", 1)):
        if options[name] is not None and options[name] < minimum:
            raise CommandError(f"--{name.replace('_', '-')} must be at least {minimum}, got {options[name]}")
    if options["dropout"] is not None and not 0 <= options["dropout"] < 1:
        raise CommandError(f"--dropout must be in [0, 1), got {options['dropout']}")
    if options["min_learning_rate"] is None:
        options["min_learning_rate"] = options["learning_rate"] / 10  # as GPT-2-sized runs usually decay
    return options


def write_options(out_dir, options):
    from lmkern.models.files import write_json

    write_json(os.path.join(out_dir, OPTIONS_FILE), options)


def clear_run(out_dir):
    """Removes a run's own files from out_dir (its checkpoints, metrics and plot), for a run
    started anew in its place."""
    from lmkern.models.checkpoint import remove_checkpoints
    from lmkern.models.files import remove_files
    from lmkern.models.train import METRICS, PLOT

    remove_checkpoints(out_dir)
    remove_files(out_dir, [METRICS, PLOT])


def make_task(kind, options, model):
    from lmkern.models import tasks

    common = dict(batch_size=options["batch_size"], seed=options["seed"], eval_tokens=options["eval_tokens"],
                  eval_batch_size=options["micro_batch_size"])
    if kind == "gpt":
        return tasks.CausalLMTask(options["data"], model.config.context_length, **common)
    seq_length = options["context_length"] or min(128, model.config.max_position)
    return tasks.MaskedLMTask(options["data"], seq_length, nsp=options["nsp"], **common)


def train(args):
    from lmkern.models.checkpoint import newest_checkpoint
    from lmkern.models.train import BOOKKEEPING, METRICS, PLOT, finish_distributed

    options = run_options(args)
    writes = is_rank_zero()
    claim = output_folder(args.out, "lmkern train", inputs=[("--data", options["data"])], overwrite=args.overwrite)
    try:
        with claim if writes else contextlib.nullcontext():
            rows = run(args, options, writes)
    finally:
        finish_distributed()  # after an error too: under torchrun the exit could abort otherwise
    if writes:
        last = rows[-1] if rows else {}  # a resumed run that had already finished, its metrics removed
        shown = {name: value for name, value in last.items() if name not in (*BOOKKEEPING, "lr")}
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in shown.items())
        print(f"trained {args.model} (preset {options['preset']}, kernels {options['kernels']}) to step "
              f"{last.get('step', options['steps'])}: {metrics}")
        print(f"checkpoint {newest_checkpoint(args.out)}; metrics {os.path.join(args.out, METRICS)}, plot "
              f"{os.path.join(args.out, PLOT)}")


def run(args, options, writes):
    """Trains the run of `options` in --out (claimed, on the writing rank); returns its metric rows."""
    from lmkern.models.checkpoint import (checkpoint_bytes, load_state, load_weights, newest_checkpoint,
                                          save_checkpoint)
    from lmkern.models.data import TokenData
    from lmkern.models.files import check_free_space
    from lmkern.models.train import TrainConfig, TrainingDiverged
    from lmkern.models.train import train as train_loop

    if writes and not args.resume and not args.overwrite and holds_run(args.out):
        raise CommandError(f"--out {args.out} already holds a run: --resume it, start it anew with --overwrite "
                           "(which replaces its checkpoints and metrics), or choose another --out")
    check_kernels(options["kernels"], args.device)
    data = TokenData(options["data"], "train")
    torch.manual_seed(options["seed"])  # the initial weights
    model = build_model(args.model, options, data.meta["vocab_size"])
    if args.model == "bert" and not options["nsp"]:
        # Without NSP the pooler and NSP head get no gradient: frozen, AdamW and DDP skip them.
        model.bert.pooler.requires_grad_(False)
        model.nsp.requires_grad_(False)
    task = make_task(args.model, options, model)
    config = TrainConfig(**{field.name: options[field.name] for field in dataclasses.fields(TrainConfig)
                            if field.name in options})
    resumed = newest_checkpoint(args.out) if args.resume else None
    state = None
    if resumed is not None:  # (a run killed before its first checkpoint starts again from step 0)
        check_same_tokenizer(data, resumed, model.config.vocab_size)
        load_weights(resumed, model)
        state = load_state(resumed)
    if writes:
        if not args.resume:
            clear_run(args.out)  # the run --overwrite replaces
        check_free_space(args.out, checkpoint_bytes(model, options["data"]), "a checkpoint")
        write_options(args.out, options)
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        start = (f"resuming {args.model} at step {state['step']}" if state else
                 f"resuming {args.model} from the start (it had no complete checkpoint)" if args.resume else
                 f"training {args.model}")
        print(f"{start} (preset {options['preset']}, {parameters:.2f}M parameters) on {len(data):,} tokens of "
              f"{options['data']} for {config.steps} steps of {config.batch_size} sequences; kernels "
              f"{options['kernels']}, precision {options['precision']}, device {args.device}; run in {args.out}",
              flush=True)
    save = functools.partial(save_checkpoint, args.out, kind=args.model, config=dataclasses.asdict(model.config),
                             tokenizer_dir=options["data"], keep=options["keep_checkpoints"])
    try:
        return train_loop(model, task, config, args.out, save=save, device=args.device, state=state,
                          progress=not args.quiet)
    except TrainingDiverged as error:
        last = newest_checkpoint(args.out)
        raise CommandError(f"{error}{f' ({last})' if last else ''}: resume with a lower --lr, or pass "
                           "--skip-bad-steps N to skip up to N bad steps") from None


def add_parser(commands):
    from lmkern.models.train import PRECISIONS, TrainConfig

    defaults = TrainConfig()
    train_parser = commands.add_parser(
        "train", help="pretrain a GPT (causal LM) or BERT (MLM + NSP) on data from `lmkern prepare`",
        description="Pretrains a GPT (causal language modelling) or a BERT (masked language modelling and "
        "next-sentence prediction) through models/train.py. OUT gets checkpoints/step-N folders (weights, config, "
        "tokenizer, training state, manifest) with a `checkpoint` link to the newest, metrics.jsonl, loss.png and "
        "options.json. With --resume the run continues exactly where its newest complete checkpoint left off, with "
        "its saved options unless given again. Under torchrun it trains on every process (DDP).",
    )
    train_parser.add_argument("model", choices=MODELS)
    train_parser.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    start = train_parser.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its newest checkpoint")
    start.add_argument("--overwrite", action="store_true",
                       help="start anew in an --out holding a run (its checkpoints and metrics are replaced) or "
                       "other files (left as they are)")
    train_parser.add_argument("--device", default=default_device(), help="cpu, cuda, ... (default: %(default)s)")
    add_quiet(train_parser)
    run = train_parser.add_argument_group("run options (with --resume: the run's own unless given)")
    run.add_argument("--data", metavar="DIR", help="a folder from `lmkern prepare`")
    run.add_argument("--preset", help="model size: GPT tiny, gpt2, gpt2-medium, ...; BERT tiny, bert-base, bert-large")
    run.add_argument("--kernels", choices=backend.CHOICES, help="the lmkern backend of every op (default auto)")
    run.add_argument("--layers", type=int, metavar="N", help="overrides the preset's number of layers")
    run.add_argument("--heads", type=int, metavar="N", help="overrides the preset's attention heads per layer")
    run.add_argument("--width", type=int, metavar="N",
                     help="overrides the preset's hidden size (BERT's feed-forward: 4 x width)")
    run.add_argument("--context-length", "--seq-length", type=int, dest="context_length", metavar="N",
                     help="tokens per training sequence (default: GPT the preset's context, BERT 128)")
    run.add_argument("--dropout", type=float, metavar="P", help="dropout probability (default: the preset's)")
    run.add_argument("--no-nsp", dest="nsp", action="store_const", const=False,
                     help="BERT: masked language modelling alone, on single spans (RoBERTa's full sentences)")
    run.add_argument("--steps", type=int, metavar="N", help=f"optimizer steps (default {defaults.steps})")
    run.add_argument("--batch-size", type=int, metavar="N",
                     help=f"sequences per step, over all processes (default {defaults.batch_size})")
    run.add_argument("--micro-batch-size", type=int, metavar="N",
                     help=f"sequences per forward pass (default {defaults.micro_batch_size})")
    run.add_argument("--lr", type=float, metavar="LR", dest="learning_rate",
                     help=f"peak learning rate (default {defaults.learning_rate})")
    run.add_argument("--min-lr", type=float, metavar="LR", dest="min_learning_rate",
                     help="learning rate at the last step, after cosine decay (default a tenth of --lr)")
    run.add_argument("--warmup", type=int, metavar="N", dest="warmup_steps",
                     help=f"linear warm-up steps (default {defaults.warmup_steps})")
    run.add_argument("--weight-decay", type=float, metavar="X", help=f"AdamW's (default {defaults.weight_decay})")
    run.add_argument("--grad-clip", type=float, metavar="X", help=f"gradient norm clip (default {defaults.grad_clip})")
    run.add_argument("--eval-every", type=int, metavar="N",
                     help=f"evaluate every N steps (default {defaults.eval_every}; also before the first)")
    run.add_argument("--eval-tokens", type=int, metavar="N", help="validation tokens per evaluation (default 32768)")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help=f"checkpoint every N steps (default {defaults.checkpoint_every})")
    run.add_argument("--keep-checkpoints", type=int, metavar="K", help="keep the newest K checkpoints (default 3)")
    run.add_argument("--divergence-factor", type=float, metavar="X",
                     help="a step whose loss is more than X times the first step's has diverged, as has one with a "
                     f"non-finite loss or gradient (default {defaults.divergence_factor})")
    run.add_argument("--skip-bad-steps", type=int, metavar="N",
                     help="skip the update of up to N diverged steps (over the run) before stopping "
                     f"(default {defaults.skip_bad_steps}: stop at the first, naming the last good checkpoint)")
    run.add_argument("--log-every", type=int, metavar="N",
                     help=f"a progress line every N steps when stdout is not a terminal (default {defaults.log_every})")
    run.add_argument("--precision", choices=PRECISIONS,
                     help="fp32, or bf16 / fp16 under torch.autocast over fp32 weights (fp16 with loss scaling); "
                     "default auto: bf16 on a GPU, fp32 on CPU")
    run.add_argument("--seed", type=int, metavar="N", help="seeds the weights, batches, masks and dropout (default 0)")
    train_parser.set_defaults(run=train)
