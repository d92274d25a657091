"""`lmkern finetune bert` and `lmkern predict`: fine-tuning from an lmkern checkpoint and from a
Hugging Face directory (whose first loss is transformers' BertForSequenceClassification's on
the same examples), classification and regression, sentence pairs, predictions in input
order from files and stdin, the standard-library docstring task end to end (small), and
bad input said in one line naming the flag, with nothing written."""

import csv
import json
import os
import sys

import pytest
import torch

from cli_runs import lmkern, one_line_error, snapshot, train_run, write_corpus
from lmkern.app.models import load_model
from lmkern.models import classify
from lmkern.models.checkpoint import load_checkpoint_tokenizer
from lmkern.models.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")

TINY = ("--device", "cpu", "--quiet")
WORDS = ["the", "cat", "dog", "sees", "likes", "a", "ball", "book", "red", "blue", "big", "small", "runs", "fast"]


def write_table(path, rows, columns=None):
    """Writes rows (dicts) as CSV, TSV or JSONL by path's extension; returns path."""
    if str(path).endswith(".jsonl"):
        path.write_text("".join(json.dumps(row) + "\n" for row in rows))
        return path
    with open(path, "w", newline="") as file:
        writer = csv.DictWriter(file, columns or list(rows[0]), delimiter="\t" if str(path).endswith(".tsv") else ",")
        writer.writeheader()
        writer.writerows(rows)
    return path


def colour_rows(count, seed=0):
    """Sentences labelled by the colour word they hold: a task a tiny model learns in a few steps."""
    draw = torch.Generator().manual_seed(seed)
    rows = []
    for _ in range(count):
        words = [WORDS[int(i)] for i in torch.randint(len(WORDS), (6,), generator=draw)]
        colour = ["red", "blue", "green"][int(torch.randint(3, (), generator=draw))]
        words.insert(int(torch.randint(6, (), generator=draw)), colour)
        rows.append({"text": " ".join(w for w in words if w not in ("red", "blue") or w == colour), "label": colour})
    return rows


@pytest.fixture(scope="module")
def bert_checkpoint(tmp_path_factory):
    """A tiny BERT pretrained for a few steps with `lmkern train bert` (its tokenizer knows the colours)."""
    root = tmp_path_factory.mktemp("bert")
    write_corpus(root / "text")
    with open(root / "text" / "colours.txt", "w") as file:
        file.write("\n\n".join(row["text"] for row in colour_rows(200, seed=9)) + "\n")
    assert lmkern("tokenizer", "train", "--data", root / "text", "--kind", "wordpiece", "--vocab-size", 160,
                  "--out", root / "tok") == 0
    assert lmkern("prepare", "--data", root / "text", "--tokenizer", root / "tok", "--out", root / "data",
                  "--val-fraction", 0.1, "--quiet") == 0
    assert train_run("bert", root / "data", root / "run", "--steps", 4, "--layers", 1, "--width", 64,
                     "--heads", 2) == 0
    return root / "run"


@pytest.fixture(scope="module")
def colours(tmp_path_factory):
    root = tmp_path_factory.mktemp("colours")
    return {"train": write_table(root / "train.csv", colour_rows(192)),
            "validation": write_table(root / "val.csv", colour_rows(48, seed=1)), "root": root}


@pytest.fixture(scope="module")
def classifier_run(bert_checkpoint, colours, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "classifier"
    assert lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", colours["train"], "--validation",
                  colours["validation"], "--epochs", 8, "--batch-size", 16, "--lr", 2e-3, "--out", out, *TINY) == 0
    return out


# -- fine-tuning ---------------------------------------------------------------------------------


def test_finetune_learns_and_writes_its_files(classifier_run):
    assert sorted(os.listdir(classifier_run)) == [".lmkern", ".lmkern.lock", "checkpoint", "checkpoints", "eval.json",
                                                  "loss.png", "metrics.jsonl", "options.json"]
    result = json.loads((classifier_run / "eval.json").read_text())
    assert result["labels"] == ["blue", "green", "red"]
    assert result["accuracy"] > result["majority_baseline"] + 0.3, result
    assert sum(map(sum, result["confusion"])) == 48 and 0 < result["macro_f1"] <= 1
    rows = read_metrics(str(classifier_run))
    evaluations = [row for row in rows if "val_accuracy" in row]
    assert max(row["val_accuracy"] for row in evaluations) == pytest.approx(result["accuracy"])
    assert [row["step"] for row in evaluations if row["val_accuracy"] == result["accuracy"]][0] == result["step"]
    checkpoint = classifier_run / "checkpoint"
    assert os.path.basename(os.readlink(checkpoint)) == f"step-{result['step']:08d}"  # the best, kept alone
    assert len(os.listdir(classifier_run / "checkpoints")) == 1
    assert sorted(os.listdir(checkpoint)) == ["config.json", "labels.json", "manifest.json", "model.safetensors",
                                              "state.pt", "tokenizer.json"]
    assert json.loads((checkpoint / "config.json").read_text())["model"] == "bert-classifier"
    lrs = [row["lr"] for row in rows[1:]]
    # Warm-up over a tenth of the 8 x 12 steps, then linear decay (to 0 at step 96, had it not stopped early).
    assert lrs[:10] == pytest.approx([2e-3 * (step + 1) / 10 for step in range(10)])
    assert lrs[10:] == pytest.approx([2e-3 * (1 - step / 85) for step in range(len(lrs) - 10)])


def test_predict_writes_labels_and_probabilities_in_input_order(classifier_run, colours, tmp_path, capsys):
    rows = colour_rows(40, seed=3)
    rows[5]["text"] = " ".join(["big"] * 300) + " red"  # the longest: sorted last, written back in place
    source = write_table(tmp_path / "texts.jsonl", [{"text": row["text"]} for row in rows])
    assert lmkern("predict", "--checkpoint", classifier_run, "--input", source, "--output", tmp_path / "out.csv",
                  "--batch-size", 7, *TINY) == 0
    assert "1 of 40 examples of --input" in capsys.readouterr().err  # truncated, and said
    with open(tmp_path / "out.csv") as file:
        written = list(csv.DictReader(file))
    assert list(written[0]) == ["label", "probability_blue", "probability_green", "probability_red"]
    _, model, folder = load_model(str(classifier_run), "auto", "cpu", kinds=("bert-classifier",))
    tokenizer = load_checkpoint_tokenizer(folder)
    tokenizer.enable_truncation(128)  # the model's positions
    for index in (0, 5, 39):  # one at a time, unpadded
        ids = tokenizer.encode(rows[index]["text"]).ids
        probabilities = torch.softmax(model(torch.tensor([ids])).logits[0], -1)
        expected = [float(written[index][f"probability_{name}"]) for name in ("blue", "green", "red")]
        torch.testing.assert_close(probabilities, torch.tensor(expected), atol=2e-6, rtol=1e-4)
        assert written[index]["label"] == ["blue", "green", "red"][int(probabilities.argmax())]
    accuracy = sum(w["label"] == r["label"] for w, r in zip(written, rows)) / len(rows)
    assert accuracy > 0.6


def test_export_writes_a_classifier_transformers_loads_with_its_labels(classifier_run, tmp_path, capsys):
    transformers = pytest.importorskip("transformers")
    assert lmkern("export", "--checkpoint", classifier_run, "--hf", tmp_path / "hf") == 0
    assert "BertForSequenceClassification" in capsys.readouterr().out
    theirs = transformers.AutoModelForSequenceClassification.from_pretrained(tmp_path / "hf").eval()
    assert theirs.config.id2label == {0: "blue", 1: "green", 2: "red"}
    _, ours, folder = load_model(str(classifier_run), "torch", "cpu", kinds=("bert-classifier",))
    ids = transformers.AutoTokenizer.from_pretrained(tmp_path / "hf")(["a red ball", "the green sea is big"],
                                                                       padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = ours(ids["input_ids"], attention_mask=ids["attention_mask"]).logits
        torch.testing.assert_close(theirs(**ids).logits, expected)


def test_predict_from_stdin_to_stdout(classifier_run, monkeypatch, capsys):
    import io

    monkeypatch.setattr(sys, "stdin", io.StringIO("a red ball\nthe blue book\n\nthe cat sees a dog\n"))
    capsys.readouterr()
    assert lmkern("predict", "--checkpoint", classifier_run, "--input", "-", *TINY) == 0
    lines = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(lines) == 4
    assert all(sorted(line["probabilities"]) == ["blue", "green", "red"] for line in lines)
    assert all(abs(sum(line["probabilities"].values()) - 1) < 1e-5 for line in lines)


def test_regression_and_pairs_from_a_held_out_fraction(bert_checkpoint, tmp_path, capsys):
    rows = colour_rows(120, seed=4)
    pairs = [{"first": row["text"], "second": other["text"], "score": float(row["label"] == other["label"])}
             for row, other in zip(rows, reversed(rows))]
    source = write_table(tmp_path / "pairs.tsv", pairs)
    out = tmp_path / "run"
    assert lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", source, "--val-fraction", 0.25,
                  "--text-column", "first", "--text-pair-column", "second", "--label-column", "score", "--regression",
                  "--epochs", 2, "--batch-size", 16, "--out", out, *TINY) == 0
    result = json.loads((out / "eval.json").read_text())
    assert result["regression"] and result["labels"] == [] and result["examples"] == {"train": 90, "validation": 30}
    assert result["mse"] >= 0 and -1 <= result["pearson"] <= 1 and "val_pearson" in read_metrics(str(out))[-1]
    capsys.readouterr()
    assert lmkern("predict", "--checkpoint", out, "--input", source, *TINY) == 0  # the pair columns remembered
    scores = [json.loads(line)["score"] for line in capsys.readouterr().out.splitlines()]
    assert len(scores) == 120


def test_the_docstring_task_end_to_end(tmp_path):
    """scripts/finetune_docstrings.py --quick: real text, pretraining, fine-tuning, predict."""
    sys.path.insert(0, os.path.dirname(os.path.dirname(__file__)))
    from scripts.finetune_docstrings import run

    result = run(str(tmp_path / "run"), quick=True)
    assert result["classes"] == ["asyncio", "email", "importlib", "logging", "tkinter", "xml"]
    assert result["majority_baseline"] < 0.25
    assert result["accuracy"] > result["majority_baseline"] + 0.15, result
    assert all(str(tmp_path) not in command for command in result["commands"])  # recorded with OUT for the folder
    with open(tmp_path / "run" / "predictions.csv") as file:
        assert sum(1 for _ in csv.DictReader(file)) == result["examples"]["val"]


# -- from a Hugging Face directory ----------------------------------------------------------------


def hf_directory(folder, num_labels, tokenizer_file):
    """A transformers BertForSequenceClassification of a small random config, saved with its
    tokenizer (tokenizer.json, or vocab.txt alone)."""
    import transformers

    folder.mkdir()
    vocab = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS, "green", "##s", "##er"]
    (folder / "vocab.txt").write_text("\n".join(vocab) + "\n")
    tokenizer = transformers.BertTokenizer.from_pretrained(folder)
    config = transformers.BertConfig(vocab_size=len(vocab), hidden_size=32, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=64, max_position_embeddings=64, hidden_dropout_prob=0.0,
                                     attention_probs_dropout_prob=0.0, num_labels=num_labels)
    torch.manual_seed(0)
    model = transformers.BertForSequenceClassification(config).eval()
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    if not tokenizer_file:
        os.remove(folder / "tokenizer.json")
    return model, tokenizer


@pytest.mark.parametrize("kernels", ["torch", "native"])
@pytest.mark.parametrize("tokenizer_file", [True, False], ids=["tokenizer.json", "vocab.txt"])
def test_the_first_loss_from_a_hugging_face_directory_is_transformers(tmp_path, kernels, tokenizer_file):
    rows = colour_rows(24, seed=5)
    rows[0]["text"] = "The Cats SEES greener balls"  # casing, word pieces, an unknown word
    hf_model, tokenizer = hf_directory(tmp_path / "hf", 3, tokenizer_file)
    source = write_table(tmp_path / "train.jsonl", rows)
    out = tmp_path / "run"
    # One batch of every example: its mean loss does not depend on their order.
    assert lmkern("finetune", "bert", "--init", tmp_path / "hf", "--train", source, "--validation", source,
                  "--epochs", 1, "--batch-size", 24, "--kernels", kernels, "--out", out, *TINY) == 0
    first = read_metrics(str(out))[1]
    labels = sorted({row["label"] for row in rows})
    batch = tokenizer([row["text"] for row in rows], padding=True, return_tensors="pt")
    with torch.no_grad():
        expected = hf_model(**batch, labels=torch.tensor([labels.index(row["label"]) for row in rows])).loss
    torch.testing.assert_close(torch.tensor(first["loss"]), expected, rtol=1e-5, atol=1e-6)
    # The step-0 evaluation, on the same examples before any update, agrees too.
    torch.testing.assert_close(torch.tensor(read_metrics(str(out))[0]["val_loss"]), expected, rtol=1e-5, atol=1e-6)


def test_a_hugging_face_encoder_gets_a_fresh_classifier(tmp_path):
    hf_directory(tmp_path / "hf", 2, True)  # two outputs; the task has three classes
    source = write_table(tmp_path / "train.csv", colour_rows(24))
    assert lmkern("finetune", "bert", "--init", tmp_path / "hf", "--train", source, "--epochs", 1, "--out",
                  tmp_path / "run", *TINY) == 0
    assert json.loads((tmp_path / "run" / "eval.json").read_text())["labels"] == ["blue", "green", "red"]


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def gpt_run(tmp_path_factory):
    root = tmp_path_factory.mktemp("gpt")
    write_corpus(root / "text", documents=60)
    assert lmkern("tokenizer", "train", "--data", root / "text", "--kind", "bpe", "--vocab-size", 300,
                  "--out", root / "tok") == 0
    assert lmkern("prepare", "--data", root / "text", "--tokenizer", root / "tok", "--out", root / "data",
                  "--val-fraction", 0.1, "--quiet") == 0
    assert train_run("gpt", root / "data", root / "run", "--steps", 1, "--layers", 1) == 0
    return root / "run"


def bad_files(root):
    (root / "empty.csv").write_text("")
    (root / "header.csv").write_text("text,label\n")
    write_table(root / "unseen.csv", [{"text": "a green ball", "label": "green"}, {"text": "x", "label": "purple"}])
    write_table(root / "words.jsonl", [{"text": "a", "label": "big"}, {"text": "b", "label": "small"}])
    (root / "notes.txt").write_text("not a table")
    return root


@pytest.mark.parametrize("case, options, expected", [
    ("missing column", ["--text-column", "sentence"],
     "--text-column 'sentence' is not a column of --train {train} (its columns: text, label)"),
    ("missing label column", ["--label-column", "y"], "--label-column 'y' is not a column of --train {train}"),
    ("empty file", ["--train", "{root}/empty.csv"], "--train {root}/empty.csv: no examples (the file is empty)"),
    ("a header alone", ["--train", "{root}/header.csv"], "--train {root}/header.csv: no examples"),
    ("unseen labels", ["--validation", "{root}/unseen.csv"],
     "--label-column of --validation {root}/unseen.csv: labels not seen in training: 'purple' (the classes: 'blue', "
     "'green', 'red')"),
    ("labels that are not numbers", ["--regression", None], "--label-column of --train {train}, example 1: "),
    ("an unknown format", ["--train", "{root}/notes.txt"], "--train {root}/notes.txt: expected a .csv, .tsv or .jsonl"),
    ("a bad fraction", ["--val-fraction", "1.5"], "--val-fraction must be in (0, 1), got 1.5"),
    ("too long", ["--max-length", "1000"], "--max-length 1000: more than the model's 128 positions"),
    ("no init", ["--init", "{root}/nowhere"], "--init {root}/nowhere: no such folder"),
])
def test_bad_input_is_one_line_naming_the_flag_and_writes_nothing(bert_checkpoint, colours, tmp_path, capsys, case,
                                                                   options, expected):
    root = bad_files(tmp_path)
    given = {"--init": str(bert_checkpoint), "--train": str(colours["train"])}
    for flag, value in zip(options[::2], options[1::2]):
        given[flag] = value and value.format(root=root)
    argv = [item for pair in given.items() for item in pair if item is not None]
    before = snapshot(tmp_path)
    error = one_line_error(capsys, lmkern("finetune", "bert", *argv, "--out", tmp_path / "run", *TINY))
    assert expected.format(root=root, train=colours["train"]) in error, error
    assert snapshot(tmp_path) == before and not (tmp_path / "run").exists()


def test_a_gpt_checkpoint_is_refused_by_finetune_and_predict(gpt_run, colours, tmp_path, capsys):
    error = one_line_error(capsys, lmkern("finetune", "bert", "--init", gpt_run, "--train", colours["train"], "--out",
                                          tmp_path / "run", *TINY))
    assert f"--init {gpt_run} holds a gpt model: finetune bert starts from a BERT" in error
    error = one_line_error(capsys, lmkern("predict", "--checkpoint", gpt_run, "--input", colours["train"], *TINY))
    assert "--checkpoint " in error and "holds a gpt model: predict takes a classifier" in error
    assert not (tmp_path / "run").exists()


def test_one_label_only_is_refused(bert_checkpoint, tmp_path, capsys):
    source = write_table(tmp_path / "one.csv", [{"text": "a", "label": "x"}, {"text": "b", "label": "x"}])
    error = one_line_error(capsys, lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", source,
                                          "--validation", source, "--out", tmp_path / "run", *TINY))
    assert f"--label-column of --train {source}: every example has the label 'x'" in error


def test_long_texts_are_truncated_and_counted(bert_checkpoint, tmp_path, capsys):
    rows = colour_rows(16)
    for row in rows[:3]:
        row["text"] = " ".join(["ball"] * 200) + " " + row["text"]
    source = write_table(tmp_path / "long.csv", rows)
    assert lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", source, "--validation", source, "--epochs",
                  1, "--out", tmp_path / "run", *TINY) == 0
    err = capsys.readouterr().err
    assert f"warning: 3 of 16 examples of --train {source} are longer than 128 tokens and were truncated" in err


def test_finetune_and_predict_keep_the_users_files(classifier_run, colours, bert_checkpoint, tmp_path, capsys):
    (tmp_path / "notes.doc").write_text("mine")
    (tmp_path / "out.csv").write_text("mine too")
    before = snapshot(tmp_path)
    error = one_line_error(capsys, lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", colours["train"],
                                          "--out", tmp_path, *TINY))
    assert f"--out {tmp_path} holds other files (notes.doc, out.csv)" in error
    error = one_line_error(capsys, lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", colours["train"],
                                          "--out", colours["root"], *TINY))
    assert f"--out {colours['root']} contains the input --train" in error
    error = one_line_error(capsys, lmkern("predict", "--checkpoint", classifier_run, "--input", colours["train"],
                                          "--output", tmp_path / "out.csv", *TINY))
    assert f"--output {tmp_path / 'out.csv'} exists: choose another file, or pass --overwrite" in error
    error = one_line_error(capsys, lmkern("predict", "--checkpoint", classifier_run, "--input", colours["train"],
                                          "--output", colours["train"], "--overwrite", *TINY))
    assert "is the --input" in error
    error = one_line_error(capsys, lmkern("predict", "--checkpoint", classifier_run, "--input", colours["train"],
                                          "--text-column", "body", *TINY))
    assert f"--text-column 'body' is not a column of --input {colours['train']}" in error
    assert snapshot(tmp_path) == before
    error = one_line_error(capsys, lmkern("finetune", "bert", "--init", bert_checkpoint, "--train", colours["train"],
                                          "--out", classifier_run, *TINY))
    assert f"--out {classifier_run} already holds a fine-tuning run" in error


def test_examples_from_every_format_agree(tmp_path):
    rows = colour_rows(5)
    read = [classify.read_examples(str(write_table(tmp_path / f"x.{kind}", rows)), "train")
            for kind in ("csv", "tsv", "jsonl")]
    assert all(examples.texts == read[0].texts and examples.labels == read[0].labels for examples in read)
    assert read[0].texts == [row["text"] for row in rows]


def test_a_classifier_checkpoint_starts_another_fine_tuning_and_eval_refuses_it(classifier_run, colours, tmp_path,
                                                                                 capsys):
    assert lmkern("finetune", "bert", "--init", classifier_run / "checkpoint", "--train", colours["train"], "--epochs",
                  1, "--out", tmp_path / "again", *TINY) == 0
    error = one_line_error(capsys, lmkern("eval", "--checkpoint", classifier_run, "--data", tmp_path, "--device", "cpu"))
    assert "model 'bert-classifier' is neither of gpt, llama, bert" in error
