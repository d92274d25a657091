"""A default corpus (the demo's): English text that ships with every Python
installation — the pydoc topic pages and the docstrings of the standard library, about
2 MB — written to a folder of text files (blank lines between documents)."""

import ast
import os
import sysconfig

from pydoc_data.topics import topics

from lmkern.models.files import atomic_file

# Parts of the standard library that are tests, demos or tooling rather than prose.
SKIPPED_FOLDERS = {"test", "tests", "idlelib", "turtledemo", "lib2to3", "site-packages", "__pycache__"}


def standard_library_docstrings():
    """Every module, class and function docstring of the standard library, in path order."""
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
                        yield docstring


def write_default_corpus(directory):
    """Writes topics.txt and docstrings.txt into directory; returns their paths."""
    os.makedirs(directory, exist_ok=True)
    paths = [os.path.join(directory, "topics.txt"), os.path.join(directory, "docstrings.txt")]
    texts = ([topics[name] for name in sorted(topics)], standard_library_docstrings())
    for path, documents in zip(paths, texts):
        with atomic_file(path, encoding="utf-8") as file:
            for document in documents:
                file.write(document.strip() + "\n\n")
    return paths
