"""The command line with a careless or unlucky user: no command destroys a file that is not
its own (each command that takes --out, pointed at a folder of other files, at its own
input, at `.` and at a parent of its input), one run per folder, a diverging run, a kill
between the stages of a checkpoint save, the operating system's errors (read-only, no
permission, a full disk), damaged or swapped files, options saved as absolute paths, and
`lmkern --version`. Each failure is a one-line error, exit status 2."""

import errno
import json
import os
import shutil
import subprocess
import sys

import pytest
import safetensors.torch
import torch

from cli_runs import SMALL_RUN, lmkern, one_line_error, snapshot, train_run, write_corpus
from lmkern.models import checkpoint, files
from lmkern.models.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

USER_FILES = {"notes.doc": "my notes", ".ssh/id_rsa": "secret key", "Documents/thesis.tex": "\\chapter{One}",
              "data/labels.csv": "id,label\n1,cat\n"}


@pytest.fixture(scope="module")
def home(tmp_path_factory):
    """A user's folder: texts, a tokenizer and data prepared from them, and files of their own."""
    home = tmp_path_factory.mktemp("home")
    write_corpus(home / "texts", documents=120)
    for name, content in USER_FILES.items():
        (home / name).parent.mkdir(parents=True, exist_ok=True)
        (home / name).write_text(content)
    assert lmkern("tokenizer", "train", "--data", home / "texts", "--kind", "bpe", "--vocab-size", 300,
                  "--out", home / "tok") == 0
    assert lmkern("prepare", "--data", home / "texts", "--tokenizer", home / "tok", "--out", home / "prepared",
                  "--val-fraction", 0.1, "--quiet") == 0
    return home


def command_line(command, home, out):
    """The arguments of `command` with its inputs in home, writing to out; and its input."""
    return {
        "tokenizer train": (["tokenizer", "train", "--data", home / "texts", "--kind", "bpe", "--vocab-size", 300,
                             "--out", out], home / "texts"),
        "prepare": (["prepare", "--data", home / "texts", "--tokenizer", home / "tok", "--out", out, "--quiet"],
                    home / "texts"),
        "train": (["train", "gpt", "--data", home / "prepared", *SMALL_RUN, "--steps", 2, "--out", out],
                  home / "prepared"),
        "demo": (["demo", "--quick", "--data", home / "texts", "--out", out, "--quiet", "--device", "cpu"],
                 home / "texts"),
    }[command]


COMMANDS = ["tokenizer train", "prepare", "train", "demo"]


# -- output folders: the destructive cases --------------------------------------------------------


@pytest.mark.parametrize("command", COMMANDS)
@pytest.mark.parametrize("case", ["other files", "its input", "the working folder", "a parent of its input"])
def test_no_command_writes_into_a_users_folder_or_its_input(home, monkeypatch, capsys, command, case):
    monkeypatch.chdir(home / "Documents")
    _, source = command_line(command, home, None)
    out = {"other files": home / "Documents", "its input": source, "the working folder": ".",
           "a parent of its input": home}[case]
    argv, _ = command_line(command, home, out)
    before = snapshot(home)
    error = one_line_error(capsys, lmkern(*argv))
    expected = {"other files": "holds other files (thesis.tex)", "the working folder": "holds other files (thesis.tex)",
                "its input": f"is the input --data {source}",
                "a parent of its input": "contains the input --data"}[case]
    assert f"--out {out} " in error and expected in error, error
    assert snapshot(home) == before  # nothing removed, changed or added, not even a lock file


@pytest.mark.parametrize("command, own_files", [
    ("tokenizer train", {".lmkern.lock", "tokenizer.json"}),
    ("prepare", {".lmkern.lock", "meta.json", "tokenizer.json", "train.bin", "train.docs.npy", "val.bin",
                 "val.docs.npy"}),
    ("train", {".lmkern.lock", "checkpoints", "loss.png", "metrics.jsonl", "options.json"}),
])
def test_overwrite_writes_the_commands_own_files_and_removes_nothing(home, tmp_path, command, own_files):
    out = tmp_path / "Documents"
    shutil.copytree(home / "Documents", out)
    (out / "meta.json.bak").write_text("a file of the user's beside lmkern's")
    before = snapshot(out)
    argv, _ = command_line(command, home, out)
    assert lmkern(*argv, "--overwrite") == 0
    after = snapshot(out)
    assert {name: after[name] for name in before} == before
    assert {name.split(os.sep)[0] for name in set(after) - set(before)} == own_files


def test_a_lmkern_folder_is_its_commands_own(home, tmp_path, capsys):
    argv, _ = command_line("prepare", home, tmp_path / "data")
    assert lmkern(*argv) == 0 and lmkern(*argv) == 0  # made by prepare: prepare may write there again
    argv, _ = command_line("tokenizer train", home, tmp_path / "data")
    assert "was made by `lmkern prepare`" in one_line_error(capsys, lmkern(*argv))  # but no other command


# -- one run per folder ---------------------------------------------------------------------------

HOLD_LOCK = """
import importlib.util, sys
spec = importlib.util.spec_from_file_location("files", sys.argv[1])
files = importlib.util.module_from_spec(spec)
spec.loader.exec_module(files)
lock = files.lock_folder(sys.argv[2])
print("locked", flush=True)
sys.stdin.read()
"""


def test_a_second_run_into_a_folder_stops_naming_the_process_writing_there(home, tmp_path, capsys):
    out = tmp_path / "run"
    out.mkdir()
    # Another process holds the folder's lock as a running command does (models/files.py alone: no torch to load).
    holder = subprocess.Popen([sys.executable, "-c", HOLD_LOCK, files.__file__, str(out)], stdin=subprocess.PIPE,
                              stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "locked\n"
        error = one_line_error(capsys, train_run("gpt", home / "prepared", out, "--steps", 2))
        assert f"--out {out} is in use by another lmkern command, process {holder.pid}" in error
        assert os.listdir(out) == [".lmkern.lock"]
    finally:
        holder.stdin.close()
        holder.wait()
    assert train_run("gpt", home / "prepared", out, "--steps", 2) == 0  # the lock went with its process


# -- divergence -----------------------------------------------------------------------------------


def test_a_diverging_run_stops_in_one_line_and_keeps_its_good_checkpoint(home, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_run("gpt", home / "prepared", out, "--steps", 4, "--checkpoint-every", 2) == 0
    good = (out / "checkpoints" / "step-00000004" / "model.safetensors").read_bytes()
    error = one_line_error(capsys, lmkern("train", "gpt", "--out", out, "--resume", "--steps", 8, "--lr", 1e6,
                                          "--quiet"))
    # Step 5's loss was computed before its update, which step 6's loss shows to have diverged.
    assert "training diverged at step 6: the loss" in error, error
    assert f"the last checkpoint, of step 4, holds the weights before it ({out}/checkpoints/step-00000004)" in error
    assert (out / "checkpoint" / "model.safetensors").read_bytes() == good
    with open(out / "metrics.jsonl") as file:
        rows = [json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in metrics.jsonl")) for line in file]
    assert rows[-1]["step"] == 6 and rows[-1]["skipped"] is True
    assert lmkern("eval", "--checkpoint", out, "--data", home / "prepared", "--quiet", "--device", "cpu") == 0


def test_eval_and_generate_refuse_non_finite_weights(home, tmp_path, capsys):
    assert train_run("gpt", home / "prepared", tmp_path / "run", "--steps", 1) == 0
    folder = tmp_path / "nan"
    shutil.copytree(tmp_path / "run" / "checkpoint", folder)
    weights = safetensors.torch.load_file(folder / "model.safetensors")
    name = sorted(weights)[0]
    weights[name].view(-1)[5] = float("nan")  # as a checkpoint saved by a tool that does not check could have
    safetensors.torch.save_file(weights, folder / "model.safetensors")
    manifest = json.loads((folder / "manifest.json").read_text())
    manifest["files"]["model.safetensors"] = checkpoint.describe_file(str(folder / "model.safetensors"))
    (folder / "manifest.json").write_text(json.dumps(manifest))
    for argv in (["eval", "--data", home / "prepared"], ["generate", "--prompt", "The"]):
        error = one_line_error(capsys, lmkern(*argv, "--checkpoint", folder, "--device", "cpu"))
        assert f"model.safetensors holds non-finite weights ({name})" in error


# -- crashes: a kill mid-save, damaged and swapped files ------------------------------------------


class Killed(BaseException):
    """Stands for a kill: no handler catches it and nothing cleans up after it."""


@pytest.mark.parametrize("stage", ["wrote the manifest", "made the checkpoint visible"])
def test_after_a_kill_mid_save_a_plain_run_refuses_and_resume_continues(home, tmp_path, monkeypatch, capsys, stage):
    save_stages = checkpoint.save_stages

    def killed_after(run_dir, step, *args, **kwargs):
        for name in save_stages(run_dir, step, *args, **kwargs):
            yield name
            if step == 4 and name == stage:
                raise Killed(name)

    out = tmp_path / "run"
    monkeypatch.setattr(checkpoint, "save_stages", killed_after)
    with pytest.raises(Killed):
        train_run("gpt", home / "prepared", out, "--steps", 6, "--checkpoint-every", 2)
    monkeypatch.setattr(checkpoint, "save_stages", save_stages)
    newest = 4 if stage == "made the checkpoint visible" else 2
    assert checkpoint.newest_checkpoint(str(out)).endswith(f"step-{newest:08d}")
    before = snapshot(out)
    error = one_line_error(capsys, train_run("gpt", home / "prepared", out, "--steps", 6, "--checkpoint-every", 2))
    assert f"--out {out} already holds a run: --resume it" in error
    assert snapshot(out) == before
    assert lmkern("train", "gpt", "--out", out, "--resume", "--quiet") == 0
    assert [row["step"] for row in read_metrics(str(out))] == list(range(7))
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000002", "step-00000004", "step-00000006"]


def flip_bytes(path):
    """Changes 4 bytes near the end of the file (inside a weights file's tensor data)."""
    with open(path, "r+b") as file:
        file.seek(os.path.getsize(path) - 16)
        file.write(b"\x7f\xc0\x00\x00")


def test_damaged_or_swapped_checkpoint_files_are_refused(home, tmp_path, capsys):
    assert train_run("gpt", home / "prepared", tmp_path / "run", "--steps", 1) == 0
    flipped, swapped = tmp_path / "flipped", tmp_path / "swapped"
    shutil.copytree(tmp_path / "run" / "checkpoint", flipped)
    flip_bytes(flipped / "model.safetensors")
    shutil.copytree(tmp_path / "run" / "checkpoint", swapped)
    assert lmkern("tokenizer", "train", "--data", home / "texts", "--kind", "bpe", "--vocab-size", 310, "--out",
                  tmp_path / "other") == 0
    shutil.copyfile(tmp_path / "other" / "tokenizer.json", swapped / "tokenizer.json")
    capsys.readouterr()
    error = one_line_error(capsys, lmkern("eval", "--checkpoint", flipped, "--data", home / "prepared", "--device",
                                          "cpu"))
    assert "model.safetensors is not the file this checkpoint saved" in error
    error = one_line_error(capsys, lmkern("generate", "--checkpoint", swapped, "--prompt", "The", "--device", "cpu"))
    assert f"{swapped}/tokenizer.json is not the file this checkpoint saved" in error


def test_a_failed_resume_leaves_the_runs_options_as_they_were(home, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_run("gpt", home / "prepared", out, "--steps", 2) == 0
    options = (out / "options.json").read_bytes()
    flip_bytes(out / "checkpoint" / "model.safetensors")
    error = one_line_error(capsys, lmkern("train", "gpt", "--out", out, "--resume", "--steps", 4, "--lr", 1e-3,
                                          "--quiet"))
    assert "model.safetensors is not the file this checkpoint saved" in error
    assert (out / "options.json").read_bytes() == options


def test_resume_survives_a_metrics_line_cut_short_and_names_a_damaged_one(home, tmp_path, capsys):
    out = tmp_path / "run"
    assert train_run("gpt", home / "prepared", out, "--steps", 2) == 0
    metrics = out / "metrics.jsonl"
    lines = metrics.read_text().splitlines(keepends=True)
    metrics.write_text("".join(lines) + lines[-1][:20])  # a kill while a row was written
    assert lmkern("train", "gpt", "--out", out, "--resume", "--steps", 3, "--quiet") == 0
    assert [row["step"] for row in read_metrics(str(out))] == [0, 1, 2, 3]
    metrics.write_text(metrics.read_text().replace('"step": 1,', '"step": 1'))
    error = one_line_error(capsys, lmkern("train", "gpt", "--out", out, "--resume", "--steps", 4, "--quiet"))
    assert f"{metrics}, line 2: not a metrics row" in error


# -- the operating system's errors ------------------------------------------------------------------


@pytest.mark.parametrize("code", [errno.EROFS, errno.EACCES])
def test_an_unwritable_out_is_a_one_line_error_before_any_work(home, tmp_path, monkeypatch, capsys, code):
    out = tmp_path / "readonly"
    out.mkdir()
    if os.geteuid() == 0:  # root writes through chmod: the file system's refusal is simulated
        real_open = os.open

        def refusing_open(path, *args, **kwargs):
            if str(path).startswith(str(out)):
                raise OSError(code, os.strerror(code), str(path))
            return real_open(path, *args, **kwargs)

        monkeypatch.setattr(os, "open", refusing_open)
    else:
        out.chmod(0o555)
    monkeypatch.setattr("lmkern.models.tokenizer.train_tokenizer", lambda *args: pytest.fail("trained anyway"))
    argv, _ = command_line("tokenizer train", home, out)
    error = one_line_error(capsys, lmkern(*argv))
    assert error == f"lmkern tokenizer train: error: {out}/.lmkern.lock: {os.strerror(code)}"


def test_no_room_for_a_checkpoint_stops_before_training(home, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(files.shutil, "disk_usage", lambda path: shutil._ntuple_diskusage(10**9, 10**9 - 5000, 5000))
    error = one_line_error(capsys, train_run("gpt", home / "prepared", tmp_path / "run", "--steps", 2))
    assert f"error: {tmp_path / 'run'}: a checkpoint needs " in error and "MB free, there are 0.0 MB" in error
    assert not (tmp_path / "run").exists()  # claimed, then given back: nothing was written


def test_a_checkpoint_the_disk_could_not_hold_is_an_error_and_the_run_resumes(home, tmp_path, monkeypatch, capsys):
    save_model = safetensors.torch.save_model

    def filling_the_disk(model, path, **kwargs):  # as safetensors does on a full disk: a short file, no error
        save_model(model, path, **kwargs)
        if "step-00000004" in path:
            os.truncate(path, os.path.getsize(path) // 2)

    monkeypatch.setattr(checkpoint.safetensors.torch, "save_model", filling_the_disk)
    out = tmp_path / "run"
    error = one_line_error(capsys, train_run("gpt", home / "prepared", out, "--steps", 4, "--checkpoint-every", 2))
    assert "step-00000004.partial/model.safetensors: the weights were not written whole" in error, error
    monkeypatch.setattr(checkpoint.safetensors.torch, "save_model", save_model)
    assert checkpoint.newest_checkpoint(str(out)).endswith("step-00000002")
    assert lmkern("train", "gpt", "--out", out, "--resume", "--quiet") == 0


# -- paths, options, version ----------------------------------------------------------------------


def test_options_keep_absolute_paths_so_resume_works_from_anywhere(home, tmp_path, monkeypatch):
    monkeypatch.chdir(home)
    assert train_run("gpt", "prepared", tmp_path / "run", "--steps", 2) == 0
    assert json.loads((tmp_path / "run" / "options.json").read_text())["data"] == str(home / "prepared")
    monkeypatch.chdir(tmp_path)
    assert lmkern("train", "gpt", "--out", "run", "--resume", "--steps", 3, "--quiet") == 0
    assert read_metrics(str(tmp_path / "run"))[-1]["step"] == 3


def test_version(capsys):
    with pytest.raises(SystemExit) as exit:
        lmkern("--version")
    assert exit.value.code == 0
    assert capsys.readouterr().out == f"lmkern 0.1.0 (torch {torch.__version__})\n"
