"""File helpers for data and checkpoints: content hashes, and folders written under a
temporary name then renamed into place, so that a crash never leaves a half-written one."""

import contextlib
import hashlib
import os
import shutil


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


@contextlib.contextmanager
def new_directory(target):
    """Yields a fresh folder to write; it becomes `target` (replacing what was there) when
    the block ends, and is removed if the block raises."""
    partial = target.rstrip("/") + ".partial"
    shutil.rmtree(partial, ignore_errors=True)
    os.makedirs(partial)
    try:
        yield partial
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    replace_directory(partial, target)


def replace_directory(new, target):
    """Moves the complete folder `new` to `target`, replacing what was there."""
    old = target.rstrip("/") + ".old"
    shutil.rmtree(old, ignore_errors=True)
    if os.path.exists(target):
        os.replace(target, old)
    os.replace(new, target)
    shutil.rmtree(old, ignore_errors=True)
