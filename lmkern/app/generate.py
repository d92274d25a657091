"""`lmkern generate`: a GPT or Llama checkpoint continues a prompt, its text printed as it
comes; a T5 checkpoint answers it (the decoder's text for the prompt as the encoder's input)."""

import sys
import time

from lmkern.app.common import CommandError, add_device, add_kernels
from lmkern.app.models import CAUSAL, load_model


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


def fit_to_context(prompt_ids, max_new_tokens, context_length):
    """(prompt ids, max_new_tokens) that fit the context: max_new_tokens by default
    min(200, what the context leaves after the prompt, but at least half of it); a longer
    prompt loses its first tokens. Says on stderr what it dropped."""
    if max_new_tokens is None:
        max_new_tokens = min(200, context_length - min(len(prompt_ids), context_length // 2))
    elif max_new_tokens >= context_length:
        raise ValueError(f"--max-new-tokens {max_new_tokens}: more than the model's context of {context_length} "
                         f"tokens holds beside a prompt (at most {context_length - 1})")
    room = context_length - max_new_tokens
    if len(prompt_ids) > room:
        print(f"the prompt's first {len(prompt_ids) - room} of {len(prompt_ids)} tokens are left out: the model sees "
              f"{context_length} tokens, {max_new_tokens} of them new", file=sys.stderr)
        prompt_ids = prompt_ids[-room:]
    return prompt_ids, max_new_tokens


def print_sample(model, tokenizer, prompt, max_new_tokens, sampling, *, stop_at_end_of_text=True, min_new_tokens=0):
    """Prints the prompt, then the model's continuation token by token as it is produced, up
    to the end of the document (or, if not stop_at_end_of_text, across documents, each
    end-of-text shown as a document break); returns how many tokens it produced. A prompt
    that does not fit the context is cut from the left (fit_to_context)."""
    from lmkern.models.generation import stream_tokens
    from lmkern.models.tokenizer import END_OF_TEXT

    end_of_text = tokenizer.token_to_id(END_OF_TEXT)
    prompt_ids = tokenizer.encode(prompt, add_special_tokens=False).ids or [end_of_text]  # "" starts a document
    prompt_ids, max_new_tokens = fit_to_context(prompt_ids, max_new_tokens, model.config.context_length)
    print(prompt, end="", flush=True)
    tokens = stream_tokens(model, prompt_ids, max_new_tokens, eos_token_id=end_of_text if stop_at_end_of_text else None,
                           min_new_tokens=min_new_tokens, **sampling)
    return print_stream(tokenizer, tokens, end_of_text if not stop_at_end_of_text else None)


def print_answer(model, tokenizer, prompt, max_new_tokens, sampling, min_new_tokens):
    """Prints a T5's answer to the prompt (its encoder's input, tokenized with the tokenizer's
    </s> at its end) token by token as it is produced, up to its end of sequence (not before
    min_new_tokens); returns how many tokens it produced."""
    import torch

    device = next(model.parameters()).device
    input_ids = torch.tensor([tokenizer.encode(prompt).ids], device=device)
    tokens = model.new_tokens(input_ids, max_new_tokens or 200, min_new_tokens=min_new_tokens, **sampling)
    return print_stream(tokenizer, (int(token) for token in tokens))  # </s> and padding, special, are not shown


def print_stream(tokenizer, token_ids, end_of_text_id=None):
    """Prints the text of token ids (ints) piece by piece as they come (stream_text), then a
    newline; returns how many there were."""
    from lmkern.models.generation import stream_text

    count = 0

    def counted():
        nonlocal count
        for token_id in token_ids:
            count += 1
            yield token_id

    for piece in stream_text(tokenizer, counted(), end_of_text_id):
        print(piece, end="", flush=True)
    print()
    return count


def read_prompt(args):
    """The prompt: --prompt, or the text of --prompt-file (stdin for "-"), kept exactly."""
    if args.prompt_file is None:
        return args.prompt
    try:
        if args.prompt_file == "-":
            return sys.stdin.read()
        with open(args.prompt_file, encoding="utf-8") as file:
            return file.read()
    except UnicodeDecodeError as error:
        raise CommandError(f"--prompt-file {args.prompt_file}: not utf-8 text ({error})") from None


def generate(args):
    from lmkern.models.checkpoint import load_checkpoint_tokenizer

    sampling = sampling_arguments(args)
    for flag, value, minimum in (("--max-new-tokens", args.max_new_tokens, 1), ("--num-samples", args.num_samples, 1),
                                 ("--min-new-tokens", args.min_new_tokens, 0)):
        if value is not None and value < minimum:
            raise CommandError(f"{flag} must be at least {minimum}, got {value}")
    prompt = read_prompt(args)
    kind, model, folder = load_model(args.checkpoint, args.kernels, args.device)
    if kind not in (*CAUSAL, "t5"):
        raise ValueError(f"--checkpoint {folder} holds a {kind.upper()} model: generate needs a GPT, Llama or T5 "
                         "checkpoint")
    if kind == "t5" and args.ignore_eos:
        raise CommandError("--ignore-eos continues documents: a T5 answers a prompt")
    tokenizer = load_checkpoint_tokenizer(folder)
    for sample in range(args.num_samples):
        if args.num_samples > 1:
            print(f"[sample {sample + 1} of {args.num_samples}]")
        if args.seed is not None and sampling["do_sample"]:
            sampling["seed"] = args.seed + sample
        began = time.perf_counter()
        if kind == "t5":
            count = print_answer(model, tokenizer, prompt, args.max_new_tokens, sampling, args.min_new_tokens)
        else:
            count = print_sample(model, tokenizer, prompt, args.max_new_tokens, sampling,
                                 stop_at_end_of_text=not args.ignore_eos, min_new_tokens=args.min_new_tokens)
        elapsed = time.perf_counter() - began
        print(f"[{count} tokens in {elapsed:.2f} s, {count / elapsed:.1f} tokens/s]", file=sys.stderr)


def add_parser(commands):
    gen = commands.add_parser("generate", help="continue a prompt with a GPT or Llama checkpoint, printing tokens as "
                              "they come, or answer it with a T5's")
    gen.add_argument("--checkpoint", required=True, metavar="DIR",
                     help="a GPT, Llama or T5 checkpoint folder, or a run's --out (its newest checkpoint)")
    prompt = gen.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="the text to continue (\"\" starts a new document)")
    prompt.add_argument("--prompt-file", metavar="PATH", help="continue this file's text, exactly (- reads stdin)")
    gen.add_argument("--max-new-tokens", type=int, metavar="N",
                     help="at most N new tokens (default 200, or fewer to fit the model's context; a prompt longer "
                     "than the context leaves loses its first tokens)")
    end = gen.add_mutually_exclusive_group()
    end.add_argument("--ignore-eos", action="store_true",
                     help="go on past the end of a document (shown as a document break) to --max-new-tokens")
    end.add_argument("--min-new-tokens", type=int, default=0, metavar="N",
                     help="the document cannot end before N new tokens (default 0)")
    gen.add_argument("--num-samples", type=int, default=1, metavar="N",
                     help="N continuations of the prompt, one after another (with --seed S: seeds S, S+1, ...)")
    gen.add_argument("--greedy", action="store_true", help="always the most likely token (no sampling)")
    gen.add_argument("--temperature", type=float, default=0.8, help="sampling temperature (default 0.8)")
    gen.add_argument("--top-k", type=int, default=200, help="sample among the K most likely tokens (default 200)")
    gen.add_argument("--top-p", type=float, help="sample among the most likely tokens of total probability P")
    gen.add_argument("--seed", type=int, help="makes sampling reproducible")
    add_device(gen)
    add_kernels(gen)
    gen.set_defaults(run=generate, flags={"path": "--checkpoint"})
