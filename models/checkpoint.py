"""Checkpoints of a training run, kept in the run's folder:

    checkpoints/step-00000500/      one complete folder per saved step:
        model.safetensors           the weights (tied weights stored once)
        config.json                 {"model": "gpt" | "bert" | ..., "config": the model's config}
        tokenizer.json              the tokenizer the model was trained with
        labels.json, ...            what else the model needs, as JSON (a classifier's labels)
        state.pt                    the training loop's state: step, optimizer, ...
        manifest.json               each file above with its size and sha256, written last
    checkpoint -> checkpoints/step-00000500    a link to the newest, replaced atomically

A save writes checkpoints/step-N.partial, makes each file durable (fsync), writes the
manifest, renames the folder to step-N — one atomic step: the checkpoint then exists
complete, or not at all — points `checkpoint` at it, and only then removes checkpoints
older than the newest `keep`. A kill at any instant so leaves every earlier checkpoint
intact and the newest complete one findable (newest_checkpoint), and nothing is deleted
before its replacement is durable. Loading checks each file against the manifest, so a
damaged or swapped file is an error rather than a silently wrong model.
"""

import contextlib
import json
import os
import re
import shutil

import safetensors
import safetensors.torch
import torch

from lmkern.models.errors import ArgumentPathError
from lmkern.models.files import check_free_space, default_file_mode, file_sha256, sync
from lmkern.models.tokenizer import FILE_NAME as TOKENIZER_FILE
from lmkern.models.tokenizer import load_tokenizer

WEIGHTS, CONFIG, STATE, MANIFEST = "model.safetensors", "config.json", "state.pt", "manifest.json"
CHECKPOINTS = "checkpoints"  # the run's step folders
LATEST = "checkpoint"  # the run's link to its newest checkpoint
STEP_FOLDER = re.compile(r"step-(\d+)(\.partial|\.old)?")  # .partial: being written; .old: being removed


def step_folder(run_dir, step):
    return os.path.join(run_dir, CHECKPOINTS, f"step-{step:08d}")


def save_checkpoint(run_dir, step, model, state, **contents):
    """Writes the checkpoint of `step` into run_dir (see save_stages for `contents`) and
    returns its folder."""
    for _ in save_stages(run_dir, step, model, state, **contents):
        pass
    return step_folder(run_dir, step)


def save_stages(run_dir, step, model, state, *, kind, config, tokenizer_dir, keep, extras=None):
    """save_checkpoint's work, one durable change to the run folder per iteration: stopping
    the iteration after any of them, as a kill would, leaves a run that resumes from its
    newest complete checkpoint (the tests stop it at every one). Writes model's weights,
    kind and config (a dict), the tokenizer.json of tokenizer_dir (the model's tokenizer: a
    folder of prepared token files holds a copy), the training `state` and `extras` ({file
    name: value written as JSON}), then keeps the newest `keep` checkpoints. Yields what
    each stage did."""
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"not saving the weights of step {step}: {', '.join(bad[:3])} hold non-finite values")
    folder = step_folder(run_dir, step)
    if os.path.exists(folder):
        raise FileExistsError(f"{folder} already exists: a run saves each step once")
    os.makedirs(os.path.dirname(folder), exist_ok=True)
    check_free_space(os.path.dirname(folder), checkpoint_bytes(model, tokenizer_dir), "a checkpoint")
    partial = f"{folder}.partial"
    shutil.rmtree(partial, ignore_errors=True)  # a save of this step that was killed
    os.mkdir(partial)
    yield "made the folder"

    with open(os.path.join(partial, CONFIG), "w") as file:
        json.dump({"model": kind, "config": config}, file, indent=1)
    shutil.copyfile(os.path.join(tokenizer_dir, TOKENIZER_FILE), os.path.join(partial, TOKENIZER_FILE))
    extras = extras or {}
    for name, value in extras.items():
        with open(os.path.join(partial, name), "w") as file:
            json.dump(value, file, indent=1)
    yield "wrote the config and tokenizer"
    write_weights(model, os.path.join(partial, WEIGHTS))
    yield "wrote the weights"
    with open(os.path.join(partial, STATE), "wb") as file:
        torch.save(state, file)  # to a Python file: a full disk raises OSError naming the file
    yield "wrote the training state"
    names = (WEIGHTS, CONFIG, TOKENIZER_FILE, STATE, *extras)
    for name in names:
        sync(os.path.join(partial, name))
    manifest = {"step": step, "files": {name: describe_file(os.path.join(partial, name)) for name in names}}
    with open(os.path.join(partial, MANIFEST), "w") as file:
        json.dump(manifest, file, indent=1)
    sync(os.path.join(partial, MANIFEST))
    sync(partial)
    yield "wrote the manifest"

    os.rename(partial, folder)
    sync(os.path.dirname(folder))
    yield "made the checkpoint visible"
    link = os.path.join(run_dir, LATEST)
    with contextlib.suppress(FileNotFoundError):
        os.remove(f"{link}.partial")  # left by a killed save
    os.symlink(os.path.relpath(folder, run_dir), f"{link}.partial")
    os.replace(f"{link}.partial", link)
    sync(run_dir)
    yield "pointed the link at it"

    for name in removable(run_dir, keep):
        path = os.path.join(run_dir, CHECKPOINTS, name)
        if not name.endswith((".partial", ".old")):  # complete: first make it incomplete, in one step
            os.rename(path, f"{path}.old")
            path = f"{path}.old"
            yield f"retired {name}"
        shutil.rmtree(path)
        yield f"removed {name}"


def removable(run_dir, keep):
    """The entries of run_dir/checkpoints that a save may remove: complete checkpoints older
    than the newest `keep`, and what killed saves and removals left (never anything that is
    not named like a checkpoint)."""
    complete = [os.path.basename(folder) for _, folder in checkpoint_folders(run_dir)]
    leftovers = [name for name in sorted(os.listdir(os.path.join(run_dir, CHECKPOINTS)))
                 if (match := STEP_FOLDER.fullmatch(name)) and match.group(2)]
    return complete[:-keep] + leftovers


def checkpoint_folders(run_dir):
    """[(step, folder)] of the run's complete checkpoints, oldest first."""
    parent = os.path.join(run_dir, CHECKPOINTS)
    if not os.path.isdir(parent):
        return []
    found = []
    for name in os.listdir(parent):
        match = STEP_FOLDER.fullmatch(name)
        if match and not match.group(2) and os.path.isfile(os.path.join(parent, name, MANIFEST)):
            found.append((int(match.group(1)), os.path.join(parent, name)))
    return sorted(found)


def newest_checkpoint(run_dir):
    """The folder of the run's newest complete checkpoint, or None."""
    folders = checkpoint_folders(run_dir)
    return folders[-1][1] if folders else None


def remove_checkpoints(run_dir):
    """Removes the run's checkpoints and its link (for a run started anew), and nothing
    else: the checkpoints folder itself goes only if nothing but checkpoints was in it."""
    parent = os.path.join(run_dir, CHECKPOINTS)
    if os.path.lexists(os.path.join(run_dir, LATEST)):
        os.remove(os.path.join(run_dir, LATEST))
    if os.path.isdir(parent):
        for name in os.listdir(parent):
            if STEP_FOLDER.fullmatch(name):
                shutil.rmtree(os.path.join(parent, name))
        if not os.listdir(parent):
            os.rmdir(parent)


def find_checkpoint(path):
    """The checkpoint at path: a checkpoint folder itself, or a run folder's newest one."""
    if os.path.isfile(os.path.join(path, MANIFEST)):
        return path
    newest = newest_checkpoint(path)
    if newest is not None:
        return newest
    if not os.path.isdir(path):
        raise ArgumentPathError("{path} {}: no such folder", path)
    raise ArgumentPathError("{path} {}: neither a checkpoint folder (with {}) nor a run folder with a complete "
                            "checkpoint in {}/", path, MANIFEST, CHECKPOINTS)


def nonfinite_weights(model):
    """The names of model's floating-point parameters and buffers that hold a NaN or infinity."""
    return [name for name, tensor in model.state_dict().items()
            if tensor.is_floating_point() and not torch.isfinite(tensor).all()]


def checkpoint_bytes(model, tokenizer_dir):
    """About how many bytes a checkpoint of model takes: its weights, AdamW's two fp32
    moments per trainable parameter and the tokenizer (and a megabyte for the rest)."""
    weights = sum(tensor.nbytes for tensor in {t.data_ptr(): t for t in model.state_dict().values()}.values())
    moments = sum(2 * 4 * p.numel() for p in model.parameters() if p.requires_grad)
    return weights + moments + os.path.getsize(os.path.join(tokenizer_dir, TOKENIZER_FILE)) + 2**20


def describe_file(path):
    return {"bytes": os.path.getsize(path), "sha256": file_sha256(path)}


def write_weights(model, path):
    """Writes model's weights to path with safetensors, then opens the file to check that its
    header and data add up: safetensors may not report a write that failed (to a full
    disk). Its errors become OSErrors naming the file, and the file gets the mode open()
    gives (safetensors makes its files private)."""
    try:
        safetensors.torch.save_model(model, path)
        with safetensors.safe_open(path, "pt"):
            pass
    except safetensors.SafetensorError as error:
        raise OSError(f"{path}: the weights were not written whole ({error}); is the disk full?") from None
    os.chmod(path, default_file_mode())


# -- loading ----------------------------------------------------------------------------------


def verified(folder, name):
    """The path of file `name` of the checkpoint in folder, once its size and sha256 match
    the checkpoint's manifest."""
    manifest_path = os.path.join(folder, MANIFEST)
    if not os.path.isfile(manifest_path):
        raise FileNotFoundError(f"{folder}: no {MANIFEST}, so not a complete checkpoint")
    try:
        with open(manifest_path) as file:
            expected = json.load(file)["files"][name]
        size, digest = expected["bytes"], expected["sha256"]
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{manifest_path} is corrupted: {error!r}") from None
    path = os.path.join(folder, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"{path}: missing, though the checkpoint's {MANIFEST} lists it")
    if os.path.getsize(path) != size or file_sha256(path) != digest:
        raise ValueError(f"{path} is not the file this checkpoint saved (its size or sha256 differs from "
                         f"{manifest_path}'s): it was damaged or replaced since")
    return path


def load_config(folder):
    """(kind, config dict) of a checkpoint."""
    saved = load_json(folder, CONFIG)
    try:
        return saved["model"], saved["config"]
    except (KeyError, TypeError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG)} is corrupted: {error!r}") from None


def load_weights(folder, model):
    """Loads the checkpoint's weights into model (same architecture and sizes); refuses
    weights that are not finite."""
    path = verified(folder, WEIGHTS)
    try:
        missing, unexpected = safetensors.torch.load_model(model, path, strict=False)
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path} is corrupted or incomplete: {error}") from None
    except RuntimeError as error:  # shapes that do not match the model
        raise ValueError(f"{path} does not fit the model: {error}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")
    bad = nonfinite_weights(model)
    if bad:
        raise ValueError(f"{path} holds non-finite weights ({', '.join(bad[:3])}{', ...' if len(bad) > 3 else ''}): "
                         f"the run that saved it had diverged")


def load_json(folder, name):
    """The value of the checkpoint's JSON file `name` (one of its save's extras)."""
    path = verified(folder, name)
    with open(path) as file:
        try:
            return json.load(file)
        except json.JSONDecodeError as error:
            raise ValueError(f"{path} is corrupted: {error}") from None


def load_state(folder):
    """The training state saved with the checkpoint."""
    path = verified(folder, STATE)
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a damaged file
        raise ValueError(f"{path} is corrupted or incomplete: {error}") from None


def load_checkpoint_tokenizer(folder):
    """The tokenizer saved with the checkpoint."""
    verified(folder, TOKENIZER_FILE)
    return load_tokenizer(folder)
