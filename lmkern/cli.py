"""The lmkern command line: `lmkern COMMAND` or `python -m lmkern COMMAND`.

    lmkern tokenizer train --data PATH... --kind bpe|wordpiece --vocab-size N --out DIR
    lmkern prepare --data PATH... --tokenizer DIR --out DIR [--val-fraction F]
    lmkern train gpt|bert --data DIR --preset NAME --out DIR [--kernels K] [--resume] [options]
    lmkern eval --checkpoint DIR --data DIR
    lmkern generate --checkpoint DIR --prompt TEXT [--greedy | --temperature T --top-k K --top-p P]
    lmkern demo [--data PATH...] [--quick] [--out DIR] [--kernels K]
    lmkern bench [the benchmark runner's arguments]
    lmkern info

Under `torchrun --nproc_per_node=N -m lmkern train ...` training runs on N processes
(DistributedDataParallel); only rank 0 writes and prints.
"""

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

from lmkern import backend
from lmkern.backend import BackendUnavailableError

MODELS = ("gpt", "bert")
MODEL_OPS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")  # what GPT and BERT call
OPTIONS_FILE = "options.json"  # a training run's options, beside its checkpoint, for --resume


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_rank_zero():
    return int(os.environ.get("RANK", "0")) == 0


def check_kernels(kernels, device):
    """Raises, saying why, if an explicit --kernels backend cannot run the models' ops on device."""
    if kernels == "auto":
        return
    device_type = torch.device(device).type
    for op in MODEL_OPS:
        reason = backend.unavailable_reason(kernels, op, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"--kernels {kernels} cannot run {op} on {device_type}: {reason}")


# -- tokenizer, prepare, info, bench -------------------------------------------------------------


def tokenizer_train(args):
    from lmkern.models.data import documents, text_files
    from lmkern.models.tokenizer import save_tokenizer, train_tokenizer

    files = text_files(args.data)
    counted = []

    def counting(texts):
        for text in texts:
            counted.append(len(text))
            yield text

    tokenizer = train_tokenizer(counting(documents(files)), args.kind, args.vocab_size)
    if not counted:
        raise ValueError(f"--data {' '.join(args.data)}: no text to train a tokenizer on")
    save_tokenizer(tokenizer, args.out)
    print(
        f"trained a {args.kind} tokenizer of {tokenizer.get_vocab_size()} tokens on {len(counted)} documents "
        f"({sum(counted) / 1e6:.1f} MB) from {len(files)} files: {args.out}/tokenizer.json"
    )


def prepare(args):
    from lmkern.models.data import prepare as prepare_data

    meta = prepare_data(args.data, args.tokenizer, args.out, args.val_fraction, args.seed, progress=not args.quiet)
    splits = ", ".join(f"{name} {s['tokens']:,} tokens in {s['documents']:,} documents" for name, s in meta["splits"].items())
    print(f"prepared {args.out}: {splits} ({meta['dtype']})")


def info(args):
    from lmkern.info import report

    print(report())


def bench(args):
    try:
        from lmkern.benchmarks.run import main as run_benchmarks
    except ModuleNotFoundError as error:
        if error.name not in ("lmkern.benchmarks", "lmkern.benchmarks.run"):
            raise
        try:  # a source checkout: benchmarks/ at the repository root, the working directory
            from benchmarks.run import main as run_benchmarks
        except ModuleNotFoundError as error:
            if error.name not in ("benchmarks", "benchmarks.run"):
                raise
            raise FileNotFoundError(
                "the benchmark suite is not installed: run `python -m lmkern bench` from the repository root"
            ) from None
    return run_benchmarks(args.bench_args)


# -- models and checkpoints ---------------------------------------------------------------------


def model_classes(kind):
    """(module, pretraining model class) of "gpt" or "bert"."""
    if kind == "gpt":
        from lmkern.models import gpt

        return gpt, gpt.GPT
    from lmkern.models import bert

    return bert, bert.BertForPreTraining


def build_model(kind, options, vocab_size):
    """A freshly initialised model from a run's options (preset, its overrides, kernels)
    for a vocabulary of vocab_size."""
    module, model_class = model_classes(kind)
    overrides = {"vocab_size": vocab_size, "kernels": options["kernels"]}
    for option, field in (("dropout", "dropout"), ("layers", "n_layer"), ("heads", "n_head")):
        if options[option] is not None:
            overrides[field] = options[option]
    if options["width"] is not None and kind == "gpt":
        overrides["n_embd"] = options["width"]
    elif options["width"] is not None:
        overrides.update(hidden_size=options["width"], intermediate_size=4 * options["width"])  # BERT's ratio
    if options["context_length"] is not None:
        if kind == "gpt":
            overrides["context_length"] = options["context_length"]
        else:  # BERT trains on shorter sequences than it can take; it must take these
            preset_positions = module.PRESETS.get(options["preset"], {}).get("max_position", 512)
            overrides["max_position"] = max(preset_positions, options["context_length"])
    try:
        config = module.preset(options["preset"], **overrides)
    except ValueError as error:
        raise ValueError(f"--preset {options['preset']}: {error}") from None
    return model_class(config)


def checkpoint_folder(path):
    """The checkpoint folder named by --checkpoint: the folder itself, or a run's DIR/checkpoint."""
    from lmkern.models.checkpoint import CONFIG
    from lmkern.models.train import CHECKPOINT

    nested = os.path.join(path, CHECKPOINT)
    if not os.path.isfile(os.path.join(path, CONFIG)) and os.path.isfile(os.path.join(nested, CONFIG)):
        return nested
    if not os.path.isdir(path):
        raise FileNotFoundError(f"--checkpoint {path}: no such folder")
    return path


def load_model(path, kernels, device):
    """(kind, model in eval mode on device, checkpoint folder) of the checkpoint at path."""
    from lmkern.models.checkpoint import CONFIG, load_config, load_weights

    folder = checkpoint_folder(path)
    kind, saved = load_config(folder)
    if kind not in MODELS:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: model {kind!r} is neither of {', '.join(MODELS)}")
    module, model_class = model_classes(kind)
    config_class = module.GPTConfig if kind == "gpt" else module.BertConfig
    try:
        config = config_class(**{**saved, "kernels": kernels})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG)} is corrupted: {error}") from None
    check_kernels(kernels, device)
    model = model_class(config)
    load_weights(folder, model)
    return kind, model.to(device).eval(), folder


def check_same_tokenizer(data, checkpoint, vocab_size):
    """Raises unless `data` (TokenData) was prepared with the checkpoint's tokenizer."""
    from lmkern.models.tokenizer import FILE_NAME

    if data.meta["vocab_size"] != vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer {os.path.join(checkpoint, FILE_NAME)} has {vocab_size} tokens, but --data "
            f"{data.directory} was prepared with one of {data.meta['vocab_size']} "
            f"({os.path.join(data.directory, FILE_NAME)})"
        )
    data.check_tokenizer(checkpoint)


# -- train ----------------------------------------------------------------------------------------


def run_defaults():
    """The defaults of a training run's options (TrainConfig's, and the task's)."""
    from lmkern.models.train import TrainConfig

    return {
        "data": None, "preset": None, "kernels": "auto", "layers": None, "heads": None, "width": None,
        "context_length": None, "dropout": None, "nsp": True,
        **{field.name: field.default for field in dataclasses.fields(TrainConfig) if field.name != "betas"},
        "min_learning_rate": None,  # a tenth of the learning rate
        "eval_tokens": 32768,
    }


def run_options(args):
    """A training run's options: those given, then (with --resume) the run's saved ones, then the defaults."""
    from lmkern.models.checkpoint import WEIGHTS
    from lmkern.models.train import CHECKPOINT

    defaults = run_defaults()
    given = {name: getattr(args, name) for name in defaults if getattr(args, name, None) is not None}
    has_checkpoint = os.path.isfile(os.path.join(args.out, CHECKPOINT, WEIGHTS))
    saved_path = os.path.join(args.out, OPTIONS_FILE)
    saved = {}
    if args.resume:
        if not has_checkpoint or not os.path.isfile(saved_path):
            raise FileNotFoundError(f"--resume: --out {args.out} holds no run to resume (no {CHECKPOINT}/{WEIGHTS} "
                                    f"or {OPTIONS_FILE})")
        with open(saved_path) as file:
            try:
                saved = json.load(file)
            except json.JSONDecodeError as error:
                raise ValueError(f"{saved_path} is corrupted: {error}") from None
        if saved.get("model") != args.model:
            raise ValueError(f"--resume: {args.out} holds a {saved.get('model')} run, not {args.model}")
    elif has_checkpoint:
        raise ValueError(f"--out {args.out} already holds a run: --resume it, or choose another --out")
    options = {**defaults, **{k: v for k, v in saved.items() if k in defaults}, **given, "model": args.model}
    for name in ("data", "preset"):
        if options[name] is None:
            raise ValueError(f"--{name} is required (a --resume'd run remembers it)")
    for name, minimum in (("layers", 1), ("heads", 1), ("width", 1), ("context_length", 2), ("eval_tokens", 2)):
        if options[name] is not None and options[name] < minimum:
            raise ValueError(f"--{name.replace('_', '-')} must be at least {minimum}, got {options[name]}")
    if options["dropout"] is not None and not 0 <= options["dropout"] < 1:
        raise ValueError(f"--dropout must be in [0, 1), got {options['dropout']}")
    if options["min_learning_rate"] is None:
        options["min_learning_rate"] = options["learning_rate"] / 10  # as GPT-2-sized runs usually decay
    return options


def write_options(out_dir, options):
    os.makedirs(out_dir, exist_ok=True)
    path = os.path.join(out_dir, OPTIONS_FILE)
    with open(path + ".partial", "w") as file:
        json.dump(options, file, indent=1)
    os.replace(path + ".partial", path)


def make_task(kind, options, model):
    from lmkern.models import tasks

    common = dict(batch_size=options["batch_size"], seed=options["seed"], eval_tokens=options["eval_tokens"],
                  eval_batch_size=options["micro_batch_size"])
    if kind == "gpt":
        return tasks.CausalLMTask(options["data"], model.config.context_length, **common)
    seq_length = options["context_length"] or min(128, model.config.max_position)
    return tasks.MaskedLMTask(options["data"], seq_length, nsp=options["nsp"], **common)


def train(args):
    from lmkern.models.data import TokenData
    from lmkern.models.train import CHECKPOINT, TrainConfig
    from lmkern.models.train import train as train_loop

    options = run_options(args)
    check_kernels(options["kernels"], args.device)
    data = TokenData(options["data"], "train")
    torch.manual_seed(options["seed"])  # the initial weights
    model = build_model(args.model, options, data.meta["vocab_size"])
    if args.model == "bert" and not options["nsp"]:
        # Without NSP the pooler and NSP head get no gradient: frozen, AdamW and DDP skip them.
        model.bert.pooler.requires_grad_(False)
        model.nsp.requires_grad_(False)
    task = make_task(args.model, options, model)
    checkpoint = os.path.join(args.out, CHECKPOINT)
    if args.resume:
        check_same_tokenizer(data, checkpoint, model.config.vocab_size)
    config = TrainConfig(**{field.name: options[field.name] for field in dataclasses.fields(TrainConfig)
                            if field.name in options})
    if is_rank_zero():
        write_options(args.out, options)
        parameters = sum(p.numel() for p in model.parameters()) / 1e6
        print(f"{'resuming' if args.resume else 'training'} {args.model} (preset {options['preset']}, "
              f"{parameters:.2f}M parameters) on {len(data):,} tokens of {options['data']} for {config.steps} steps "
              f"of {config.batch_size} sequences; kernels {options['kernels']}, device {args.device}; "
              f"run in {args.out}")
    rows = train_loop(model, task, config, args.out, kind=args.model, model_config=dataclasses.asdict(model.config),
                      tokenizer_dir=options["data"], device=args.device, resume=args.resume,
                      progress=not args.quiet)
    if torch.distributed.is_initialized():  # under torchrun
        torch.distributed.destroy_process_group()
    if is_rank_zero():
        last = rows[-1] if rows else {}
        shown = {name: value for name, value in last.items() if name not in ("step", "lr", "tokens_per_s")}
        metrics = ", ".join(f"{name} {value:.4g}" for name, value in shown.items())
        print(f"trained {args.model} (preset {options['preset']}, kernels {options['kernels']}) to step "
              f"{last.get('step', 0)}: {metrics}")
        print(f"checkpoint {checkpoint}; metrics {os.path.join(args.out, 'metrics.jsonl')}, plot "
              f"{os.path.join(args.out, 'loss.png')}")


# -- eval, generate ------------------------------------------------------------------------------


def evaluate(args):
    from lmkern.models import tasks
    from lmkern.models.bert_data import SpecialIds
    from lmkern.models.data import TokenData
    from lmkern.models.tokenizer import load_tokenizer

    kind, model, folder = load_model(args.checkpoint, args.kernels, args.device)
    data = TokenData(args.data, args.split)
    check_same_tokenizer(data, folder, model.config.vocab_size)
    progress = not args.quiet
    if kind == "gpt":
        context = args.context_length or model.config.context_length
        if context > model.config.context_length:
            raise ValueError(f"--context-length {context}: more than the model's {model.config.context_length}")
        stride = args.stride or max(1, context // 2)
        tokens = data.tokens[: args.max_tokens]
        if len(tokens) < 2:
            raise ValueError(f"--data {args.data}: the {args.split} split has no tokens to evaluate on")
        result = tasks.perplexity(model, tokens, context, stride, args.batch_size, args.device, progress)
        print(f"{args.split} perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token over "
              f"{result['tokens']:,} tokens; windows of {context}, stride {stride})")
    else:
        seq_length = args.context_length or min(128, model.config.max_position)
        specials = SpecialIds.of(load_tokenizer(folder))
        pairs = tasks.pair_builder(data, args.split, specials, seq_length, not args.no_nsp)
        sequences = max(1, (args.max_tokens or 65536) // seq_length)
        result = tasks.masked_lm_metrics(model, pairs, model.config.vocab_size, sequences, args.batch_size,
                                         not args.no_nsp, args.device, progress)
        line = f"{args.split} MLM loss {result['mlm_loss']:.4f}, accuracy {result['mlm_accuracy']:.2%}"
        if not args.no_nsp:
            line += f"; NSP accuracy {result['nsp_accuracy']:.2%} (loss {result['nsp_loss']:.4f})"
        print(f"{line} over {sequences} sequences of up to {seq_length} tokens")
    if args.json:
        print(json.dumps(result))


def sampling_arguments(args):
    """generate()'s sampling keywords from --greedy, --temperature, --top-k, --top-p (checked)."""
    if args.greedy:
        return dict(do_sample=False)
    if args.temperature <= 0:
        raise ValueError(f"--temperature must be > 0 (or pass --greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        raise ValueError(f"--top-k must be at least 1, got {args.top_k}")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must be in (0, 1], got {args.top_p}")
    return dict(do_sample=True, temperature=args.temperature, top_k=args.top_k, top_p=args.top_p, seed=args.seed)


def print_sample(model, tokenizer, prompt, max_new_tokens, sampling, stop_at_end_of_text=True):
    """Prints the prompt, then the model's continuation token by token as it is produced,
    up to the end of the document (or, if not stop_at_end_of_text, across documents with
    <|endoftext|> shown between them); returns how many tokens it produced."""
    from lmkern.models.generation import stream_text, stream_tokens
    from lmkern.models.tokenizer import END_OF_TEXT

    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [end_of_text]  # "" starts a document
    if max_new_tokens is None:
        max_new_tokens = min(200, model.config.context_length - len(prompt_ids))
    produced = []

    def counted(tokens):
        for token in tokens:
            produced.append(token)
            yield token

    print(prompt, end="", flush=True)
    stop = end_of_text if stop_at_end_of_text else None
    tokens = stream_tokens(model, prompt_ids, max_new_tokens, eos_token_id=stop, **sampling)
    for piece in stream_text(tokenizer, counted(tokens), skip_special_tokens=stop_at_end_of_text):
        print(piece, end="", flush=True)
    print()
    return len(produced)


def generate(args):
    from lmkern.models.tokenizer import load_tokenizer

    sampling = sampling_arguments(args)
    kind, model, folder = load_model(args.checkpoint, args.kernels, args.device)
    if kind != "gpt":
        raise ValueError(f"--checkpoint {folder} holds a {kind.upper()} model: generate needs a GPT checkpoint")
    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        raise ValueError(f"--max-new-tokens must be at least 1, got {args.max_new_tokens}")
    began = time.perf_counter()
    count = print_sample(model, load_tokenizer(folder), args.prompt, args.max_new_tokens, sampling)
    elapsed = time.perf_counter() - began
    print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s]", file=sys.stderr)


# -- demo ----------------------------------------------------------------------------------------

# The demo's sizes: the tokenizer's vocabulary, the GPT (overrides of the tiny preset), the
# training run, and how many validation tokens the perplexities are over (None: all of them).
DEMO_SIZES = {
    "quick": dict(vocab_size=512, model=dict(n_layer=2, n_head=2, n_embd=64, context_length=64), steps=40,
                  batch_size=8, learning_rate=3e-3, warmup_steps=5, eval_tokens=4096, sample_tokens=24),
    "cpu": dict(vocab_size=4096, model=dict(context_length=128), steps=800, batch_size=16, learning_rate=4e-3,
                warmup_steps=50, eval_tokens=None, sample_tokens=100),
    "cuda": dict(vocab_size=8192, model=dict(n_layer=6, n_head=6, n_embd=384, context_length=256), steps=3000,
                 batch_size=64, learning_rate=1e-3, warmup_steps=200, eval_tokens=None, sample_tokens=200),
}


def demo(args):
    from lmkern.models import gpt, tasks
    from lmkern.models.corpus import write_default_corpus
    from lmkern.models.data import documents, text_files
    from lmkern.models.data import prepare as prepare_data
    from lmkern.models.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer
    from lmkern.models.train import TrainConfig
    from lmkern.models.train import train as train_loop

    began = time.perf_counter()
    sizes = DEMO_SIZES["quick" if args.quick else "cuda" if torch.device(args.device).type == "cuda" else "cpu"]
    check_kernels(args.kernels, args.device)
    if args.data:
        files = text_files(args.data)
        source = f"{len(files)} files from --data"
    else:
        files = write_default_corpus(os.path.join(args.out, "corpus"))
        source = "the default corpus (pydoc topics and standard library docstrings)"
    megabytes = sum(os.path.getsize(path) for path in files) / 1e6
    print(f"lmkern demo: a small GPT trained on {source}, {megabytes:.1f} MB, with --kernels {args.kernels} "
          f"on {args.device}")

    tokenizer_dir, data_dir = os.path.join(args.out, "tokenizer"), os.path.join(args.out, "data")
    save_tokenizer(train_tokenizer(documents(files), "bpe", sizes["vocab_size"]), tokenizer_dir)
    meta = prepare_data(files, tokenizer_dir, data_dir, progress=False)
    print(f"tokenizer: byte-level BPE of {meta['vocab_size']} tokens; data: {meta['splits']['train']['tokens']:,} "
          f"training and {meta['splits']['val']['tokens']:,} validation tokens in {data_dir}")

    torch.manual_seed(0)
    config = gpt.preset("tiny", vocab_size=meta["vocab_size"], kernels=args.kernels, **sizes["model"])
    model = gpt.GPT(config).to(args.device)
    print(f"model: GPT of {config.n_layer} layers, {config.n_head} heads, width {config.n_embd}, context "
          f"{config.context_length}: {model.num_parameters() / 1e6:.2f}M parameters")
    batch_size = sizes["batch_size"]
    task = tasks.CausalLMTask(data_dir, config.context_length, batch_size, eval_tokens=sizes["eval_tokens"],
                              eval_batch_size=16)
    before = task.evaluate(model)["val_perplexity"]
    print(f"validation perplexity before training: {before:.1f}")
    train_config = TrainConfig(steps=sizes["steps"], batch_size=batch_size, micro_batch_size=batch_size,
                               learning_rate=sizes["learning_rate"], min_learning_rate=sizes["learning_rate"] / 10,
                               warmup_steps=sizes["warmup_steps"], eval_every=sizes["steps"],
                               checkpoint_every=sizes["steps"])
    run_dir = os.path.join(args.out, "run")
    print(f"training {train_config.steps} steps of {batch_size} x {config.context_length} tokens")
    rows = train_loop(model, task, train_config, run_dir, kind="gpt", model_config=dataclasses.asdict(config),
                      tokenizer_dir=data_dir, device=args.device, progress=not args.quiet)
    print(f"validation perplexity after training: {rows[-1]['val_perplexity']:.1f} (before: {before:.1f})")
    print("sample:")
    print_sample(model, load_tokenizer(tokenizer_dir), args.prompt, sizes["sample_tokens"],
                 dict(do_sample=True, temperature=0.8, top_k=50, seed=0), stop_at_end_of_text=False)
    checkpoint = os.path.join(run_dir, "checkpoint")
    print(f"took {time.perf_counter() - began:.0f} s. The model is in {checkpoint}: "
          f"lmkern generate --checkpoint {checkpoint} --prompt \"{args.prompt}\"")


# -- the parser ----------------------------------------------------------------------------------


def add_kernels(parser, help_suffix=""):
    parser.add_argument("--kernels", choices=backend.CHOICES, default="auto",
                        help="the lmkern backend of every op (default auto: the fastest here)" + help_suffix)


def add_train_parser(commands):
    from lmkern.models.train import TrainConfig

    defaults = TrainConfig()
    train_parser = commands.add_parser(
        "train", help="pretrain a GPT (causal LM) or BERT (MLM + NSP) on data from `lmkern prepare`",
        description="Pretrains a GPT (causal language modelling) or a BERT (masked language modelling and "
        "next-sentence prediction) through models/train.py. OUT gets checkpoint/ (weights, config, tokenizer, "
        "training state), metrics.jsonl, loss.png and options.json. With --resume the run continues exactly "
        "where its last checkpoint left off, with its saved options unless given again. Under torchrun it "
        "trains on every process (DDP).",
    )
    train_parser.add_argument("model", choices=MODELS)
    train_parser.add_argument("--out", required=True, metavar="DIR", help="the run's folder")
    train_parser.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    train_parser.add_argument("--device", default=default_device(), help="cpu, cuda, ... (default: %(default)s)")
    train_parser.add_argument("--quiet", action="store_true", help="no progress bar")
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
                     help=f"evaluate every N steps (default {defaults.eval_every})")
    run.add_argument("--eval-tokens", type=int, metavar="N", help="validation tokens per evaluation (default 32768)")
    run.add_argument("--checkpoint-every", type=int, metavar="N",
                     help=f"checkpoint every N steps (default {defaults.checkpoint_every})")
    run.add_argument("--seed", type=int, metavar="N", help="seeds the weights, batches, masks and dropout (default 0)")
    train_parser.set_defaults(run=train)


def parser():
    top = argparse.ArgumentParser(prog="lmkern", description="Fused kernels and GPT/BERT training on them.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train_tok = tokenizer_commands.add_parser("train",
                                              help="train a tokenizer on text files and save DIR/tokenizer.json")
    train_tok.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    train_tok.add_argument("--kind", choices=["bpe", "wordpiece"], required=True,
                           help="byte-level BPE (GPT) or WordPiece (BERT)")
    train_tok.add_argument("--vocab-size", type=int, required=True)
    train_tok.add_argument("--out", required=True, metavar="DIR")
    train_tok.set_defaults(run=tokenizer_train)

    prep = commands.add_parser("prepare", help="tokenize text into memory-mapped token files")
    prep.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="a folder with tokenizer.json")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    prep.add_argument("--seed", type=int, default=0, help="seeds which documents go to validation")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=prepare)

    add_train_parser(commands)

    evaluation = commands.add_parser(
        "eval", help="a checkpoint's perplexity (GPT) or MLM/NSP accuracy (BERT) on prepared data",
        description="GPT: perplexity over the split's tokens with a sliding window (windows of --context-length "
        "advancing by --stride; each token is scored once). BERT: MLM loss and accuracy and NSP accuracy on fixed "
        "sequences from the split.",
    )
    evaluation.add_argument("--checkpoint", required=True, metavar="DIR", help="a checkpoint folder (or a run's --out)")
    evaluation.add_argument("--data", required=True, metavar="DIR", help="a folder from `lmkern prepare`")
    evaluation.add_argument("--split", choices=["val", "train"], default="val")
    evaluation.add_argument("--context-length", "--seq-length", type=int, dest="context_length", metavar="N",
                            help="GPT: window length (default the model's context); "
                            "BERT: sequence length (default 128)")
    evaluation.add_argument("--stride", type=int, help="GPT: how far the window advances (default half a window)")
    evaluation.add_argument("--max-tokens", type=int, metavar="N",
                            help="GPT: only the split's first N tokens; "
                            "BERT: about N tokens of sequences (default 65536)")
    evaluation.add_argument("--no-nsp", action="store_true", help="BERT: no NSP (a model trained with --no-nsp)")
    evaluation.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    evaluation.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    evaluation.add_argument("--json", action="store_true", help="also print the metrics as a JSON object")
    evaluation.add_argument("--quiet", action="store_true", help="no progress bar")
    add_kernels(evaluation)
    evaluation.set_defaults(run=evaluate)

    gen = commands.add_parser("generate", help="continue a prompt with a GPT checkpoint, printing tokens as they come")
    gen.add_argument("--checkpoint", required=True, metavar="DIR", help="a GPT checkpoint folder (or a run's --out)")
    gen.add_argument("--prompt", required=True, help="the text to continue (\"\" starts a new document)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="at most N new tokens (default 200, fewer if the context is shorter); stops at end of text")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    gen.add_argument("--top-k", type=int, default=200, help="sample among the K most likely tokens (default 200)")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens of total probability P")
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    gen.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    add_kernels(gen)
    gen.set_defaults(run=generate)

    demo_parser = commands.add_parser(
        "demo", help="train a tokenizer and a small GPT on local text and sample from it (minutes on CPU)",
        description="The main job in one command: trains a byte-level BPE tokenizer on the text (default: the "
        "pydoc topics and standard library docstrings of this Python), prepares the token files, trains a small "
        "GPT on lmkern's fused kernels (a few minutes on CPU; a larger one on GPU), prints the validation "
        "perplexity before and after, and streams a sample.",
    )
    demo_parser.add_argument("--data", nargs="+", metavar="PATH",
                             help="text files or folders (default: the default corpus)")
    demo_parser.add_argument("--out", default="lmkern-demo", metavar="DIR",
                             help="where everything goes (default %(default)s)")
    demo_parser.add_argument("--quick", action="store_true",
                             help="a smaller model and few steps: seconds (a smoke test)")
    demo_parser.add_argument("--prompt", default="The", help="the sample's prompt (default %(default)r)")
    demo_parser.add_argument("--device", default=default_device(), help="(default: %(default)s)")
    demo_parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_kernels(demo_parser)
    demo_parser.set_defaults(run=demo)

    bench_parser = commands.add_parser(
        "bench", add_help=False, help="run the benchmark suite (`lmkern bench --help` lists its options)"
    )
    bench_parser.set_defaults(run=bench)

    commands.add_parser("info", help="versions, devices and which backend runs where").set_defaults(run=info)
    return top


def main(argv=None):
    top = parser()
    args, extra = top.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # the benchmark runner parses them
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    try:
        return args.run(args) or 0
    except (ValueError, FileNotFoundError, BackendUnavailableError) as error:  # bad input: say what, not where
        print(f"lmkern {args.command}: error: {error}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        resume = " (`lmkern train ... --resume` continues from the last checkpoint)" if args.command == "train" else ""
        print(f"lmkern {args.command}: interrupted{resume}", file=sys.stderr)
        return 130
