"""End to end on real text, no downloads: which package of Python's standard library a
docstring comes from (asyncio, email, importlib, logging, tkinter, xml; models/corpus.py's
docstring_task), learned by a tiny BERT pretrained with `lmkern train bert` on the
standard library's docs (without the validation docstrings), then fine-tuned with
`lmkern finetune bert`; `lmkern predict` then labels the validation file.

    python -m scripts.finetune_docstrings --out runs/docstrings [--quick] [--results DIR]

prints each lmkern command as it runs it and, at the end, the fine-tuned accuracy beside
the majority-class baseline (and beside the same fine-tuning from a randomly initialised
BERT, which shows what pretraining gave). --results DIR gets finetune.json, finetune.md
and the fine-tuning's loss.png. --quick: a smaller task, model and run, without the
comparison (CI's, tests/test_finetune.py).
"""

import argparse
import datetime
import json
import os
import platform
import shlex
import shutil
import subprocess
import sys
import time

import torch

from lmkern import cli
from lmkern.models.corpus import write_docstring_task

FULL = dict(per_package=200, vocab=4096, layers=2, pretrain_steps=400, seq_length=128, epochs=10, max_length=128,
            lr=1e-3, patience=3)
# A tiny model's loss stays flat for its first twenty steps or so: no early stopping.
QUICK = dict(per_package=40, vocab=600, layers=1, pretrain_steps=20, seq_length=64, epochs=16, max_length=64, lr=2e-3,
             patience=0)


def lmkern(*argv):
    """Runs an lmkern command in this process, printed first; raises if it fails."""
    argv = [str(a) for a in argv]
    print("$ lmkern " + shlex.join(argv), flush=True)
    began = time.perf_counter()
    status = cli.main(argv)
    if status:
        raise SystemExit(f"lmkern {argv[0]} failed (exit status {status})")
    return time.perf_counter() - began


def run(out, quick=False):
    """Runs the whole task in the folder `out` (made; it must not hold an earlier run);
    returns the result (a dict, as finetune.json)."""
    size = QUICK if quick else FULL
    out = os.path.abspath(out)
    commands, seconds = [], {}

    def step(name, *argv):
        # As recorded, the run's folder reads OUT: no path of the machine that ran it.
        commands.append("lmkern " + shlex.join(str(a) for a in argv).replace(out, "OUT"))
        seconds[name] = round(lmkern(*argv), 1)

    task_dir = os.path.join(out, "task")
    task = write_docstring_task(task_dir, per_package=size["per_package"])
    step("tokenizer", "tokenizer", "train", "--data", f"{task_dir}/corpus", "--kind", "wordpiece", "--vocab-size",
         size["vocab"], "--out", f"{out}/tokenizer")
    step("prepare", "prepare", "--data", f"{task_dir}/corpus", "--tokenizer", f"{out}/tokenizer", "--out",
         f"{out}/data", "--quiet")
    step("pretrain", "train", "bert", "--data", f"{out}/data", "--preset", "tiny", "--layers", size["layers"],
         "--seq-length", size["seq_length"], "--steps", size["pretrain_steps"], "--batch-size", 16,
         "--micro-batch-size", 16, "--lr", 1e-3, "--warmup", max(1, size["pretrain_steps"] // 10), "--eval-every",
         max(1, size["pretrain_steps"] // 4), "--eval-tokens", 4096, "--out", f"{out}/pretrain", "--quiet")
    tune = ("--train", f"{task_dir}/train.csv", "--validation", f"{task_dir}/val.csv", "--epochs", size["epochs"],
            "--batch-size", 32, "--lr", size["lr"], "--max-length", size["max_length"], "--patience",
            size["patience"], "--quiet")
    step("finetune", "finetune", "bert", "--init", f"{out}/pretrain", *tune, "--out", f"{out}/finetune")
    step("predict", "predict", "--checkpoint", f"{out}/finetune", "--input", f"{task_dir}/val.csv", "--output",
         f"{out}/predictions.csv", "--quiet")
    with open(os.path.join(out, "finetune", "eval.json")) as file:
        pretrained = json.load(file)
    untrained = None
    if not quick:  # the same fine-tuning from a BERT of the same shape that was never pretrained:
        scratch = os.path.join(out, "untrained")  # the pretrained checkpoint's weights re-drawn, its tokenizer kept
        shutil.copytree(os.path.join(out, "pretrain", "checkpoint"), scratch)
        redraw_weights(scratch)
        step("finetune_untrained", "finetune", "bert", "--init", scratch, *tune, "--out", f"{out}/finetune-untrained")
        with open(os.path.join(out, "finetune-untrained", "eval.json")) as file:
            untrained = json.load(file)
    return {
        "task": "which standard-library package a docstring comes from (models/corpus.py: docstring_task)",
        "classes": pretrained["labels"], "examples": {name: len(examples) for name, examples in task.items()},
        "accuracy": pretrained["accuracy"], "macro_f1": pretrained["macro_f1"],
        "majority_baseline": pretrained["majority_baseline"], "best_step": pretrained["step"],
        "confusion": pretrained["confusion"],
        "untrained_init": untrained and {"accuracy": untrained["accuracy"], "macro_f1": untrained["macro_f1"]},
        "seconds": seconds, "commands": commands, "quick": quick,
        "date": datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "python": platform.python_version(), "torch": torch.__version__, "commit": commit(),
        "device": device_name(),
    }


def redraw_weights(folder):
    """Replaces the weights of the checkpoint in folder by a fresh initialisation of its model
    (seed 0), and its manifest's record of them."""
    from lmkern.app.models import load_model
    from lmkern.models.checkpoint import MANIFEST, WEIGHTS, describe_file, write_weights

    _, model, _ = load_model(folder, "torch", "cpu")
    torch.manual_seed(0)
    write_weights(type(model)(model.config), os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, MANIFEST)) as file:
        manifest = json.load(file)
    manifest["files"][WEIGHTS] = describe_file(os.path.join(folder, WEIGHTS))
    with open(os.path.join(folder, MANIFEST), "w") as file:
        json.dump(manifest, file, indent=1)


def commit():
    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return None


def device_name():
    from benchmarks.harness import device_name as name

    return name("cpu")


def markdown(result):
    """The result as a short markdown page."""
    names, untrained = result["classes"], result["untrained_init"]
    lines = [
        "# Fine-tuning a tiny BERT: which standard-library package a docstring comes from", "",
        f"{result['date']}, {result['device']}, Python {result['python']}, torch {result['torch']}, commit "
        f"{result['commit']}. {result['examples']['train']} training and {result['examples']['val']} validation "
        f"docstrings, {len(names)} classes ({', '.join(names)}).", "",
        "| fine-tuned from | validation accuracy | macro-F1 |", "|---|---|---|",
        f"| BERT pretrained with `lmkern train bert` | {result['accuracy']:.1%} | {result['macro_f1']:.3f} |",
        *([f"| the same BERT, never pretrained | {untrained['accuracy']:.1%} | {untrained['macro_f1']:.3f} |"]
          if untrained else []),
        f"| majority-class baseline | {result['majority_baseline']:.1%} | |", "",
        "Confusion matrix (rows: true package, columns: predicted):", "",
        "| | " + " | ".join(names) + " |", "|---" * (len(names) + 1) + "|",
        *(f"| {name} | " + " | ".join(map(str, row)) + " |" for name, row in zip(names, result["confusion"])), "",
        "Seconds per command: " + ", ".join(f"{name} {value}" for name, value in result["seconds"].items()) + ".", "",
        "Commands (after `python -m scripts.finetune_docstrings --out OUT` wrote the task and its corpus):", "",
        "```sh",
        *result["commands"], "```", "",
    ]
    return "\n".join(lines)


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", required=True, help="a new folder for the run's files")
    parser.add_argument("--quick", action="store_true", help="a smaller corpus, model and run (seconds)")
    parser.add_argument("--results", help="a folder for finetune.json, finetune.md and loss.png")
    args = parser.parse_args(argv)
    if os.path.exists(args.out) and os.listdir(args.out):
        parser.error(f"--out {args.out} is not empty: give a new folder")
    torch.set_num_threads(min(torch.get_num_threads(), 2))
    result = run(args.out, args.quick)
    untrained = result["untrained_init"]
    print(f"accuracy {result['accuracy']:.1%} (macro-F1 {result['macro_f1']:.3f})"
          + (f"; never pretrained {untrained['accuracy']:.1%}" if untrained else "")
          + f"; majority baseline {result['majority_baseline']:.1%}")
    if args.results:
        os.makedirs(args.results, exist_ok=True)
        with open(os.path.join(args.results, "finetune.json"), "w") as file:
            json.dump(result, file, indent=1)
        with open(os.path.join(args.results, "finetune.md"), "w") as file:
            file.write(markdown(result))
        shutil.copyfile(os.path.join(args.out, "finetune", "loss.png"), os.path.join(args.results, "loss.png"))


if __name__ == "__main__":
    sys.exit(main())
