"""`lmkern export`: an lmkern checkpoint (GPT, Llama, BERT, T5, ...) as a Hugging Face model
directory that transformers' from_pretrained and AutoTokenizer.from_pretrained load:
config.json and model.safetensors (the model's save_hf), tokenizer.json and a
tokenizer_config.json naming its special tokens."""

import json
import os
import shutil

from lmkern.app.common import CommandError, output_folder
from lmkern.app.models import CLASSIFIER, LABELS, MODELS, load_model

TOKENIZER_CONFIG = "tokenizer_config.json"


def tokenizer_config(tokenizer, max_length):
    """The tokenizer_config.json (a dict) with which transformers' AutoTokenizer loads the
    tokenizer.json of `tokenizer` (a tokenizers.Tokenizer of lmkern's kinds), its special
    tokens named: GPT's <|endoftext|> (beginning, end and unknown text, as GPT-2's), BERT's
    [PAD] [UNK] [CLS] [SEP] [MASK], T5's <pad> </s> and sentinels <extra_id_N>."""
    from lmkern.models.t5_data import T5SpecialIds
    from lmkern.models.tokenizer import BERT_SPECIALS, END_OF_TEXT, T5_SPECIALS, tokenizer_kind

    settings = {"tokenizer_class": "PreTrainedTokenizerFast", "model_max_length": max_length,
                "clean_up_tokenization_spaces": False}
    if tokenizer_kind(tokenizer) == "t5":
        sentinels = [tokenizer.id_to_token(token) for token in T5SpecialIds.of(tokenizer).sentinels.tolist()]
        return {**settings, "pad_token": T5_SPECIALS[0], "eos_token": T5_SPECIALS[1],
                "additional_special_tokens": sentinels}
    if tokenizer_kind(tokenizer) == "bpe":
        if tokenizer.token_to_id(END_OF_TEXT) is not None:
            settings.update(bos_token=END_OF_TEXT, eos_token=END_OF_TEXT, unk_token=END_OF_TEXT)
        return settings
    roles = dict(zip(("pad_token", "unk_token", "cls_token", "sep_token", "mask_token"), BERT_SPECIALS))
    settings.update({role: token for role, token in roles.items() if tokenizer.token_to_id(token) is not None})
    return {**settings, "do_lower_case": True}


def export(args):
    from lmkern.models import hf
    from lmkern.models.checkpoint import find_checkpoint, load_checkpoint_tokenizer, load_json
    from lmkern.models.files import write_json
    from lmkern.models.tokenizer import FILE_NAME

    folder = find_checkpoint(args.checkpoint)
    kind, model, _ = load_model(folder, "torch", "cpu", kinds=(*MODELS, CLASSIFIER))
    # A classifier's classes keep their names (its labels.json) in config.json's id2label.
    names = dict(label_names=load_json(folder, LABELS)["labels"] or None) if kind == CLASSIFIER else {}
    if not hasattr(model, "save_hf"):
        raise CommandError(f"--checkpoint {folder} holds a {kind} model, which has no Hugging Face form to export")
    tokenizer = load_checkpoint_tokenizer(folder)  # checked against the manifest
    # T5's relative positions set no limit; transformers' T5 tokenizers say 512.
    max_length = getattr(model.config, "context_length", None) or getattr(model.config, "max_position", 512)
    claim = output_folder(args.hf, "lmkern export", inputs=[("--checkpoint", folder)], overwrite=args.overwrite,
                          flag="--hf")
    with claim:
        try:
            model.save_hf(args.hf, **names)
        except ValueError as error:  # a model Hugging Face's classes cannot hold (ALBERT's options, say)
            raise CommandError(f"--checkpoint {folder}: {error}") from None
        shutil.copyfile(os.path.join(folder, FILE_NAME), os.path.join(args.hf, FILE_NAME))
        write_json(os.path.join(args.hf, TOKENIZER_CONFIG), tokenizer_config(tokenizer, max_length))
    with open(os.path.join(args.hf, hf.CONFIG)) as file:
        architecture = json.load(file)["architectures"][0]
    print(f"exported the {kind} checkpoint {folder} to {args.hf} ({architecture}, with its tokenizer)")


def add_parser(commands):
    parser = commands.add_parser(
        "export", help="an lmkern checkpoint as a Hugging Face model directory (from_pretrained, AutoTokenizer)",
        description="Writes a GPT, Llama, BERT or T5 checkpoint as a directory that transformers' from_pretrained "
        "loads (config.json, model.safetensors: GPT2LMHeadModel, LlamaForCausalLM / MistralForCausalLM / "
        "Qwen2ForCausalLM, BertForPreTraining, T5ForConditionalGeneration) with its tokenizer (tokenizer.json, "
        "tokenizer_config.json) for AutoTokenizer.from_pretrained.",
    )
    parser.add_argument("--checkpoint", required=True, metavar="DIR",
                        help="a checkpoint folder, or a run's --out (its newest checkpoint)")
    parser.add_argument("--hf", required=True, metavar="DIR", help="the Hugging Face directory to write")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a --hf folder that holds other files (replacing files of the same names; "
                        "nothing else is removed)")
    parser.set_defaults(run=export, flags={"path": "--checkpoint"})
