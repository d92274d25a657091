"""`lmkern finetune gpt|llama` (lmkern/app/finetune_lm.py): continued training of a GPT from
an lmkern run's checkpoint and from a Hugging Face GPT-2 directory made by transformers'
save_pretrained (with its tokenizer), on data prepared with that tokenizer: the loss goes
down, step 0 starts from the given weights (transformers' loss on the same batch), a
fine-tuning interrupted and resumed from its own checkpoints follows the same curve, and
what does not fit is a one-line error."""

import json
import shutil

import pytest
import safetensors.torch
import torch
import torch.nn.functional as F
import transformers
from cli_runs import lmkern, one_line_error, train_run, write_corpus

from lmkern.app.models import load_model
from lmkern.models import tasks
from lmkern.models.checkpoint import newest_checkpoint
from lmkern.models.gpt import GPT, GPTConfig
from lmkern.models.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

FINETUNE = ("--batch-size", 8, "--micro-batch-size", 4, "--lr", 1e-3, "--warmup", 2, "--eval-tokens", 512,
            "--eval-every", 5, "--device", "cpu", "--quiet")


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """(text folder, data folder, run folder) of a tiny GPT trained for 30 steps."""
    root = tmp_path_factory.mktemp("finetune")
    text = write_corpus(root / "text")
    assert lmkern("tokenizer", "train", "--data", text, "--kind", "bpe", "--vocab-size", 320,
                  "--out", root / "tok") == 0
    assert lmkern("prepare", "--data", text, "--tokenizer", root / "tok", "--out", root / "data",
                  "--val-fraction", 0.1, "--quiet") == 0
    assert train_run("gpt", root / "data", root / "run", "--steps", 30, "--eval-every", 10) == 0
    return text, root / "data", root / "run"


def finetune(kind, init, data, out, *options):
    return lmkern("finetune", kind, "--init", init, "--data", data, "--out", out, *FINETUNE, *options)


def test_finetune_from_a_checkpoint_lowers_the_loss_and_resumes_exactly(trained, tmp_path, monkeypatch):
    _, data, run = trained
    options = ("--steps", 10, "--checkpoint-every", 5, "--dropout", 0.1)
    assert finetune("gpt", run, data, tmp_path / "straight", *options) == 0
    rows = read_metrics(str(tmp_path / "straight"))
    pretrained = read_metrics(str(run))
    # Step 0 evaluates the run's last weights: its last evaluation, on the same tokens.
    assert rows[0]["val_loss"] == pytest.approx(pretrained[-1]["val_loss"], rel=1e-5)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    options_json = json.loads((tmp_path / "straight" / "options.json").read_text())
    assert options_json["init"] == str(run) and options_json["preset"] is None
    # Interrupted after its checkpoint of step 5, then resumed without --init (the run
    # remembers it): from its own checkpoint, the same curve and weights.
    batch = tasks.CausalLMTask.batch

    def interrupted(self, step, part, parts):
        if step == 7:
            raise KeyboardInterrupt
        return batch(self, step, part, parts)

    monkeypatch.setattr(tasks.CausalLMTask, "batch", interrupted)
    assert finetune("gpt", run, data, tmp_path / "crashed", *options) == 130
    monkeypatch.setattr(tasks.CausalLMTask, "batch", batch)
    assert lmkern("finetune", "gpt", "--out", tmp_path / "crashed", "--resume", "--quiet") == 0
    untimed = [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in read_metrics(str(tmp_path / "crashed"))]
    assert untimed == [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]
    straight, resumed = (safetensors.torch.load_file(tmp_path / name / "checkpoint" / "model.safetensors")
                         for name in ("straight", "crashed"))
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def first_batch_loss_of_transformers(model, data, context_length):
    """transformers' loss on the first step's batch of a run with FINETUNE's batch sizes (two micro-batches)."""
    task = tasks.CausalLMTask(str(data), context_length, batch_size=8, seed=0)
    losses = []
    with torch.no_grad():
        for part in range(2):
            batch = task.batch(0, part, 2)
            logits = model(input_ids=batch["input_ids"]).logits
            losses.append(F.cross_entropy(logits.flatten(0, 1), batch["targets"].flatten()))
    return torch.stack(losses).mean().item()


def test_finetune_from_a_hugging_face_directory(trained, tmp_path, capsys):
    text, _, run = trained
    # The trained model, written by transformers as a user's GPT-2 would be.
    _, model, folder = load_model(str(run), "torch", "cpu")
    model.save_hf(tmp_path / "ours")
    theirs = transformers.GPT2LMHeadModel.from_pretrained(tmp_path / "ours", attn_implementation="eager").eval()
    theirs.save_pretrained(tmp_path / "gpt2")
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_file=f"{folder}/tokenizer.json",
                                                     eos_token="<|endoftext|>")
    tokenizer.save_pretrained(tmp_path / "gpt2")
    assert lmkern("prepare", "--data", text, "--tokenizer", tmp_path / "gpt2", "--out", tmp_path / "data",
                  "--val-fraction", 0.1, "--quiet") == 0
    assert finetune("gpt", tmp_path / "gpt2", tmp_path / "data", tmp_path / "ft", "--steps", 10) == 0
    rows = [row for row in read_metrics(str(tmp_path / "ft")) if "loss" in row]
    expected = first_batch_loss_of_transformers(theirs, tmp_path / "data", model.config.context_length)
    assert rows[0]["loss"] == pytest.approx(expected, rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]
    assert GPT.from_hf(tmp_path / "gpt2").config.vocab_size == model.config.vocab_size
    # Data prepared with another tokenizer, a preset beside --init, no --init: one-line errors.
    capsys.readouterr()
    error = one_line_error(capsys, finetune("gpt", tmp_path / "gpt2", trained[1], tmp_path / "other", "--steps", 2))
    assert "is not the one" in error and "was prepared with" in error
    error = one_line_error(capsys, finetune("gpt", run, trained[1], tmp_path / "other", "--preset", "tiny"))
    assert "--init gives the model and its sizes: --preset cannot be given with it" in error
    error = one_line_error(capsys, lmkern("finetune", "gpt", "--data", trained[1], "--out", tmp_path / "other"))
    assert "--init is required" in error
    error = one_line_error(capsys, finetune("llama", run, trained[1], tmp_path / "other"))
    assert "holds a gpt model, not llama" in error
    assert not (tmp_path / "other").exists()


def test_a_model_with_more_embeddings_than_tokens_finetunes_and_resumes(trained, tmp_path):
    _, data, _ = trained  # a tokenizer of 320 tokens
    GPT(GPTConfig(vocab_size=384, context_length=32, n_layer=1, n_head=2, n_embd=32)).save_hf(tmp_path / "padded")
    shutil.copyfile(data / "tokenizer.json", tmp_path / "padded" / "tokenizer.json")
    assert finetune("gpt", tmp_path / "padded", data, tmp_path / "ft", "--steps", 2) == 0
    assert lmkern("finetune", "gpt", "--out", tmp_path / "ft", "--resume", "--steps", 3, "--quiet") == 0
    assert newest_checkpoint(str(tmp_path / "ft")).endswith("step-00000003")


def test_finetune_llama_from_its_run_and_from_a_mistral_directory(trained, tmp_path):
    """A Llama trained by `lmkern train llama` fine-tunes from its run (step 0 evaluates its
    last weights); a Mistral directory written by transformers (a sliding window, GQA) with
    the same tokenizer fine-tunes from the loss transformers computes on the first batch."""
    text, data, run = trained
    assert train_run("llama", data, tmp_path / "llama", "--steps", 10, "--eval-every", 10) == 0
    assert finetune("llama", tmp_path / "llama", data, tmp_path / "ft", "--steps", 6) == 0
    rows = read_metrics(str(tmp_path / "ft"))
    assert rows[0]["val_loss"] == pytest.approx(read_metrics(str(tmp_path / "llama"))[-1]["val_loss"], rel=1e-5)
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]

    _, gpt_model, folder = load_model(str(run), "torch", "cpu")
    torch.manual_seed(0)
    config = transformers.MistralConfig(
        vocab_size=gpt_model.config.vocab_size, hidden_size=64, intermediate_size=160, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, max_position_embeddings=64, sliding_window=16,
        bos_token_id=None, eos_token_id=None, pad_token_id=None,
    )
    theirs = transformers.MistralForCausalLM(config).eval()
    theirs.save_pretrained(tmp_path / "mistral")
    shutil.copyfile(f"{folder}/tokenizer.json", tmp_path / "mistral" / "tokenizer.json")
    assert finetune("llama", tmp_path / "mistral", data, tmp_path / "ft-mistral", "--steps", 6,
                    "--context-length", 32) == 0
    rows = [row for row in read_metrics(str(tmp_path / "ft-mistral")) if "loss" in row]
    assert rows[0]["loss"] == pytest.approx(first_batch_loss_of_transformers(theirs, data, 32), rel=1e-5)
    assert rows[-1]["loss"] < rows[0]["loss"]
