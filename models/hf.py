"""Hugging Face checkpoints without transformers: a local model directory (config.json with
model.safetensors or pytorch_model.bin) read and written, and a checkpoint's tensors
matched to the ones a model needs, naming every key that is missing, unexpected or of the
wrong shape. Each model maps its own names and config to Hugging Face's in a file of its
own (models/gpt_hf.py, models/bert_hf.py)."""

import dataclasses
import json
import os

import torch

CONFIG, SAFETENSORS, PYTORCH_BIN = "config.json", "model.safetensors", "pytorch_model.bin"


def checkpoint_and_config(source, config, overrides, config_class, fields_from_json, fields_from_state, what):
    """(state dict, config) for a model's from_hf(source, config, **overrides). source: a
    state dict, or a local model directory (read offline). The config is `config` with the
    overrides, else a config_class of the fields that fields_from_json finds in the
    directory's config.json (as a dict), else of those fields_from_state finds in the state
    dict, the overrides over either. what: as for read_directory."""
    hf_config = None
    if isinstance(source, (str, os.PathLike)):
        source, hf_config = read_directory(source, what)
    if config is not None:
        return source, dataclasses.replace(config, **overrides)
    fields = fields_from_json(hf_config) if hf_config is not None else fields_from_state(source)
    return source, config_class(**{**fields, **overrides})


def read_directory(directory, what):
    """(state dict, config dict) of a Hugging Face model directory, read offline on the CPU.
    what: the kind of model expected there, for the error messages ("BERT", say)."""
    config_path = os.path.join(directory, CONFIG)
    if not os.path.isfile(config_path):
        raise FileNotFoundError(f"{directory}: no {CONFIG} (a Hugging Face {what} directory has one)")
    with open(config_path) as file:
        config = json.load(file)
    if os.path.isfile(os.path.join(directory, SAFETENSORS)):
        import safetensors.torch

        return safetensors.torch.load_file(os.path.join(directory, SAFETENSORS)), config
    if os.path.isfile(os.path.join(directory, PYTORCH_BIN)):
        return torch.load(os.path.join(directory, PYTORCH_BIN), map_location="cpu", weights_only=True), config
    raise FileNotFoundError(f"{directory}: neither {SAFETENSORS} nor {PYTORCH_BIN}")


def write_directory(directory, state, config, tied=()):
    """Writes config (a dict) as config.json and state (name -> tensor; no two may overlap
    in memory, disjoint views of one tensor may) as model.safetensors into directory, made
    if needed, without the names in `tied` (tied copies, which save_pretrained leaves out
    too)."""
    import safetensors.torch

    os.makedirs(directory, exist_ok=True)
    with open(os.path.join(directory, CONFIG), "w") as file:
        json.dump(config, file, indent=2)
    tensors = {name: tensor.detach().contiguous().cpu() for name, tensor in state.items() if name not in tied}
    safetensors.torch.save_file(tensors, os.path.join(directory, SAFETENSORS), metadata={"format": "pt"})


def take_tensors(checkpoint, expected, optional=(), ignored=(), what="the checkpoint"):
    """The tensors of checkpoint (name -> tensor) named in expected (name -> tensor of the
    wanted shape), after checking that none is missing, that each has its expected shape,
    and that checkpoint holds nothing else but `optional` names (taken when present) and
    names starting with one of `ignored`. Raises ValueError naming every offending key."""
    missing = [name for name in expected if name not in checkpoint and name not in optional]
    unexpected = [name for name in checkpoint if name not in expected and not name.startswith(tuple(ignored))]
    misshapen = [
        f"{name} {tuple(checkpoint[name].shape)} (expected {tuple(expected[name].shape)})"
        for name in expected
        if name in checkpoint and checkpoint[name].shape != expected[name].shape
    ]
    problems = [f"{label}: {', '.join(names)}" for label, names in
                (("missing", missing), ("unexpected", unexpected), ("wrong shape", misshapen)) if names]
    if problems:
        raise ValueError(f"{what} does not fit the model; " + "; ".join(problems))
    return {name: checkpoint[name] for name in expected if name in checkpoint}
