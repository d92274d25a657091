"""GPT and BERT for the commands: built from a run's options, or loaded from a checkpoint."""

import os

from lmkern.app.common import check_kernels, option

MODELS = ("gpt", "bert")


def model_classes(kind):
    """(module, pretraining model class) of "gpt" or "bert"."""
    if kind == "gpt":
        from lmkern.models import gpt

        return gpt, gpt.GPT
    from lmkern.models import bert

    return bert, bert.BertForPreTraining


def build_model(kind, options, vocab_size):
    """A freshly initialised model from a run's options (preset, its overrides, kernels)
    for a vocabulary of vocab_size."""
    module, model_class = model_classes(kind)
    overrides = {"vocab_size": vocab_size, "kernels": options["kernels"]}
    for name, field in (("dropout", "dropout"), ("layers", "n_layer"), ("heads", "n_head")):
        if options[name] is not None:
            overrides[field] = options[name]
    if options["width"] is not None and kind == "gpt":
        overrides["n_embd"] = options["width"]
    elif options["width"] is not None:
        overrides.update(hidden_size=options["width"], intermediate_size=4 * options["width"])  # BERT's ratio
    if options["context_length"] is not None:
        if kind == "gpt":
            overrides["context_length"] = options["context_length"]
        else:  # BERT trains on shorter sequences than it can take; it must take these
            preset_positions = module.PRESETS.get(options["preset"], {}).get("max_position", 512)
            overrides["max_position"] = max(preset_positions, options["context_length"])
    try:
        config = module.preset(options["preset"], **overrides)
    except ValueError as error:
        raise ValueError(f"--preset {options['preset']}: {error}") from None
    return model_class(config)


def load_model(path, kernels, device):
    """(kind, model in eval mode on device, checkpoint folder) of the checkpoint at path (a
    checkpoint folder, or a run folder: its newest complete checkpoint)."""
    from lmkern.models.checkpoint import CONFIG, find_checkpoint, load_config, load_weights

    with option("--checkpoint"):
        folder = find_checkpoint(path)
        kind, saved = load_config(folder)
    if kind not in MODELS:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: model {kind!r} is neither of {', '.join(MODELS)}")
    module, model_class = model_classes(kind)
    config_class = module.GPTConfig if kind == "gpt" else module.BertConfig
    try:
        config = config_class(**{**saved, "kernels": kernels})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG)} is corrupted: {error}") from None
    check_kernels(kernels, device)
    model = model_class(config)
    load_weights(folder, model)
    return kind, model.to(device).eval(), folder


def check_same_tokenizer(data, checkpoint, vocab_size):
    """Raises unless `data` (TokenData) was prepared with the checkpoint's tokenizer."""
    from lmkern.models.checkpoint import verified
    from lmkern.models.tokenizer import FILE_NAME

    if data.meta["vocab_size"] != vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer {os.path.join(checkpoint, FILE_NAME)} has {vocab_size} tokens, but --data "
            f"{data.directory} was prepared with one of {data.meta['vocab_size']} "
            f"({os.path.join(data.directory, FILE_NAME)})"
        )
    verified(checkpoint, FILE_NAME)
    data.check_tokenizer(checkpoint)
