"""The lmkern command line: `lmkern COMMAND` or `python -m lmkern COMMAND`.

    lmkern tokenizer train --data PATH... --kind bpe|wordpiece --vocab-size N --out DIR
    lmkern prepare --data PATH... --tokenizer DIR --out DIR [--val-fraction F]
    lmkern info
"""

import argparse
import sys

from lmkern.backend import BackendUnavailableError


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


def parser():
    top = argparse.ArgumentParser(prog="lmkern", description="Fused kernels and GPT/BERT training on them.")
    commands = top.add_subparsers(dest="command", required=True, metavar="COMMAND")

    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tokenizer_commands.add_parser("train", help="train a tokenizer on text files and save DIR/tokenizer.json")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    train.add_argument("--kind", choices=["bpe", "wordpiece"], required=True,
                       help="byte-level BPE (GPT) or WordPiece (BERT)")
    train.add_argument("--vocab-size", type=int, required=True)
    train.add_argument("--out", required=True, metavar="DIR")
    train.set_defaults(run=tokenizer_train)

    prep = commands.add_parser("prepare", help="tokenize text into memory-mapped token files")
    prep.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="a folder with tokenizer.json")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    prep.add_argument("--seed", type=int, default=0, help="seeds which documents go to validation")
    prep.add_argument("--quiet", action="store_true", help="no progress bar")
    prep.set_defaults(run=prepare)

    commands.add_parser("info", help="versions, devices and which backend runs where").set_defaults(run=info)
    return top


def main(argv=None):
    args = parser().parse_args(argv)
    try:
        args.run(args)
    except (ValueError, FileNotFoundError, BackendUnavailableError) as error:  # bad input: say what, not where
        print(f"lmkern {args.command}: error: {error}", file=sys.stderr)
        return 2
    return 0
