"""Text to token files, and token files back as arrays for training.

Documents: text files are read line by line, and a separator line ends a document — by
default a blank line (the usual layout of pretraining corpora: articles or paragraphs
separated by blank lines); with another separator, such as the "%" lines of fortune files,
blank lines stay inside documents — as does the end of a file. Folders are searched
recursively for *.txt, *.md, *.rst, *.text and files without an extension, leaving out
hidden files and folders. TextFormat says how files are read: the separator, the encoding,
and whether a file that cannot be read as such text is skipped (and reported) or an error.

`prepare` tokenizes the documents in streaming batches — inputs larger than memory work —
into DIR/train.bin and DIR/val.bin (every document's tokens back to back, uint16 when the
vocabulary fits in 16 bits, else uint32; a GPT tokenizer's end-of-text token, a T5
one's </s>, after each document), DIR/train.docs.npy and DIR/val.docs.npy (int64: where each document starts,
then the end), DIR/meta.json and a copy of the tokenizer. Whole documents go to the
validation split at random (fixed by the seed). The files are written in a temporary
folder and moved into DIR at the end, meta.json last, replacing only files of these names:
a failure never leaves a half-written set, and nothing else in DIR is touched.
"""

import codecs
import dataclasses
import json
import os
import random
import shutil

import numpy as np
from tqdm import tqdm

from lmkern.models.errors import ArgumentPathError, ArgumentValueError
from lmkern.models.files import file_sha256, staged_files
from lmkern.models.tokenizer import END_OF_TEXT, FILE_NAME, T5_SPECIALS, load_tokenizer, tokenizer_kind

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")  # and files without an extension
SPLITS = ("train", "val")
META = "meta.json"
FORMAT = 1


@dataclasses.dataclass(frozen=True)
class TextFormat:
    """How text files are read into documents."""

    encoding: str = "utf-8"
    separator: str = ""  # a line that is this, once stripped, ends a document; "": a blank line
    skip_bad_files: bool = False  # leave out (and report) files that cannot be read in this encoding


def is_text_file_name(name):
    return not name.startswith(".") and (name.endswith(TEXT_SUFFIXES) or "." not in name)


def text_files(paths):
    """The files named by `paths`: files as given, folders searched for text files."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = []
            for root, folders, names in os.walk(path, onerror=raise_error):
                folders[:] = [name for name in folders if not name.startswith(".")]
                found += [os.path.join(root, name) for name in names if is_text_file_name(name)]
            if not found:
                suffixes = ", ".join(f"*{suffix}" for suffix in TEXT_SUFFIXES)
                raise ArgumentValueError("{paths} {}: the folder has no text files ({} or without an extension)",
                                         path, suffixes)
            files += sorted(found)
        else:
            raise ArgumentPathError("{paths} {}: no such file or folder", path)
    if not files:
        raise ArgumentValueError("{paths}: no input given")
    return files


def raise_error(error):
    """os.walk's onerror: stop, rather than leave out a folder it cannot list."""
    raise error


def documents(files, text_format=TextFormat(), on_bytes=None, skipped=None):
    """Yields the documents of the files (strings); on_bytes(n) is told how many bytes were
    read. With text_format.skip_bad_files a file that cannot be read or decoded is left out
    whole, and (path, reason) appended to the list `skipped`."""
    for path in files:
        if text_format.skip_bad_files:
            problem = unreadable(path, text_format.encoding)
            if problem is not None:
                skipped.append((path, problem))
                continue
        yield from file_documents(path, text_format, on_bytes)


def file_documents(path, text_format, on_bytes):
    """The documents of one file: the runs of lines between separator lines, without blank
    lines at their start or end."""
    lines = []
    with open(path, encoding=text_format.encoding) as file:
        try:
            for line in file:
                if on_bytes:
                    on_bytes(len(line.encode(text_format.encoding)))
                if line.strip() == text_format.separator:
                    if lines:
                        yield document(lines)
                    lines = []
                elif lines or line.strip():
                    lines.append(line)
        except UnicodeDecodeError as error:
            raise ValueError(f"{path} is not {text_format.encoding} text: {error}") from None
    if lines:
        yield document(lines)


def document(lines):
    """The text of a document's lines, less the blank lines at its end."""
    while not lines[-1].strip():
        lines.pop()
    return "".join(lines)


def unreadable(path, encoding):
    """Why the file at path cannot be read as `encoding` text, or None if it can."""
    decoder = codecs.getincrementaldecoder(encoding)()
    offset = 0
    try:
        with open(path, "rb") as file:
            for block in iter(lambda: file.read(1 << 20), b""):
                decoder.decode(block)
                offset += len(block)
            decoder.decode(b"", final=True)
    except OSError as error:
        return error.strerror
    except UnicodeDecodeError as error:
        return f"not {encoding} text ({error.reason} at byte {offset + error.start})"
    return None


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(paths, tokenizer_dir, out_dir, val_fraction=0.05, seed=0, batch_documents=512, progress=True,
            text_format=TextFormat()):
    """Tokenizes the text at `paths` into `out_dir` (created if need be); returns its
    meta.json contents, which list the files read ("sources") and those skipped."""
    if not 0.0 <= val_fraction < 1.0:
        raise ArgumentValueError("{val_fraction} must be in [0, 1), got {}", val_fraction)
    files = text_files(paths)
    tokenizer = load_tokenizer(tokenizer_dir)
    os.makedirs(out_dir, exist_ok=True)
    skipped = []
    with staged_files(out_dir, last=META) as folder:
        splits = _tokenize(files, text_format, skipped, tokenizer, folder, val_fraction, seed, batch_documents,
                           progress)
        empty = [name for name, split in splits.items() if split["tokens"] == 0 and (name == "train" or val_fraction)]
        if empty:
            documents_seen = sum(split["documents"] for split in splits.values())
            raise ArgumentValueError("{paths} {}: no tokens for the {} split ({} documents, {val_fraction} {}{})",
                                     " ".join(paths), empty[0], documents_seen, val_fraction,
                                     f", {len(skipped)} files skipped" if skipped else "")
        left_out = {path for path, _ in skipped}
        meta = {
            "format": FORMAT,
            "tokenizer_kind": tokenizer_kind(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "dtype": np.dtype(token_dtype(tokenizer.get_vocab_size())).name,
            "end_of_text_id": _end_of_text(tokenizer),
            "tokenizer_sha256": file_sha256(os.path.join(tokenizer_dir, FILE_NAME)),
            "splits": splits,
            "text_format": dataclasses.asdict(text_format),
            "sources": [os.path.abspath(path) for path in files if path not in left_out],
            "skipped": [{"path": os.path.abspath(path), "reason": reason} for path, reason in skipped],
        }
        shutil.copyfile(os.path.join(tokenizer_dir, FILE_NAME), os.path.join(folder, FILE_NAME))
        with open(os.path.join(folder, META), "w") as file:
            json.dump(meta, file, indent=1)
    return meta


def _end_of_text(tokenizer):
    """The id that ends each document: GPT's <|endoftext|>, T5's </s> (as its tokenizer ends
    every text); None for BERT's."""
    ends = {"bpe": END_OF_TEXT, "t5": T5_SPECIALS[1]}
    kind = tokenizer_kind(tokenizer)
    return tokenizer.token_to_id(ends[kind]) if kind in ends else None


def _tokenize(files, text_format, skipped, tokenizer, folder, val_fraction, seed, batch_documents, progress):
    """Writes the documents of files as {split}.bin and {split}.docs.npy into folder (those
    it skips into `skipped`); returns tokens and documents per split."""
    dtype = token_dtype(tokenizer.get_vocab_size())
    end_of_text = _end_of_text(tokenizer)
    starts = {split: [0] for split in SPLITS}
    choose = random.Random(seed)
    outputs = {split: open(os.path.join(folder, f"{split}.bin"), "wb") for split in SPLITS}
    bar = tqdm(total=sum(os.path.getsize(f) for f in files), unit="B", unit_scale=True, disable=not progress)

    def flush(batch):
        encodings = tokenizer.encode_batch([text for text, _ in batch], add_special_tokens=False)
        for (_, split), encoding in zip(batch, encodings):
            ids = encoding.ids + ([end_of_text] if end_of_text is not None else [])
            outputs[split].write(np.asarray(ids, dtype=dtype).tobytes())
            starts[split].append(starts[split][-1] + len(ids))

    try:
        batch = []
        for text in documents(files, text_format, on_bytes=bar.update, skipped=skipped):
            batch.append((text, "val" if choose.random() < val_fraction else "train"))
            if len(batch) == batch_documents:
                flush(batch)
                batch = []
        flush(batch)
    finally:
        bar.close()
        for output in outputs.values():
            output.close()
    for split in SPLITS:
        np.save(os.path.join(folder, f"{split}.docs.npy"), np.asarray(starts[split], dtype=np.int64))
    return {split: {"tokens": starts[split][-1], "documents": len(starts[split]) - 1} for split in SPLITS}


class TokenData:
    """A prepared split: `tokens` (a read-only memory map) and `starts` (document offsets)."""

    def __init__(self, data_dir, split):
        if split not in SPLITS:
            raise ArgumentValueError("{split} must be one of {}, got {!r}", ", ".join(SPLITS), split)
        meta_path = os.path.join(data_dir, META)
        if not os.path.isfile(meta_path):
            raise ArgumentPathError("{data_dir} {}: no {}, so not a folder of prepared token files", data_dir, META)
        try:
            with open(meta_path) as file:
                self.meta = json.load(file)
            dtype = np.dtype(self.meta["dtype"])
            vocab_size, expected = self.meta["vocab_size"], self.meta["splits"][split]["tokens"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{meta_path} is corrupted: {error!r}") from None
        if vocab_size > np.iinfo(dtype).max + 1:
            raise ValueError(f"{meta_path}: a vocabulary of {vocab_size} does not fit the token files' {dtype}")
        path = os.path.join(data_dir, f"{split}.bin")
        if os.path.getsize(path) != expected * dtype.itemsize:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, expected {expected} {dtype} tokens")
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        starts_path = os.path.join(data_dir, f"{split}.docs.npy")
        try:
            self.starts = np.load(starts_path)
        except (ValueError, EOFError) as error:
            raise ValueError(f"{starts_path} is corrupted: {error}") from None
        self.data_dir = data_dir

    def __len__(self):
        return len(self.tokens)

    def check_tokenizer(self, tokenizer_dir):
        """Raises if the tokenizer in tokenizer_dir is not the one these tokens were made with."""
        path = os.path.join(tokenizer_dir, FILE_NAME)
        if file_sha256(path) != self.meta["tokenizer_sha256"]:
            raise ValueError(
                f"the tokenizer {path} is not the one {self.data_dir} was prepared with "
                f"(its copy is {os.path.join(self.data_dir, FILE_NAME)})"
            )
