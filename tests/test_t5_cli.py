"""T5 on the command line: a T5 tokenizer, `lmkern train t5` (span corruption) with exact
resume, `lmkern eval`, `lmkern finetune t5` on text-to-text pairs from an lmkern checkpoint
and from the Hugging Face directory `lmkern export` writes, `lmkern generate` with the
fine-tuned model, and bad input said with the flags. Models are tiny and runs a few steps
long."""

import json

import pytest
import safetensors.torch
import torch

from cli_runs import SMALL_RUN, lmkern, one_line_error, write_corpus
from lmkern.app.models import load_model
from lmkern.models import tasks
from lmkern.models.generation import stream_text
from lmkern.models.tokenizer import load_tokenizer
from lmkern.models.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

T5_RUN = (*SMALL_RUN, "--width", 64, "--heads", 2, "--steps", 8, "--eval-every", 4, "--checkpoint-every", 4,
          "--kernels", "auto", "--dropout", 0.1)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """A data folder prepared with a T5 tokenizer of 20 sentinels."""
    root = tmp_path_factory.mktemp("t5")
    text = write_corpus(root / "text", documents=120)
    assert lmkern("tokenizer", "train", "--data", text, "--kind", "t5", "--vocab-size", 320, "--sentinels", 20,
                  "--out", root / "tokenizer") == 0
    assert lmkern("prepare", "--data", text, "--tokenizer", root / "tokenizer", "--out", root / "data",
                  "--val-fraction", 0.1, "--quiet") == 0
    return str(root / "data")


@pytest.fixture(scope="module")
def t5_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "t5"
    assert lmkern("train", "t5", "--data", prepared, "--out", out, *T5_RUN) == 0
    return out


@pytest.fixture(scope="module")
def pairs(tmp_path_factory):
    """A JSONL file of (input, target) pairs: a sentence's subject is its target."""
    path = tmp_path_factory.mktemp("pairs") / "pairs.jsonl"
    subjects, verbs = ["the cat", "a dog", "the model", "my friend"], ["sees", "likes", "reads", "keeps"]
    rows = [{"input": f"{subject} {verb} the ball", "target": subject} for subject in subjects for verb in verbs]
    path.write_text("".join(json.dumps(row) + "\n" for row in rows * 2))
    return path


def weights(run):
    return safetensors.torch.load_file(str(run / "checkpoint" / "model.safetensors"))


def test_train_learns_evaluates_and_resumes_exactly(prepared, t5_run, tmp_path, monkeypatch, capsys):
    rows = read_metrics(str(t5_run))
    assert rows[-1]["loss"] < rows[1]["loss"], [row.get("loss") for row in rows]
    assert {"val_loss", "val_accuracy"} <= set(rows[-1]) and rows[-1]["val_loss"] < rows[0]["val_loss"]
    saved = json.loads((t5_run / "checkpoint" / "config.json").read_text())
    assert saved["model"] == "t5" and saved["config"]["d_model"] == 64 and saved["config"]["d_kv"] == 32
    batch = tasks.SpanCorruptionTask.batch

    def interrupted(self, step, part, parts):
        if step == 6:
            raise KeyboardInterrupt
        return batch(self, step, part, parts)

    monkeypatch.setattr(tasks.SpanCorruptionTask, "batch", interrupted)
    assert lmkern("train", "t5", "--data", prepared, "--out", tmp_path / "crashed", *T5_RUN) == 130
    monkeypatch.setattr(tasks.SpanCorruptionTask, "batch", batch)
    assert lmkern("train", "t5", "--out", tmp_path / "crashed", "--resume", "--quiet") == 0
    timeless = lambda rows: [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows]  # noqa: E731
    assert timeless(read_metrics(str(tmp_path / "crashed"))) == timeless(rows)
    straight, resumed = weights(t5_run), weights(tmp_path / "crashed")
    assert all(torch.equal(straight[name], resumed[name]) for name in straight)
    capsys.readouterr()
    assert lmkern("eval", "--checkpoint", t5_run, "--data", prepared, "--context-length", 32, "--max-tokens", 512,
                  "--json", "--quiet", "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["loss"] == pytest.approx(rows[-1]["val_loss"],
                                                                                         rel=1e-5)


def test_training_under_bf16_autocast_on_cpu(prepared, tmp_path):
    """--precision bf16: the path a GPU run takes by default, here on CPU."""
    assert lmkern("train", "t5", "--data", prepared, "--out", tmp_path / "run", *T5_RUN, "--precision", "bf16",
                  "--steps", 6) == 0
    losses = [row["loss"] for row in read_metrics(str(tmp_path / "run"))[1:]]
    assert losses[-1] < losses[0], losses


def test_finetune_from_a_checkpoint_then_generate(t5_run, pairs, tmp_path, capsys):
    run = tmp_path / "tuned"
    assert lmkern("finetune", "t5", "--init", t5_run, "--train", pairs, "--epochs", 3, "--batch-size", 8, "--lr",
                  3e-3, "--max-target-length", 8, "--out", run, "--device", "cpu", "--quiet") == 0
    result = json.loads((run / "eval.json").read_text())
    assert result["metric"] == "exact_match" and 0 <= result["exact_match"] <= 1
    assert result["examples"] == {"train": 29, "validation": 3}  # a tenth held out
    rows = read_metrics(str(run))
    assert rows[-1]["val_loss"] < rows[0]["val_loss"]
    _, model, folder = load_model(str(run), "auto", "cpu")
    tokenizer = load_tokenizer(folder)
    expected = model.generate(torch.tensor([tokenizer.encode("a dog sees the ball").ids]), 6)[0].tolist()
    capsys.readouterr()
    assert lmkern("generate", "--checkpoint", run, "--prompt", "a dog sees the ball", "--greedy",
                  "--max-new-tokens", 6, "--device", "cpu") == 0
    assert capsys.readouterr().out == tokenizer.decode(expected) + "\n"  # streamed, the same text
    held_back = model.generate(torch.tensor([tokenizer.encode("a dog sees the ball").ids]), 6, min_new_tokens=4)
    assert held_back[0].tolist() != expected  # its answer ends sooner
    assert lmkern("generate", "--checkpoint", run, "--prompt", "a dog sees the ball", "--greedy",
                  "--max-new-tokens", 6, "--min-new-tokens", 4, "--device", "cpu") == 0
    # Its last tokens are bytes of a character that never completes: the stream holds them
    # back (a full decode shows U+FFFD), as GPT's streams do.
    assert capsys.readouterr().out == "".join(stream_text(tokenizer, held_back[0].tolist())) + "\n"


def test_finetune_from_the_exported_hugging_face_directory(t5_run, pairs, tmp_path):
    transformers = pytest.importorskip("transformers")
    assert lmkern("export", "--checkpoint", t5_run, "--hf", tmp_path / "hf") == 0
    theirs = transformers.AutoModelForSeq2SeqLM.from_pretrained(tmp_path / "hf")
    assert type(theirs).__name__ == "T5ForConditionalGeneration"
    tokenizer = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")
    assert tokenizer.eos_token_id == 1 and tokenizer.pad_token_id == 0
    assert tokenizer.convert_tokens_to_ids("<extra_id_0>") == len(tokenizer) - 1
    assert lmkern("finetune", "t5", "--init", tmp_path / "hf", "--train", pairs, "--validation", pairs, "--epochs", 1,
                  "--batch-size", 16, "--max-target-length", 4, "--out", tmp_path / "run", "--device", "cpu",
                  "--quiet") == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["examples"] == {"train": 32, "validation": 32}


@pytest.mark.parametrize("argv, message", [
    (["tokenizer", "train", "--data", "{text}", "--kind", "t5", "--vocab-size", 300, "--out", "{tmp}/t"],
     "--vocab-size must be at least 358 for --kind t5"),
    (["train", "t5", "--data", "{data}", "--preset", "tiny", "--context-length", 2, "--out", "{tmp}/r"],
     "input_length must be at least 3"),
    (["finetune", "t5", "--init", "{data}", "--train", "{pairs}", "--out", "{tmp}/r"],
     "neither an lmkern checkpoint or run folder nor a Hugging Face model directory"),
    (["finetune", "t5", "--init", "{run}", "--train", "{pairs}", "--input-column", "text", "--out", "{tmp}/r"],
     "--input-column 'text' is not a column of --train"),
    (["finetune", "t5", "--init", "{run}", "--train", "{pairs}", "--regression", "--out", "{tmp}/r"],
     "--regression does not apply to T5"),
    (["generate", "--checkpoint", "{run}", "--prompt", "a dog", "--ignore-eos"], "a T5 answers a prompt"),
])
def test_bad_input_is_a_one_line_error(prepared, t5_run, pairs, tmp_path, capsys, argv, message):
    places = dict(text=str(pairs), data=prepared, pairs=str(pairs), run=str(t5_run), tmp=str(tmp_path))
    argv = [str(a).format(**places) for a in argv]
    assert message.format(**places) in one_line_error(capsys, lmkern(*argv))
