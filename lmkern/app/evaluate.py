"""`lmkern eval`: a checkpoint's perplexity (GPT, Llama), MLM and NSP accuracy (BERT) or
span-corruption loss and accuracy (T5) on prepared data, computed as the training run's
evaluations are (models/tasks.py)."""

import json
import math

from lmkern.app.common import CommandError, add_device, add_kernels, add_quiet, show_progress
from lmkern.app.models import CAUSAL, check_same_tokenizer, load_model


def evaluate(args):
    from lmkern.models import tasks
    from lmkern.models.bert_data import SpecialIds
    from lmkern.models.checkpoint import load_checkpoint_tokenizer
    from lmkern.models.data import TokenData
    from lmkern.models.t5_data import T5SpecialIds

    kind, model, folder = load_model(args.checkpoint, args.kernels, args.device)
    data = TokenData(args.data, args.split)
    check_same_tokenizer(data, folder, model.config.vocab_size)
    progress = show_progress(args)
    if kind in CAUSAL:
        context = args.context_length or model.config.context_length
        if context > model.config.context_length:
            raise ValueError(f"--context-length {context}: more than the model's {model.config.context_length}")
        stride = args.stride or context
        tokens = data.tokens[: args.max_tokens]
        if len(tokens) < 2:
            raise ValueError(f"--data {args.data}: the {args.split} split has no tokens to evaluate on")
        result = tasks.perplexity(model, tokens, context, stride, args.batch_size, args.device, progress)
        line = (f"{args.split} perplexity {result['perplexity']:.3f} (loss {result['loss']:.4f} nats/token over "
                f"{result['tokens']:,} tokens; windows of {context}, stride {stride})")
    elif kind == "t5":
        seq_length = args.context_length or 128
        spans = tasks.span_corruption(data, args.split, T5SpecialIds.of(load_checkpoint_tokenizer(folder)), seq_length)
        sequences = max(1, (args.max_tokens or 65536) // spans.window)
        result = tasks.span_corruption_metrics(model, spans, sequences, args.batch_size, args.device, progress)
        line = (f"{args.split} span-corruption loss {result['loss']:.4f}, accuracy {result['accuracy']:.2%} over "
                f"{sequences} windows of {spans.window} tokens (inputs of up to {seq_length})")
    else:
        seq_length = args.context_length or min(128, model.config.max_position)
        specials = SpecialIds.of(load_checkpoint_tokenizer(folder))
        pairs = tasks.pair_builder(data, args.split, specials, seq_length, not args.no_nsp)
        sequences = max(1, (args.max_tokens or 65536) // seq_length)
        result = tasks.masked_lm_metrics(model, pairs, model.config.vocab_size, sequences, args.batch_size,
                                         not args.no_nsp, args.device, progress)
        line = f"{args.split} MLM loss {result['mlm_loss']:.4f}, accuracy {result['mlm_accuracy']:.2%}"
        if not args.no_nsp:
            line += f"; NSP accuracy {result['nsp_accuracy']:.2%} (loss {result['nsp_loss']:.4f})"
        line += f" over {sequences} sequences of up to {seq_length} tokens"
    if not all(math.isfinite(value) for value in result.values()):
        raise CommandError(f"--checkpoint {folder}: the model's outputs on --data {args.data} are not finite ({line})")
    print(line)
    if args.json:
        print(json.dumps(result))


def add_parser(commands):
    evaluation = commands.add_parser(
        "eval", help="a checkpoint's perplexity (GPT, Llama), MLM/NSP accuracy (BERT) or span-corruption loss and "
        "accuracy (T5) on prepared data",
        description="GPT and Llama: perplexity over the split's tokens in windows of --context-length advancing by --stride "
        "(each token scored once). The defaults, windows of the model's context side by side, are how a training "
        "run evaluates, so the numbers agree with its metrics over the same tokens; a smaller --stride gives each "
        "token more context and a lower perplexity. BERT: MLM loss and accuracy and NSP accuracy on fixed "
        "sequences from the split. T5: the loss and accuracy on the targets of fixed span-corrupted windows.",
    )
    evaluation.add_argument("--checkpoint", required=True, metavar="DIR",
                            help="a checkpoint folder, or a run's --out (its newest checkpoint)")
    evaluation.add_argument("--data", required=True, metavar="DIR", help="a folder from `lmkern prepare`")
    evaluation.add_argument("--split", choices=["val", "train"], default="val")
    evaluation.add_argument("--context-length", "--seq-length", type=int, dest="context_length", metavar="N",
                            help="GPT: window length (default the model's context); "
                            "BERT: sequence length (default 128); T5: input length (default 128)")
    evaluation.add_argument("--stride", type=int,
                            help="GPT: how far the window advances (default a whole window, as training evaluates)")
    evaluation.add_argument("--max-tokens", type=int, metavar="N",
                            help="GPT: only the split's first N tokens (default all); "
                            "BERT, T5: about N tokens of sequences (default 65536)")
    evaluation.add_argument("--no-nsp", action="store_true", help="BERT: no NSP (a model trained with --no-nsp)")
    evaluation.add_argument("--batch-size", type=int, default=8, help="sequences per forward pass (default 8)")
    add_device(evaluation)
    evaluation.add_argument("--json", action="store_true", help="also print the metrics as a JSON object")
    add_quiet(evaluation)
    add_kernels(evaluation)
    evaluation.set_defaults(run=evaluate, flags={"path": "--checkpoint", "data_dir": "--data", "stride": "--stride",
                                                 "context_length": "--context-length"})
