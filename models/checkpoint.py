"""Checkpoints: a folder with

    model.safetensors   the weights (tied weights stored once)
    config.json         {"model": "gpt" | "bert", "config": the model's config}
    tokenizer.json      the tokenizer the model was trained with
    state.pt            step, optimizer, schedule and RNG states (training checkpoints only)

written under a temporary name and renamed, so that a crash never leaves a broken one.
"""

import json
import os
import shutil

import safetensors
import safetensors.torch
import torch

from lmkern.models.files import new_directory
from lmkern.models.tokenizer import FILE_NAME as TOKENIZER_FILE

WEIGHTS, CONFIG, STATE = "model.safetensors", "config.json", "state.pt"


def save_checkpoint(directory, model, kind, config, tokenizer_dir, state=None):
    """Writes model (its weights), kind and config (a dict), the tokenizer and `state`."""
    with new_directory(directory) as folder:
        safetensors.torch.save_model(model, os.path.join(folder, WEIGHTS))
        with open(os.path.join(folder, CONFIG), "w") as file:
            json.dump({"model": kind, "config": config}, file, indent=1)
        shutil.copy(os.path.join(tokenizer_dir, TOKENIZER_FILE), os.path.join(folder, TOKENIZER_FILE))
        if state is not None:
            torch.save(state, os.path.join(folder, STATE))


def _path(directory, name):
    path = os.path.join(directory, name)
    if not os.path.isfile(path):
        raise FileNotFoundError(f"--checkpoint {directory}: no {name} (is it a folder written by `lmkern train`?)")
    return path


def load_config(directory):
    """(kind, config dict) of a checkpoint."""
    with open(_path(directory, CONFIG)) as file:
        try:
            saved = json.load(file)
            return saved["model"], saved["config"]
        except (json.JSONDecodeError, KeyError, TypeError) as error:
            raise ValueError(f"{os.path.join(directory, CONFIG)} is corrupted: {error}") from None


def load_weights(directory, model):
    """Loads the checkpoint's weights into model (same architecture and sizes)."""
    path = _path(directory, WEIGHTS)
    try:
        missing, unexpected = safetensors.torch.load_model(model, path, strict=False)
    except (safetensors.SafetensorError, OSError) as error:
        raise ValueError(f"{path} is corrupted or incomplete: {error}") from None
    except RuntimeError as error:  # shapes that do not match the model
        raise ValueError(f"{path} does not fit the model: {error}") from None
    if missing or unexpected:
        raise ValueError(f"{path} does not fit the model: missing {sorted(missing)}, unexpected {sorted(unexpected)}")


def load_state(directory):
    """The training state saved with the checkpoint."""
    path = _path(directory, STATE)
    try:
        return torch.load(path, weights_only=True)
    except Exception as error:  # torch.load raises many kinds for a damaged file
        raise ValueError(f"{path} is corrupted or incomplete: {error}") from None
