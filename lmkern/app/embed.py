"""`lmkern embed`: sentence embeddings (models/embed.py) of a file of texts from a BERT
checkpoint of lmkern or a Hugging Face BERT directory, written as .npy or .safetensors."""

import csv
import io
import json
import os
import sys
import warnings

from lmkern.app.common import CommandError, add_device, add_kernels, check_kernels
from lmkern.app.models import is_checkpoint, load_model

FORMATS = ("lines", "csv", "jsonl")
OUTPUTS = (".npy", ".safetensors")
TENSOR_NAME = "embeddings"  # the tensor's name in a .safetensors output


def load_encoder(path, kernels, device):
    """(BERT model on device in eval mode, its tokenizer) of --model `path`: an lmkern BERT
    checkpoint or run folder, or a Hugging Face BERT directory (config.json, weights, and
    tokenizer.json or vocab.txt)."""
    from lmkern.models import hf
    from lmkern.models.bert import BertModel
    from lmkern.models.checkpoint import load_checkpoint_tokenizer
    from lmkern.models.tokenizer import load_hf_tokenizer

    if is_checkpoint(path):
        kind, model, folder = load_model(path, kernels, device)
        if not kind.startswith("bert"):
            raise CommandError(f"--model {folder} holds a {kind} model: embed needs a BERT encoder")
        return model, load_checkpoint_tokenizer(folder)
    if not os.path.isfile(os.path.join(path, hf.CONFIG)):
        raise CommandError(f"--model {path}: neither an lmkern checkpoint or run folder nor a Hugging Face BERT "
                           f"directory (with {hf.CONFIG})")
    check_kernels(kernels, device)
    tokenizer = load_hf_tokenizer(path)
    try:
        with warnings.catch_warnings():  # a checkpoint without the pooler: embeddings do not use it
            warnings.filterwarnings("ignore", message=".*pooler", category=UserWarning)
            model = BertModel.from_hf(path, kernels=kernels)
    except ValueError as error:
        raise CommandError(f"--model {path}: {error}") from None
    return model.to(device).eval(), tokenizer


def input_format(args):
    if args.format is not None:
        return args.format
    extension = os.path.splitext(args.input)[1].lower()
    return {".csv": "csv", ".jsonl": "jsonl"}.get(extension, "lines")


def read_texts(args):
    """The texts of --input (stdin for -): its lines, or the --text-column of each CSV row
    or JSON line."""
    form = input_format(args)
    try:
        if args.input == "-":
            content = sys.stdin.read()
        else:
            with open(args.input, encoding=args.encoding, newline="") as file:
                content = file.read()
    except UnicodeDecodeError as error:
        raise CommandError(f"--input {args.input}: not {args.encoding} text ({error})") from None
    if form == "lines":
        return content.splitlines()
    if form == "csv":
        reader = csv.DictReader(io.StringIO(content))
        if args.text_column not in (reader.fieldnames or []):
            raise CommandError(f"--text-column {args.text_column}: not a column of --input {args.input} (its "
                               f"columns: {', '.join(reader.fieldnames or []) or 'none'})")
        return [row[args.text_column] or "" for row in reader]
    texts = []
    for number, line in enumerate(content.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as error:
            raise CommandError(f"--input {args.input} line {number}: not JSON ({error})") from None
        if not isinstance(record, dict) or not isinstance(record.get(args.text_column), str):
            raise CommandError(f"--input {args.input} line {number}: no text under --text-column {args.text_column}")
        texts.append(record[args.text_column])
    return texts


def check_output(args):
    extension = os.path.splitext(args.output)[1].lower()
    if extension not in OUTPUTS:
        raise CommandError(f"--output {args.output}: name it .npy or .safetensors (the format follows the extension)")
    if os.path.isdir(args.output):
        raise CommandError(f"--output {args.output} is a folder")
    if args.input != "-" and os.path.exists(args.output) and os.path.samefile(args.input, args.output):
        raise CommandError(f"--output {args.output} is the --input")
    if os.path.exists(args.output) and not args.overwrite:
        raise CommandError(f"--output {args.output} exists: choose another name, or pass --overwrite to replace it")
    parent = os.path.dirname(os.path.abspath(args.output))
    if not os.path.isdir(parent):
        raise CommandError(f"--output {args.output}: no folder {parent}")
    return extension


def write_embeddings(vectors, path, extension):
    """Writes (N, H) vectors to path as .npy or .safetensors ({"embeddings": ...}), atomically."""
    from lmkern.models.files import atomic_file

    if extension == ".npy":
        import numpy

        with atomic_file(path, "wb") as file:
            numpy.save(file, vectors.numpy())
    else:
        import safetensors.torch

        with atomic_file(path, "wb") as file:
            file.write(safetensors.torch.save({TENSOR_NAME: vectors.contiguous()}))


def embed(args):
    from lmkern.models.embed import embed as embed_texts

    extension = check_output(args)
    texts = read_texts(args)
    if not texts:
        raise CommandError(f"--input {args.input} holds no texts")
    model, tokenizer = load_encoder(args.model, args.kernels, args.device)
    result = embed_texts(model, tokenizer, texts, batch_size=args.batch_size, normalize=args.normalize,
                         max_length=args.max_length, device=args.device)
    if result.truncated:
        limit = args.max_length or model.config.max_position
        print(f"lmkern embed: warning: {result.truncated} of {len(texts)} texts were longer than {limit} tokens and "
              "were truncated", file=sys.stderr)
    write_embeddings(result.vectors, args.output, extension)
    print(f"embedded {len(texts)} texts as {result.vectors.shape[1]}-dimensional vectors"
          f"{' (L2-normalised)' if args.normalize else ''} into {args.output}")


def add_parser(commands):
    parser = commands.add_parser(
        "embed", help="sentence embeddings of texts from a BERT encoder (mean pooling), as .npy or .safetensors",
        description="Each text's hidden states, averaged over its real tokens (sentence-transformers' default "
        "pooling), from an lmkern BERT checkpoint or a Hugging Face BERT directory. Texts are batched by length; "
        "row i of the output is the i-th text. A text longer than the model's positions is truncated (counted in a "
        "warning).",
    )
    parser.add_argument("--model", required=True, metavar="DIR",
                        help="an lmkern BERT checkpoint or run folder, or a Hugging Face BERT directory (config.json, "
                        "model.safetensors or pytorch_model.bin, tokenizer.json or vocab.txt)")
    parser.add_argument("--input", required=True, metavar="PATH",
                        help="the texts: one per line, or CSV / JSONL (by extension, or --format) with --text-column; "
                        "- reads stdin")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="PATH.npy (an (N, H) float32 array) or PATH.safetensors (a tensor 'embeddings')")
    parser.add_argument("--format", choices=FORMATS, help="the input's format (default: by extension; stdin: lines)")
    parser.add_argument("--text-column", default="text", metavar="NAME",
                        help="CSV / JSONL: the column or key holding the text (default %(default)s)")
    parser.add_argument("--encoding", default="utf-8", help="the input's text encoding (default %(default)s)")
    parser.add_argument("--normalize", action="store_true", help="L2-normalise each embedding")
    parser.add_argument("--batch-size", type=int, default=32, metavar="N", help="texts per forward pass (default 32)")
    parser.add_argument("--max-length", type=int, metavar="N",
                        help="tokens per text at most (default: the model's max positions)")
    parser.add_argument("--overwrite", action="store_true", help="replace an existing --output")
    add_device(parser)
    add_kernels(parser)
    parser.set_defaults(run=embed, flags={"batch_size": "--batch-size", "max_length": "--max-length",
                                          "path": "--model", "directory": "--model"})
