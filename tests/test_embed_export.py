"""Sentence embeddings (models/embed.py, `lmkern embed`) against mean pooling of
transformers' BertModel on the same weights, and `lmkern export` of GPT, Llama and BERT
checkpoints read back by transformers' from_pretrained and AutoTokenizer. Tiny random
models; nothing downloaded."""

import dataclasses
import io
import json

import numpy as np
import pytest
import safetensors.torch
import torch
import transformers
from cli_runs import lmkern, one_line_error, snapshot, write_corpus
from numerics import assert_close_to_truth
from test_bert import TINY, randomise, transformers_config

from lmkern.models import gpt, llama
from lmkern.models.bert import BertConfig, BertForPreTraining, BertModel
from lmkern.models.checkpoint import save_checkpoint
from lmkern.models.embed import embed
from lmkern.models.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

pytestmark = pytest.mark.usefixtures("one_thread")

TEXTS = ["the cat sees the ball.", "a dog", "", "my friend reads a book and writes a letter to the teacher.",
         " ".join(["the kernel moves the tensor"] * 12)]  # the last is longer than max_position (32)


@pytest.fixture(scope="module")
def tokenizers(tmp_path_factory):
    """{"wordpiece": folder, "bpe": folder} of tokenizers trained on the test corpus."""
    root = tmp_path_factory.mktemp("tokenizers")
    text = (write_corpus(root / "text") + "/corpus.txt")
    lines = open(text, encoding="utf-8").read().split("\n\n")
    folders = {}
    for kind, vocab in (("wordpiece", 110), ("bpe", 300)):
        save_tokenizer(train_tokenizer(lines, kind, vocab), root / kind)
        folders[kind] = root / kind
    return folders


def their_embeddings(model, tokenizer, texts, max_length):
    """Mean pooling of a transformers BertModel's outputs over the real tokens, texts padded in one batch."""
    tokenizer = load_tokenizer_copy(tokenizer)
    tokenizer.enable_truncation(max_length)
    encodings = tokenizer.encode_batch(texts)
    length = max(len(e.ids) for e in encodings)
    ids = torch.tensor([e.ids + [0] * (length - len(e.ids)) for e in encodings])
    mask = torch.tensor([[1] * len(e.ids) + [0] * (length - len(e.ids)) for e in encodings])
    hidden = model(input_ids=ids, attention_mask=mask).last_hidden_state
    weights = mask.to(hidden.dtype).unsqueeze(-1)
    return (hidden * weights).sum(1) / weights.sum(1)


def load_tokenizer_copy(tokenizer):
    return tokenizer.__class__.from_str(tokenizer.to_str())


def their_bert(seed=0):
    theirs = transformers.BertModel(transformers_config(BertConfig(**TINY)), add_pooling_layer=False)
    return randomise(theirs, torch.Generator().manual_seed(seed)).eval()


@pytest.mark.parametrize("kernels", ["torch", "native"])
def test_embeddings_are_mean_pooling_of_transformers_outputs(tokenizers, kernels):
    tokenizer = load_tokenizer(tokenizers["wordpiece"])
    theirs = their_bert()
    with pytest.warns(UserWarning, match="pooler"):
        ours = BertModel.from_hf(theirs.state_dict(), BertConfig(**TINY, kernels=kernels))
    result = embed(ours, tokenizer, TEXTS, batch_size=2)  # sorted by length: batches of different padding
    assert result.truncated == 1 and result.vectors.dtype == torch.float32
    with torch.no_grad():
        truth = their_embeddings(theirs.double(), tokenizer, TEXTS, 32)
        baseline = their_embeddings(theirs.float(), tokenizer, TEXTS, 32)
    assert_close_to_truth(result.vectors, truth, baseline)
    normalised = embed(ours, tokenizer, TEXTS, batch_size=3, normalize=True).vectors
    torch.testing.assert_close(normalised, torch.nn.functional.normalize(result.vectors, dim=-1))
    with pytest.raises(ValueError, match=r"max_length must be in \[2, 32\]"):
        embed(ours, tokenizer, TEXTS, max_length=33)


def write_hf_bert(folder, tokenizer_folder, vocab_txt):
    """A Hugging Face BERT directory by save_pretrained, with the tokenizer as tokenizer.json or vocab.txt."""
    their_bert().save_pretrained(folder)
    tokenizer = load_tokenizer(tokenizer_folder)
    if vocab_txt:
        vocab = sorted(tokenizer.get_vocab().items(), key=lambda item: item[1])
        (folder / "vocab.txt").write_text("".join(f"{token}\n" for token, _ in vocab), encoding="utf-8")
    else:
        save_tokenizer(tokenizer, folder)
    return tokenizer


@pytest.mark.parametrize("vocab_txt", [False, True], ids=["tokenizer.json", "vocab.txt"])
def test_embed_command_on_a_hugging_face_directory(tmp_path, tokenizers, capsys, vocab_txt):
    tokenizer = write_hf_bert(tmp_path / "hf", tokenizers["wordpiece"], vocab_txt)
    (tmp_path / "texts.txt").write_text("\n".join(TEXTS) + "\n", encoding="utf-8")
    assert lmkern("embed", "--model", tmp_path / "hf", "--input", tmp_path / "texts.txt",
                  "--output", tmp_path / "out.npy", "--batch-size", 2, "--device", "cpu") == 0
    assert "1 of 5 texts were longer than 32 tokens" in capsys.readouterr().err
    with pytest.warns(UserWarning, match="pooler"):
        expected = embed(BertModel.from_hf(tmp_path / "hf"), tokenizer, TEXTS).vectors
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "out.npy")), expected)


def test_embed_command_reads_csv_jsonl_stdin_and_writes_safetensors(tmp_path, tokenizers, capsys, monkeypatch):
    tokenizer = load_tokenizer(tokenizers["wordpiece"])
    model = randomise(BertForPreTraining(BertConfig(**TINY)), torch.Generator().manual_seed(2))
    save_checkpoint(str(tmp_path / "run"), 1, model, {}, kind="bert", config=dataclasses.asdict(model.config),
                    tokenizer_dir=str(tokenizers["wordpiece"]), keep=1)
    expected = embed(model, tokenizer, TEXTS, normalize=True).vectors
    (tmp_path / "texts.csv").write_text("id,body\n" + "".join(f'{i},"{t}"\n' for i, t in enumerate(TEXTS)))
    (tmp_path / "texts.jsonl").write_text("".join(json.dumps({"body": t}) + "\n" for t in TEXTS))
    for source in ("texts.csv", "texts.jsonl"):
        output = tmp_path / f"{source}.safetensors"
        assert lmkern("embed", "--model", tmp_path / "run", "--input", tmp_path / source, "--text-column", "body",
                      "--output", output, "--normalize", "--device", "cpu", "--kernels", "torch") == 0
        torch.testing.assert_close(safetensors.torch.load_file(output)["embeddings"], expected)
    monkeypatch.setattr("sys.stdin", io.StringIO("\n".join(TEXTS) + "\n"))
    assert lmkern("embed", "--model", tmp_path / "run", "--input", "-", "--output", tmp_path / "stdin.npy",
                  "--normalize", "--device", "cpu") == 0
    torch.testing.assert_close(torch.from_numpy(np.load(tmp_path / "stdin.npy")), expected)
    capsys.readouterr()
    before = snapshot(tmp_path)
    error = one_line_error(capsys, lmkern("embed", "--model", tmp_path / "run", "--input", tmp_path / "texts.csv",
                                          "--output", tmp_path / "texts.csv.safetensors", "--text-column", "body"))
    assert "exists: choose another name, or pass --overwrite" in error
    error = one_line_error(capsys, lmkern("embed", "--model", tmp_path / "run", "--input", tmp_path / "texts.csv",
                                          "--output", tmp_path / "new.npy"))
    assert "--text-column text: not a column of --input" in error
    error = one_line_error(capsys, lmkern("embed", "--model", tmp_path / "run", "--input", tmp_path / "texts.csv",
                                          "--output", tmp_path / "new.txt"))
    assert "--output" in error and ".npy or .safetensors" in error
    error = one_line_error(capsys, lmkern("embed", "--model", tmp_path, "--input", tmp_path / "texts.csv",
                                          "--output", tmp_path / "new.npy", "--text-column", "body"))
    assert "neither an lmkern checkpoint or run folder nor a Hugging Face BERT directory" in error
    assert snapshot(tmp_path) == before


# -- export ---------------------------------------------------------------------------------------

MODELS = {
    "gpt": (lambda vocab: gpt.GPT(gpt.GPTConfig(vocab_size=vocab, context_length=32, n_layer=2, n_head=2, n_embd=32)),
            "bpe", transformers.AutoModelForCausalLM),
    "llama": (lambda vocab: llama.Llama(llama.LlamaConfig(vocab_size=vocab, context_length=32, n_layer=2, n_head=4,
                                                          n_kv_head=2, hidden_size=32, intermediate_size=48)),
              "bpe", transformers.AutoModelForCausalLM),
    "bert": (lambda vocab: BertForPreTraining(BertConfig(**{**TINY, "vocab_size": vocab})), "wordpiece",
             transformers.BertForPreTraining),
}


@pytest.mark.parametrize("kind", MODELS)
def test_export_gives_what_transformers_loads(tmp_path, tokenizers, capsys, kind):
    make, tokenizer_kind, their_class = MODELS[kind]
    tokenizer = load_tokenizer(tokenizers[tokenizer_kind])
    ours = randomise(make(tokenizer.get_vocab_size()), torch.Generator().manual_seed(3)).eval()
    save_checkpoint(str(tmp_path / "run"), 5, ours, {}, kind=kind, config=dataclasses.asdict(ours.config),
                    tokenizer_dir=str(tokenizers[tokenizer_kind]), keep=1)
    assert lmkern("export", "--checkpoint", tmp_path / "run", "--hf", tmp_path / "hf") == 0
    theirs = their_class.from_pretrained(tmp_path / "hf", attn_implementation="eager").eval()
    text = "The cat sees the ball. A dog reads a book."
    their_tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert their_tokenizer(text)["input_ids"] == tokenizer.encode(text).ids
    ids = torch.tensor([tokenizer.encode(text).ids])
    with torch.no_grad():
        if kind == "bert":
            torch.testing.assert_close(ours(ids, return_logits=True).mlm_logits, theirs(ids).prediction_logits[0])
            assert their_tokenizer.cls_token == "[CLS]" and their_tokenizer.mask_token == "[MASK]"
        else:
            torch.testing.assert_close(ours(ids, return_logits=True).logits, theirs(ids).logits)
            assert their_tokenizer.eos_token == "<|endoftext|>"
    # Its folder is its own: written again in place; another's is refused without --overwrite.
    assert lmkern("export", "--checkpoint", tmp_path / "run", "--hf", tmp_path / "hf") == 0
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("mine")
    capsys.readouterr()
    error = one_line_error(capsys, lmkern("export", "--checkpoint", tmp_path / "run", "--hf", tmp_path / "mine"))
    assert "--hf" in error and "holds other files (notes.txt)" in error and "--overwrite" in error
    assert lmkern("export", "--checkpoint", tmp_path / "run", "--hf", tmp_path / "mine", "--overwrite") == 0
    assert (tmp_path / "mine" / "notes.txt").read_text() == "mine"


def test_export_names_a_kind_it_cannot_export(tmp_path, tokenizers, capsys):
    model = BertForPreTraining(BertConfig(**TINY))
    save_checkpoint(str(tmp_path / "run"), 1, model, {}, kind="xlnet", config=dataclasses.asdict(model.config),
                    tokenizer_dir=str(tokenizers["wordpiece"]), keep=1)
    error = one_line_error(capsys, lmkern("export", "--checkpoint", tmp_path / "run", "--hf", tmp_path / "hf"))
    assert "model 'xlnet' is neither of gpt, llama, bert, t5" in error
    albert = BertForPreTraining(BertConfig(**TINY, share_layers=True))
    save_checkpoint(str(tmp_path / "albert"), 1, albert, {}, kind="bert", config=dataclasses.asdict(albert.config),
                    tokenizer_dir=str(tokenizers["wordpiece"]), keep=1)
    error = one_line_error(capsys, lmkern("export", "--checkpoint", tmp_path / "albert", "--hf", tmp_path / "hf"))
    assert "has no Hugging Face BERT form" in error
    assert not (tmp_path / "hf").exists()
