"""What the command-line tests share: a corpus a tiny model learns from in a few steps,
the command line run in-process, a small training run's options, and a snapshot of a
folder's files to show that a command left them alone."""

import os
import random

from lmkern import cli

SUBJECTS = ["the cat", "a dog", "the model", "my friend", "the kernel", "a student", "the teacher", "our tokenizer"]
VERBS = ["sees", "likes", "trains", "reads", "writes", "finds", "keeps", "moves"]
OBJECTS = ["the ball", "a book", "the data", "some text", "the tensor", "a letter", "the garden", "an apple"]

SMALL_RUN = ("--preset", "tiny", "--context-length", 32, "--batch-size", 8, "--micro-batch-size", 4, "--lr", 3e-3,
             "--warmup", 3, "--eval-tokens", 512, "--device", "cpu", "--quiet")


def write_corpus(folder, documents=240):
    """Documents of simple sentences: enough structure for a tiny model to learn in a few steps."""
    choose = random.Random(0)
    text = []
    for _ in range(documents):
        sentences = [f"{choose.choice(SUBJECTS)} {choose.choice(VERBS)} {choose.choice(OBJECTS)}."
                     for _ in range(choose.randint(3, 7))]
        text.append(" ".join(sentences).capitalize())
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "corpus.txt").write_text("\n\n".join(text) + "\n", encoding="utf-8")
    return str(folder)


def lmkern(*argv):
    """Runs the command line in this process; returns its exit status."""
    return cli.main([str(a) for a in argv])


def train_run(model, data, out, *options):
    return lmkern("train", model, "--data", data, "--out", out, *SMALL_RUN, *options)


def snapshot(folder):
    """{path under folder: contents} of every file there, hidden ones included."""
    found = {}
    for root, _, names in os.walk(folder):
        for name in names:
            path = os.path.join(root, name)
            with open(path, "rb") as file:
                found[os.path.relpath(path, folder)] = file.read()
    return found


def one_line_error(capsys, status):
    """The error of a command that exited with `status`, checked to be bad input's (2) and
    said in one line: e.g. one_line_error(capsys, lmkern("train", ...))."""
    error = capsys.readouterr().err.strip()
    assert status == 2, error
    assert len(error.splitlines()) == 1, error
    return error
