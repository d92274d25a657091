"""GPT, Llama, BERT and T5 for the commands: their classes, and a model loaded from a
checkpoint (also a BERT classifier from `lmkern finetune bert`)."""

import os

from lmkern.app.common import check_kernels

MODELS = ("gpt", "llama", "bert", "t5")
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
    if kind == "t5":
        from lmkern.models import t5

        return t5, t5.T5, t5.T5Config
    from lmkern.models import bert

    return bert, bert.BertForSequenceClassification if kind == CLASSIFIER else bert.BertForPreTraining, bert.BertConfig


def is_checkpoint(path):
    """Whether path is an lmkern checkpoint folder or a run folder holding one (a Hugging
    Face model directory is neither)."""
    from lmkern.models.checkpoint import MANIFEST, newest_checkpoint

    return os.path.isfile(os.path.join(path, MANIFEST)) or newest_checkpoint(path) is not None


def checkpoint_model(folder, kinds=(*MODELS, CLASSIFIER), **overrides):
    """(kind, model) of the checkpoint folder, whose kind must be one of `kinds`, its
    config's fields overridden (kernels, dropout), weights loaded and checked."""
    from lmkern.models.checkpoint import CONFIG, load_config, load_json, load_weights

    kind, saved = load_config(folder)
    if kind not in kinds:
        raise ValueError(f"{os.path.join(folder, CONFIG)}: model {kind!r} is neither of {', '.join(kinds)}")
    _, model_class, config_class = model_classes(kind)
    try:
        config = config_class(**{**saved, **overrides})
    except (TypeError, ValueError) as error:
        raise ValueError(f"{os.path.join(folder, CONFIG)} is corrupted: {error}") from None
    heads = dict(num_labels=max(1, len(load_json(folder, LABELS)["labels"]))) if kind == CLASSIFIER else {}
    model = model_class(config, **heads)
    load_weights(folder, model)
    return kind, model


def load_model(path, kernels, device, kinds=MODELS):
    """(kind, model in eval mode on device, checkpoint folder) of the checkpoint at path (a
    checkpoint folder, or a run folder: its newest complete checkpoint), whose kind must be
    one of `kinds`."""
    from lmkern.models.checkpoint import find_checkpoint

    folder = find_checkpoint(path)
    check_kernels(kernels, device)
    kind, model = checkpoint_model(folder, kinds, kernels=kernels)
    return kind, model.to(device).eval(), folder


def tokenizer_folder(source):
    """The folder of the model and tokenizer.json of --init `source`: a checkpoint folder (a
    run folder's newest), or the Hugging Face directory itself."""
    from lmkern.models.checkpoint import find_checkpoint

    return find_checkpoint(source) if is_checkpoint(source) else source


def initial_model(source, kind, **overrides):
    """(model, folder of its tokenizer.json) to fine-tune from --init `source`: an lmkern
    checkpoint or run folder of a `kind` model, or a Hugging Face model directory of that
    kind (offline: config.json and weights, with the tokenizer.json the data must be
    prepared with). overrides: config fields (kernels, dropout)."""
    from lmkern.models import hf
    from lmkern.models.errors import ArgumentPathError

    if is_checkpoint(source):
        folder = tokenizer_folder(source)
        saved_kind, model = checkpoint_model(folder, **overrides)
        if saved_kind != kind:
            raise ValueError(f"--init {folder} holds a {saved_kind} model, not {kind}")
        return model, folder
    if not os.path.isfile(os.path.join(source, hf.CONFIG)):
        raise ArgumentPathError("{init} {}: neither an lmkern checkpoint or run folder nor a Hugging Face model "
                                "directory (with {})", source, hf.CONFIG)
    _, model_class, _ = model_classes(kind)
    try:
        return model_class.from_hf(source, **overrides), source
    except (KeyError, ValueError) as error:  # a config.json or weights of another model
        raise ValueError(f"--init {source}: not a Hugging Face {kind} model that lmkern builds: {error}") from None


def check_same_tokenizer(data, folder, vocab_size):
    """Raises unless `data` (TokenData) was prepared with the tokenizer.json of folder (a
    checkpoint's, checked against its manifest, or a Hugging Face directory's) for a model
    of vocab_size embedding rows, which may be more than the tokenizer has tokens (some
    Hugging Face models pad them)."""
    from lmkern.models.checkpoint import MANIFEST, verified
    from lmkern.models.tokenizer import FILE_NAME, load_tokenizer

    path = os.path.join(folder, FILE_NAME)
    if os.path.isfile(os.path.join(folder, MANIFEST)):
        verified(folder, FILE_NAME)
    elif not os.path.isfile(path):
        raise ValueError(f"{folder} has no {FILE_NAME}: the model's tokenizer is needed to check that --data "
                         f"{data.data_dir} was prepared with it")
    tokens = load_tokenizer(folder).get_vocab_size()
    if data.meta["vocab_size"] != tokens:
        raise ValueError(
            f"the checkpoint's tokenizer {path} has {tokens} tokens, but --data {data.data_dir} was prepared with "
            f"one of {data.meta['vocab_size']} ({os.path.join(data.data_dir, FILE_NAME)})"
        )
    if tokens > vocab_size:
        raise ValueError(f"the tokenizer {path} has {tokens} tokens, more than the {vocab_size} embeddings of the "
                         "model it came with")
    data.check_tokenizer(folder)
