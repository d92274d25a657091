"""File helpers that keep a user's files safe.

lmkern writes only its own files, and each one whole: a file is written under a temporary
name, made durable (fsync) and renamed over its target in one atomic step, so that a crash
at any instant leaves the old version or the new one, never a mix; it removes nothing it
did not write. The folders it makes carry a marker (MARKER: which command made them), and
a lock file (LOCK) keeps two runs out of one folder.
"""

import contextlib
import errno
import fcntl
import hashlib
import json
import math
import os
import shutil

MARKER = ".lmkern"  # {"made_by": "lmkern prepare"}, in each folder an lmkern command made
LOCK = ".lmkern.lock"  # flock'ed by the process writing the folder, which writes its id into it


def file_sha256(path):
    digest = hashlib.sha256()
    with open(path, "rb") as file:
        for block in iter(lambda: file.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def sync(path):
    """Makes a file's contents, or a folder's entries (its renames), durable."""
    descriptor = os.open(path, os.O_RDONLY)
    try:
        os.fsync(descriptor)
    finally:
        os.close(descriptor)


def default_file_mode():
    """The mode open() gives new files here (0o666 less the umask), for files that a
    library creates with another mode (safetensors makes its files private)."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


@contextlib.contextmanager
def atomic_file(path, mode="w", **open_args):
    """Yields a file open for writing that replaces `path` only once it is complete and
    durable (it is written as `path`.partial, which is removed if the block raises)."""
    partial = f"{path}.partial"
    try:
        with open(partial, mode, **open_args) as file:
            yield file
            file.flush()
            os.fsync(file.fileno())
    except BaseException:
        with contextlib.suppress(OSError):
            os.remove(partial)
        raise
    os.replace(partial, path)
    sync(os.path.dirname(os.path.abspath(path)))


def standard_json(value):
    """value with every non-finite float (NaN, infinities), in lists and dicts too, as
    None: what standard JSON can hold (json.dumps would write NaN, which parsers reject)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {name: standard_json(item) for name, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [standard_json(item) for item in value]
    return value


def write_json(path, value):
    """Writes value as standard JSON (standard_json) to path, atomically (atomic_file)."""
    with atomic_file(path) as file:
        json.dump(standard_json(value), file, indent=1, allow_nan=False)


@contextlib.contextmanager
def staged_files(folder, last):
    """Yields a fresh temporary folder inside `folder` in which to write a set of files;
    when the block ends they move into `folder`, each replacing the file of its name and
    nothing else. `last`, the file that says the set is complete, is removed first and
    moved in last, so that a crash in between leaves an incomplete set, never a mix of two.
    The temporary folder is removed whether the block succeeds or raises."""
    staging = os.path.join(folder, ".lmkern.partial")
    shutil.rmtree(staging, ignore_errors=True)  # left by a crash: nothing else writes this name
    os.makedirs(staging)
    try:
        yield staging
        names = sorted(os.listdir(staging), key=lambda name: name == last)
        for name in names:
            sync(os.path.join(staging, name))
        with contextlib.suppress(FileNotFoundError):
            os.remove(os.path.join(folder, last))
        for name in names:
            os.replace(os.path.join(staging, name), os.path.join(folder, name))
        sync(folder)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


def overlap(path, other):
    """How two paths relate, symbolic links resolved: "same" file or folder, `path` a folder
    that "contains" `other`, `path` "inside" the folder `other`, or None."""
    path, other = os.path.realpath(path), os.path.realpath(other)
    if path == other:
        return "same"
    if other.startswith(os.path.join(path, "")):
        return "contains"
    if path.startswith(os.path.join(other, "")):
        return "inside"
    return None


def folder_maker(path):
    """The command that made the folder at path (its marker's), or None for a folder without
    a readable marker."""
    try:
        with open(os.path.join(path, MARKER)) as file:
            return json.load(file)["made_by"]
    except (OSError, ValueError, KeyError, TypeError):
        return None


def make_folder(path, maker):
    """Creates the folder at path (and its parents) with a marker saying that `maker` made
    it; an existing folder is left as it is. Returns path."""
    if not os.path.isdir(path):
        os.makedirs(path)
        write_json(os.path.join(path, MARKER), {"made_by": maker})
    return path


class FolderLocked(Exception):
    """Another process holds the folder's lock."""

    def __init__(self, path, holder):
        super().__init__(f"{path} is in use by process {holder} (it holds {os.path.join(path, LOCK)})")
        self.path, self.holder = path, holder


def lock_folder(path):
    """Takes the folder's lock, an exclusive flock on path/LOCK, which the returned file holds
    until it is closed (or the process ends, however it ends); writes this process's id
    into the lock file. Raises FolderLocked naming the process that holds it."""
    descriptor = os.open(os.path.join(path, LOCK), os.O_RDWR | os.O_CREAT, 0o666)
    lock = os.fdopen(descriptor, "r+")
    try:
        fcntl.flock(descriptor, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = lock.read().strip() or "unknown"  # empty while the holder is writing its id
        lock.close()
        raise FolderLocked(path, holder) from None
    lock.truncate()
    lock.write(f"{os.getpid()}\n")
    lock.flush()
    return lock


def check_free_space(folder, needed, purpose):
    """Raises OSError(ENOSPC) naming folder unless its file system has `needed` bytes free
    for `purpose` (e.g. "a checkpoint")."""
    free = shutil.disk_usage(folder).free
    if free < needed:
        raise OSError(errno.ENOSPC, f"{purpose} needs {needed / 1e6:.1f} MB free, there are {free / 1e6:.1f} MB",
                      folder)


def remove_files(folder, names):
    """Removes the named files and folders from `folder` if they are there (lmkern's own)."""
    for name in names:
        path = os.path.join(folder, name)
        if os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path)
        else:
            with contextlib.suppress(FileNotFoundError):
                os.remove(path)
