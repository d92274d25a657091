"""Text to token files, and token files back as arrays for training.

Documents: text files are read line by line, and a blank line ends a document (the usual
layout of pretraining corpora: articles or paragraphs separated by blank lines), as does
the end of a file. Folders are searched recursively for *.txt, *.md, *.rst and *.text.

`prepare` tokenizes the documents in streaming batches — inputs larger than memory work —
into DIR/train.bin and DIR/val.bin (every document's tokens back to back, uint16 when the
vocabulary fits in 16 bits, else uint32; a GPT tokenizer's end-of-text token after each
document), DIR/train.docs.npy and DIR/val.docs.npy (int64: where each document starts,
then the end), DIR/meta.json and a copy of the tokenizer. Whole documents go to the
validation split at random (fixed by the seed). The folder is written under a temporary
name and renamed at the end, so a failure never leaves a half-written one.
"""

import json
import os
import random
import shutil

import numpy as np
from tqdm import tqdm

from lmkern.models.files import file_sha256, new_directory
from lmkern.models.tokenizer import END_OF_TEXT, FILE_NAME, load_tokenizer, tokenizer_kind

TEXT_SUFFIXES = (".txt", ".md", ".rst", ".text")
SPLITS = ("train", "val")
FORMAT = 1


def text_files(paths):
    """The files named by `paths`: files as given, folders searched for text files."""
    files = []
    for path in paths:
        if os.path.isfile(path):
            files.append(path)
        elif os.path.isdir(path):
            found = sorted(
                os.path.join(root, name)
                for root, _, names in os.walk(path)
                for name in names
                if name.endswith(TEXT_SUFFIXES)
            )
            if not found:
                raise ValueError(f"--data {path}: the folder has no {'/'.join(TEXT_SUFFIXES)} files")
            files += found
        else:
            raise FileNotFoundError(f"--data {path}: no such file or folder")
    if not files:
        raise ValueError("--data: no input given")
    return files


def documents(files, on_bytes=None):
    """Yields the documents of the files; on_bytes(n) is told how many bytes were read."""
    for path in files:
        lines = []
        with open(path, encoding="utf-8") as file:
            try:
                for line in file:
                    if on_bytes:
                        on_bytes(len(line.encode("utf-8")))
                    if line.strip():
                        lines.append(line)
                    elif lines:
                        yield "".join(lines)
                        lines = []
            except UnicodeDecodeError as error:
                raise ValueError(f"{path} is not UTF-8 text: {error}") from None
        if lines:
            yield "".join(lines)


def token_dtype(vocab_size):
    return np.uint16 if vocab_size <= 2**16 else np.uint32


def prepare(paths, tokenizer_dir, out_dir, val_fraction=0.05, seed=0, batch_documents=512, progress=True):
    """Tokenizes the text at `paths` into `out_dir`; returns its meta.json contents."""
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"--val-fraction must be in [0, 1), got {val_fraction}")
    files = text_files(paths)
    tokenizer = load_tokenizer(tokenizer_dir)
    with new_directory(out_dir) as folder:
        splits = _tokenize(files, tokenizer, folder, val_fraction, seed, batch_documents, progress)
        empty = [name for name, split in splits.items() if split["tokens"] == 0 and (name == "train" or val_fraction)]
        if empty:
            documents_seen = sum(split["documents"] for split in splits.values())
            raise ValueError(
                f"--data {' '.join(paths)}: no tokens for the {empty[0]} split "
                f"({documents_seen} documents, --val-fraction {val_fraction})"
            )
        meta = {
            "format": FORMAT,
            "tokenizer_kind": tokenizer_kind(tokenizer),
            "vocab_size": tokenizer.get_vocab_size(),
            "dtype": np.dtype(token_dtype(tokenizer.get_vocab_size())).name,
            "end_of_text_id": _end_of_text(tokenizer),
            "tokenizer_sha256": file_sha256(os.path.join(tokenizer_dir, FILE_NAME)),
            "splits": splits,
            "sources": files,
        }
        shutil.copy(os.path.join(tokenizer_dir, FILE_NAME), os.path.join(folder, FILE_NAME))
        with open(os.path.join(folder, "meta.json"), "w") as file:
            json.dump(meta, file, indent=1)
    return meta


def _end_of_text(tokenizer):
    """The id GPT's tokenizer puts after each document; None for BERT's."""
    return tokenizer.token_to_id(END_OF_TEXT) if tokenizer_kind(tokenizer) == "bpe" else None


def _tokenize(files, tokenizer, folder, val_fraction, seed, batch_documents, progress):
    """Writes {split}.bin and {split}.docs.npy into folder; returns tokens and documents per split."""
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
        for text in documents(files, on_bytes=bar.update):
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

    def __init__(self, directory, split):
        if split not in SPLITS:
            raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
        meta_path = os.path.join(directory, "meta.json")
        if not os.path.isfile(meta_path):
            raise FileNotFoundError(f"--data {directory}: no meta.json (prepare it with `lmkern prepare`)")
        with open(meta_path) as file:
            self.meta = json.load(file)
        dtype = np.dtype(self.meta["dtype"])
        if self.meta["vocab_size"] > np.iinfo(dtype).max + 1:
            raise ValueError(
                f"{meta_path}: a vocabulary of {self.meta['vocab_size']} does not fit the token files' {dtype}"
            )
        path = os.path.join(directory, f"{split}.bin")
        expected = self.meta["splits"][split]["tokens"]
        if os.path.getsize(path) != expected * dtype.itemsize:
            raise ValueError(f"{path}: {os.path.getsize(path)} bytes, expected {expected} {dtype} tokens")
        self.tokens = np.memmap(path, dtype=dtype, mode="r") if expected else np.zeros(0, dtype)
        self.starts = np.load(os.path.join(directory, f"{split}.docs.npy"))
        self.directory = directory

    def __len__(self):
        return len(self.tokens)

    def check_tokenizer(self, tokenizer_dir):
        """Raises if the tokenizer in tokenizer_dir is not the one these tokens were made with."""
        path = os.path.join(tokenizer_dir, FILE_NAME)
        if file_sha256(path) != self.meta["tokenizer_sha256"]:
            raise ValueError(
                f"the tokenizer {path} is not the one {self.directory} was prepared with "
                f"(its copy is {os.path.join(self.directory, FILE_NAME)})"
            )
