"""What the commands share: running one (its errors as one line), devices and kernels,
options common to several commands, and the output folder a command claims."""

import codecs
import contextlib
import os
import sys

import torch

from lmkern import backend
from lmkern.backend import BackendUnavailableError
from lmkern.models import files
from lmkern.models.errors import NamedError

MODEL_OPS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")  # what GPT and BERT call


class CommandError(Exception):
    """Bad input or an unmet precondition, said in one line that names the option or path
    (lmkern exits with status 2)."""


def run_command(args, command):
    """Runs the parsed command `command` ("tokenizer train", say): args.run(args). Returns
    its exit status: 0; 2 after a one-line error on stderr for bad input, a missing or
    damaged file, a folder in use or the operating system's errors (no space, no
    permission, a read-only file system), naming the option or path — the library's errors
    name its arguments, which args.flags gives as the command's flags; 130 on Ctrl-C,
    saying args.interrupted."""
    try:
        return args.run(args) or 0
    except NamedError as error:  # before ValueError and OSError, which it also is
        message = error.message(args.flags)
    except (CommandError, ValueError, BackendUnavailableError) as error:  # bad input: say what, not where
        message = str(error)
    except OSError as error:
        message = describe(error)
    except KeyboardInterrupt:
        print(f"lmkern {command}: interrupted{f' ({args.interrupted})' if args.interrupted else ''}", file=sys.stderr)
        return 130
    print(f"lmkern {command}: error: {message}", file=sys.stderr)
    return 2


def describe(error):
    """An operating-system error in one line, naming its file: "PATH: No space left on device"."""
    if error.filename is None:
        return str(error)
    paths = f"{error.filename} -> {error.filename2}" if error.filename2 is not None else f"{error.filename}"
    return f"{paths}: {error.strerror or error}"


def default_device():
    return "cuda" if torch.cuda.is_available() else "cpu"


def is_rank_zero():
    return int(os.environ.get("RANK", "0")) == 0


def check_kernels(kernels, device):
    """Raises, saying why, if an explicit --kernels backend cannot run the models' ops on device."""
    if kernels == "auto":
        return
    device_type = torch.device(device).type
    for op in MODEL_OPS:
        reason = backend.unavailable_reason(kernels, op, device_type)
        if reason is not None:
            raise BackendUnavailableError(f"--kernels {kernels} cannot run {op} on {device_type}: {reason}")


def show_progress(args):
    """Whether a command shows a progress bar: not with --quiet, nor when stdout is a log
    file or a pipe (where a bar is thousands of carriage returns)."""
    return not args.quiet and sys.stdout.isatty()


# -- options several commands take ---------------------------------------------------------------


def add_kernels(parser):
    parser.add_argument("--kernels", choices=backend.CHOICES, default="auto",
                        help="the lmkern backend of every op (default auto: the fastest here)")


def add_device(parser):
    parser.add_argument("--device", default=default_device(), help="cpu, cuda, ... (default: %(default)s)")


def add_quiet(parser):
    parser.add_argument("--quiet", action="store_true", help="no progress bar or progress lines")


def add_overwrite(parser, command):
    parser.add_argument("--overwrite", action="store_true",
                        help=f"write into an --out that holds other files: {command} writes its own files there "
                        "(replacing files of the same names) and removes nothing else")


def add_text_options(parser):
    text = parser.add_argument_group("text files")
    text.add_argument("--encoding", default="utf-8", help="the text files' encoding (default %(default)s)")
    text.add_argument("--doc-separator", default="", metavar="LINE",
                      help="a line that ends a document, such as '%%' in fortune files; blank lines then stay "
                      "inside documents (default: a blank line)")
    text.add_argument("--skip-bad-files", action="store_true",
                      help="leave out, and list, files that cannot be read as --encoding text (default: stop)")


def text_format(args):
    """The TextFormat of --encoding, --doc-separator and --skip-bad-files (checked)."""
    from lmkern.models.data import TextFormat

    try:
        codecs.lookup(args.encoding)
    except LookupError:
        raise CommandError(f"--encoding {args.encoding}: no such text encoding (e.g. utf-8, latin-1, cp1252)") from None
    if args.doc_separator != args.doc_separator.strip():
        raise CommandError(f"--doc-separator {args.doc_separator!r}: a separator line is compared without its "
                           "surrounding spaces and line break, so give it without them")
    return TextFormat(args.encoding, args.doc_separator, args.skip_bad_files)


def report_skipped(command, skipped):
    """Lists the files --skip-bad-files left out, on stderr."""
    for path, reason in skipped:
        print(f"{command}: skipped {path}: {reason}", file=sys.stderr)


# -- output folders ---------------------------------------------------------------------------------


@contextlib.contextmanager
def output_folder(path, command, *, inputs=(), overwrite=False, flag="--out"):
    """Claims the folder `path` (--out) for `command` (e.g. "lmkern prepare") while the block
    runs. Refuses a folder that is, holds or lies inside one of `inputs` ((option, path)
    pairs), and a folder holding files that `command` did not make unless `overwrite`: the
    command writes only its own files and never removes anything else. Creates the folder
    if need be, marked as made by `command` (an empty one is marked too), and holds its lock
    (files.lock_folder), so that a second command writing there stops, naming this process.
    If the block fails leaving no more than the marker and lock, those (and a folder it
    created) are removed again."""
    for input_flag, given in inputs:
        relation = files.overlap(path, given)
        if relation is not None:
            verb = {"same": "is", "contains": "contains", "inside": "lies inside"}[relation]
            raise CommandError(f"{flag} {path} {verb} the input {input_flag} {given}: give the output a folder of its "
                               "own")
    if os.path.exists(path) and not os.path.isdir(path):
        raise CommandError(f"{flag} {path} is a file, not a folder")
    created = not os.path.exists(path)
    others = [] if created else sorted(set(os.listdir(path)) - {files.MARKER, files.LOCK})
    maker = None if created else files.folder_maker(path)
    if others and maker != command and not overwrite:
        shown = ", ".join(others[:3]) + (f" and {len(others) - 3} more" if len(others) > 3 else "")
        origin = f"was made by `{maker}`" if maker else "was not made by lmkern"
        raise CommandError(f"{flag} {path} holds other files ({shown}) and {origin}: choose a new or empty folder, or "
                           f"pass --overwrite to let {command} write its own files among them (it removes nothing)")
    os.makedirs(path, exist_ok=True)
    try:
        lock = files.lock_folder(path)
    except files.FolderLocked as error:
        raise CommandError(f"{flag} {path} is in use by another lmkern command, process {error.holder}: wait for it to "
                           f"finish, or choose another {flag}") from None
    with lock:
        marked = not others and maker is None
        if marked:
            files.write_json(os.path.join(path, files.MARKER), {"made_by": command})
        try:
            yield
        except BaseException:
            if marked and set(os.listdir(path)) <= {files.MARKER, files.LOCK}:
                files.remove_files(path, [files.MARKER, files.LOCK])
                if created:
                    os.rmdir(path)
            raise
