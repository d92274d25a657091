"""GPT, Llama and BERT for the commands: their classes, and a model loaded from a checkpoint
(also a BERT classifier from `lmkern finetune bert`)."""

import os

from lmkern.app.common import check_kernels

MODELS = ("gpt", "llama", "bert")
CAUSAL = ("gpt", "llama")  # language models that predict the next token: perplexity, generation
CLASSIFIER = "bert-classifier"  # a BertForSequenceClassification from `lmkern finetune bert`
LABELS = "labels.json"  # a classifier checkpoint's {"labels": class names ([] for regression), ...}


def model_classes(kind):
    """(module, pretraining model class, config class) of one of MODELS (or CLASSIFIER's)."""
    if kind == "gpt":
        from lmkern.models import gpt

        return gpt, gpt.GPT, gpt.GPTConfig
    if kind == "llama":
        from lmkern.models import llama

        return llama, llama.Llama, llama.LlamaConfig
    from lmkern.models import bert

    return bert, bert.BertForSequenceClassification if kind == CLASSIFIER else bert.BertForPreTraining, bert.BertConfig


def load_model(path, kernels, device, kinds=MODELS):
    """(kind, model in eval mode on device, checkpoint folder) of the checkpoint at path (a
    checkpoint folder, or a run folder: its newest complete checkpoint), whose kind must be
    one of `kinds`."""
    from lmkern.models.checkpoint import CONFIG, find_checkpoint, load_config, load_json, load_weights

    folder = find_checkpoint(path)
    kind, saved = load_config(folder)
    if kind not in kinds:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: model {kind!r} is neither of {', '.join(kinds)}")
    _, model_class, config_class = model_classes(kind)
    try:
        config = config_class(**{**saved, "kernels": kernels})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG)} is corrupted: {error}") from None
    check_kernels(kernels, device)
    heads = dict(num_labels=max(1, len(load_json(folder, LABELS)["labels"]))) if kind == CLASSIFIER else {}
    model = model_class(config, **heads)
    load_weights(folder, model)
    return kind, model.to(device).eval(), folder


def check_same_tokenizer(data, checkpoint, vocab_size):
    """Raises unless `data` (TokenData) was prepared with the checkpoint's tokenizer."""
    from lmkern.models.checkpoint import verified
    from lmkern.models.tokenizer import FILE_NAME

    if data.meta["vocab_size"] != vocab_size:
        raise ValueError(
            f"the checkpoint's tokenizer {os.path.join(checkpoint, FILE_NAME)} has {vocab_size} tokens, but --data "
            f"{data.data_dir} was prepared with one of {data.meta['vocab_size']} "
            f"({os.path.join(data.data_dir, FILE_NAME)})"
        )
    verified(checkpoint, FILE_NAME)
    data.check_tokenizer(checkpoint)
