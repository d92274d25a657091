"""A default corpus (the demo's): English text that ships with every Python
installation — the pydoc topic pages and the docstrings of the standard library, about
2 MB — written to a folder of text files (blank lines between documents). And a
classification task from the same text: which package of the standard library a
docstring comes from."""

import ast
import collections
import csv
import os
import random
import sysconfig

from pydoc_data.topics import topics

from lmkern.models.files import atomic_file

# Parts of the standard library that are tests, demos or tooling rather than prose.
SKIPPED_FOLDERS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "__pycache__"}


def standard_library_docstrings():
    """Every module, class and function docstring of the standard library, in path order."""
    for _, docstring in module_docstrings():
        yield docstring


def module_docstrings():
    """(module path relative to the standard library, e.g. "email/parser.py", docstring) of
    every module, class and function docstring of the standard library, in path order."""
    root = sysconfig.get_paths()["stdlib"]
    for folder, subfolders, names in os.walk(root):
        subfolders[:] = sorted(name for name in subfolders if name not in SKIPPED_FOLDERS)
        for name in sorted(names):
            if not name.endswith(".py"):
                continue
            try:
                with open(os.path.join(folder, name), encoding="utf-8") as file:
                    tree = ast.parse(file.read())
            except (SyntaxError, UnicodeDecodeError, ValueError):
                continue  # a few files are templates or in other encodings
            for node in ast.walk(tree):
                if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                    docstring = ast.get_docstring(node)
                    if docstring:
                        yield os.path.relpath(os.path.join(folder, name), root), docstring


def write_default_corpus(directory, leave_out=()):
    """Writes topics.txt and docstrings.txt into directory, without the docstrings in
    leave_out (held out for evaluation); returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "topics.txt"), os.path.join(directory, "docstrings.txt")]
    leave_out = set(leave_out)
    docstrings = (docstring for docstring in standard_library_docstrings() if docstring not in leave_out)
    texts = ([topics[name] for name in sorted(topics)], docstrings)
    for path, documents in zip(paths, texts):
        with atomic_file(path, encoding="utf-8") as file:
            for document in documents:
                file.write(document.strip() + "\n\n")
    return paths


# Packages with a few hundred docstrings each in every recent Python, on distinct subjects.
DOCSTRING_PACKAGES = ("asyncio", "email", "importlib", "logging", "tkinter", "xml")


def docstring_task(packages=DOCSTRING_PACKAGES, per_package=200, val_fraction=0.2, seed=0):
    """A sequence-classification task from real text: which of `packages` (top-level
    packages of the standard library) a docstring comes from. Docstrings are deduplicated
    (one that occurs in two places is dropped: it has no single answer), at most
    per_package of each package are kept (balanced classes: the majority baseline is about
    1 / len(packages)), and each package's are split into train and validation by a fixed
    shuffle. Returns {"train": [(text, package)], "val": [...]}, each list shuffled."""
    found = collections.defaultdict(set)
    for path, docstring in module_docstrings():
        found[docstring].add(path.split(os.sep)[0])
    by_package = collections.defaultdict(list)
    for docstring, where in found.items():
        if len(where) == 1 and (package := where.pop()) in packages:
            by_package[package].append(docstring)
    shuffle = random.Random(seed)
    split = {"train": [], "val": []}
    for package in sorted(by_package):
        texts = sorted(by_package[package])
        shuffle.shuffle(texts)
        texts = texts[:per_package]
        held_out = max(1, round(val_fraction * len(texts)))
        split["val"] += [(text, package) for text in texts[:held_out]]
        split["train"] += [(text, package) for text in texts[held_out:]]
    for examples in split.values():
        shuffle.shuffle(examples)
    return split


def write_docstring_task(directory, **options):
    """Writes docstring_task(**options) as train.csv and val.csv (columns text, label) into
    directory, and a pretraining corpus of the same text without the validation docstrings
    (corpus/: the pydoc topics and every other docstring); returns the task."""
    task = docstring_task(**options)
    os.makedirs(directory, exist_ok=True)
    for split, examples in task.items():
        with atomic_file(os.path.join(directory, f"{split}.csv"), encoding="utf-8", newline="") as file:
            writer = csv.writer(file)
            writer.writerow(["text", "label"])
            writer.writerows(examples)
    write_default_corpus(os.path.join(directory, "corpus"), leave_out=[text for text, _ in task["val"]])
    return task
