"""The lmkern command line: `lmkern COMMAND` or `python -m lmkern COMMAND`.

    lmkern tokenizer train --data PATH... --kind bpe|wordpiece --vocab-size N --out DIR
    lmkern prepare --data PATH... --tokenizer DIR --out DIR [--val-fraction F]
    lmkern train gpt|bert --data DIR --preset NAME --out DIR [--kernels K] [--resume | --overwrite] [options]
    lmkern eval --checkpoint DIR --data DIR
    lmkern generate --checkpoint DIR --prompt TEXT [--greedy | --temperature T --top-k K --top-p P]
    lmkern demo [--data PATH...] [--quick] [--out DIR] [--kernels K]
    lmkern bench [the benchmark runner's arguments]
    lmkern info

Each command lives in lmkern/app/. Here: the parser, and the one-line error (exit status
2) for bad input, a missing or damaged file, a folder in use and the operating system's
errors (no space, no permission, a read-only file system), which name the option or path.
"""

import argparse
import sys

from lmkern.app import data, demo, evaluate, generate, tools, train
from lmkern.app.common import CommandError
from lmkern.backend import BackendUnavailableError


def parser():
    import torch

    import lmkern

    top = argparse.ArgumentParser(prog="lmkern", description="Fused kernels and GPT/BERT training on them.")
    top.add_argument("--version", action="version", version=f"lmkern {lmkern.__version__} (torch {torch.__version__})")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")
    for module in (data, train, evaluate, generate, demo, tools):
        module.add_parser(commands)
    return top


def describe(error):
    """An operating-system error in one line, naming its file: "PATH: No space left on device"."""
    if error.filename is None:
        return str(error)
    paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
    return f"{paths}: {error.strerror or error}"


def main(argv=None):
    top = parser()
    args, extra = top.parse_known_args(argv)
    if args.command == "bench":
        args.bench_args = extra  # the benchmark runner parses them
    elif extra:
        top.error(f"unrecognized arguments: {' '.join(extra)}")
    command = " ".join(name for name in (args.command, getattr(args, "tokenizer_command", None)) if name)
    try:
        return args.run(args) or 0
    except (CommandError, ValueError, BackendUnavailableError) as error:  # bad input: say what, not where
        message = str(error)
    except OSError as error:
        message = describe(error)
    except KeyboardInterrupt:
        resume = " (`lmkern train ... --resume` continues from the last checkpoint)" if args.command == "train" else ""
        print(f"lmkern {command}: interrupted{resume}", file=sys.stderr)
        return 130
    print(f"lmkern {command}: error: {message}", file=sys.stderr)
    return 2
