"""`lmkern tokenizer train` and `lmkern prepare`: a tokenizer trained on text files, and
the text tokenized into memory-mapped token files (models/tokenizer.py, models/data.py)."""

from lmkern.app.common import (CommandError, add_overwrite, add_quiet, add_text_options, output_folder, report_skipped,
                               show_progress, text_format)


def tokenizer_train(args):
    from lmkern.models.data import documents, text_files
    from lmkern.models.tokenizer import save_tokenizer, train_tokenizer

    text = text_format(args)
    files = text_files(args.data)
    inputs = [("--data", path) for path in args.data]
    with output_folder(args.out, "lmkern tokenizer train", inputs=inputs, overwrite=args.overwrite):
        counted, skipped = [], []

        def counting(texts):
            for document in texts:
                counted.append(len(document))
                yield document

        tokenizer = train_tokenizer(counting(documents(files, text, skipped=skipped)), args.kind, args.vocab_size,
                                    args.sentinels)
        report_skipped("lmkern tokenizer train", skipped)
        if not counted:
            raise CommandError(f"--data {' '.join(args.data)}: no text to train a tokenizer on"
                               f"{f' ({len(skipped)} files skipped)' if skipped else ''}")
        save_tokenizer(tokenizer, args.out)
    print(
        f"trained a {args.kind} tokenizer of {tokenizer.get_vocab_size()} tokens on {len(counted)} documents "
        f"({sum(counted) / 1e6:.1f} MB) from {len(files) - len(skipped)} files: {args.out}/tokenizer.json"
    )


def prepare(args):
    from lmkern.models.data import prepare as prepare_data

    text = text_format(args)
    inputs = [("--data", path) for path in args.data] + [("--tokenizer", args.tokenizer)]
    with output_folder(args.out, "lmkern prepare", inputs=inputs, overwrite=args.overwrite):
        meta = prepare_data(args.data, args.tokenizer, args.out, args.val_fraction, args.seed,
                            progress=show_progress(args), text_format=text)
    report_skipped("lmkern prepare", [(skip["path"], skip["reason"]) for skip in meta["skipped"]])
    splits = ", ".join(f"{name} {split['tokens']:,} tokens in {split['documents']:,} documents"
                       for name, split in meta["splits"].items())
    print(f"prepared {args.out}: {splits} ({meta['dtype']})")


def add_parser(commands):
    tokenizer = commands.add_parser("tokenizer", help="train a tokenizer")
    tokenizer_commands = tokenizer.add_subparsers(dest="tokenizer_command", required=True, metavar="ACTION")
    train = tokenizer_commands.add_parser("train", help="train a tokenizer on text files and save DIR/tokenizer.json")
    train.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    train.add_argument("--kind", choices=["bpe", "wordpiece", "t5"], required=True,
                       help="byte-level BPE (GPT, Llama), WordPiece (BERT), or byte-level BPE with T5's <pad>, </s> "
                       "and span-corruption sentinels <extra_id_N> (T5)")
    train.add_argument("--vocab-size", type=int, required=True, help="tokens in all (T5: the sentinels included)")
    train.add_argument("--sentinels", type=int, default=100, metavar="N",
                       help="--kind t5: the sentinels <extra_id_0> .. <extra_id_N-1> (default 100, as T5's)")
    train.add_argument("--out", required=True, metavar="DIR")
    add_overwrite(train, "it")
    add_text_options(train)
    train.set_defaults(run=tokenizer_train, flags={"paths": "--data", "kind": "--kind", "vocab_size": "--vocab-size",
                                                  "sentinels": "--sentinels"})

    prep = commands.add_parser("prepare", help="tokenize text into memory-mapped token files")
    prep.add_argument("--data", nargs="+", required=True, metavar="PATH", help="text files or folders of them")
    prep.add_argument("--tokenizer", required=True, metavar="DIR", help="a folder with tokenizer.json")
    prep.add_argument("--out", required=True, metavar="DIR")
    prep.add_argument("--val-fraction", type=float, default=0.05, help="share of documents for validation")
    prep.add_argument("--seed", type=int, default=0, help="seeds which documents go to validation")
    add_overwrite(prep, "it")
    add_quiet(prep)
    add_text_options(prep)
    prep.set_defaults(run=prepare,
                      flags={"paths": "--data", "tokenizer_dir": "--tokenizer", "val_fraction": "--val-fraction"})
