"""The lmkern command line: `lmkern COMMAND` or `python -m lmkern COMMAND`.

    lmkern tokenizer train --data PATH... --kind bpe|wordpiece --vocab-size N --out DIR
    lmkern prepare --data PATH... --tokenizer DIR --out DIR [--val-fraction F]
    lmkern train gpt|llama|bert --data DIR --preset NAME --out DIR [--kernels K] [--resume | --overwrite] [options]
    lmkern finetune gpt|llama --init DIR --data DIR --out DIR [--resume | --overwrite] [train's options]
    lmkern finetune bert --init DIR --train FILE [--validation FILE] --out DIR [--regression] [options]
    lmkern eval --checkpoint DIR --data DIR
    lmkern generate --checkpoint DIR --prompt TEXT [--greedy | --temperature T --top-k K --top-p P]
    lmkern predict --checkpoint DIR --input FILE|- [--output FILE]
    lmkern embed --model DIR --input PATH --output PATH.npy|PATH.safetensors [--normalize]
    lmkern export --checkpoint DIR --hf DIR [--overwrite]
    lmkern demo [--data PATH...] [--quick] [--out DIR] [--kernels K]
    lmkern check [--tokens N] [--vocab V] [--device cpu|cuda]
    lmkern bench [the benchmark runner's arguments]
    lmkern info

Each command lives in lmkern/app/, which runs it (lmkern.app.common.run_command: its
errors as one line, its exit status). Here: the parser, made of the commands' own.
"""

import argparse

from lmkern.app import data, demo, embed, evaluate, export, finetune, generate, tools, train
from lmkern.app.common import run_command


def parser():
    import torch

    import lmkern

    top = argparse.ArgumentParser(prog="lmkern", description="Fused kernels and GPT/Llama/BERT training on them.")
    top.add_argument("--version", action="version", version=f"lmkern {lmkern.__version__} (torch {torch.__version__})")
    top.set_defaults(flags={}, interrupted=None)  # a command's own: see run_command
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, train, finetune, evaluate, generate, embed, export, demo, tools):
        module.add_parser(commands)
    return top


def main(argv=None):
    top = parser()
    args, extra = top.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # the benchmark runner parses them
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    command = " ".join(name for name in (args.command, getattr(args, "tokenizer_command", None)) if name)
    return run_command(args, command)
