"""The training command line: `lmkern train gpt|llama|bert` on every kernel backend, exact resume
(the options saved, then those given again), torchrun, `lmkern eval`, `lmkern generate`
(streaming, past the end of a document, long prompts, prompt files, several samples),
`lmkern demo --quick`, `lmkern check`, `lmkern bench`, and bad input, said with the flags.
Models are tiny and runs a few steps long. tests/test_cli_safety.py has the careless and
unlucky user's cases."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import safetensors.torch
import torch

from cli_runs import SMALL_RUN, lmkern, one_line_error, train_run, write_corpus
from lmkern import cli, cross_entropy
from lmkern.app.common import CommandError
from lmkern.app.models import load_model
from lmkern.app.run_config import RunConfig, resumed_config
from lmkern.models import gpt, tasks
from lmkern.models.data import TokenData
from lmkern.models.generation import DOCUMENT_BREAK, stream_text, stream_tokens
from lmkern.models.tokenizer import END_OF_TEXT, load_tokenizer
from lmkern.models.train import read_metrics

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """{"bpe": data folder, "wordpiece": data folder} prepared from the same corpus."""
    root = tmp_path_factory.mktemp("prepared")
    text = write_corpus(root / "text")
    folders = {}
    for kind, vocab in (("bpe", 320), ("wordpiece", 160)):
        assert lmkern("tokenizer", "train", "--data", text, "--kind", kind, "--vocab-size", vocab,
                      "--out", root / f"tok-{kind}") == 0
        assert lmkern("prepare", "--data", text, "--tokenizer", root / f"tok-{kind}", "--out", root / kind,
                      "--val-fraction", 0.1, "--quiet") == 0
        folders[kind] = str(root / kind)
    return folders


@pytest.fixture(scope="module")
def gpt_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "gpt"
    assert train_run("gpt", prepared["bpe"], out, "--steps", 30, "--eval-every", 10, "--kernels", "native") == 0
    return out


@pytest.fixture(scope="module")
def bert_run(prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "bert"
    assert train_run("bert", prepared["wordpiece"], out, "--steps", 30, "--eval-every", 10, "--kernels", "native") == 0
    return out


def training_rows(run):
    """The metric rows of a run's steps (after the step-0 row: the untrained model's evaluation)."""
    rows = read_metrics(str(run))
    assert rows[0]["step"] == 0 and "loss" not in rows[0]
    return rows[1:]


def curve(rows):
    """The metric rows without their timings: what must repeat exactly."""
    return [{key: value for key, value in row.items() if key != "tokens_per_s"} for row in rows]


def weights(run):
    return safetensors.torch.load_file(os.path.join(run, "checkpoint", "model.safetensors"))


# -- train ---------------------------------------------------------------------------------------


def test_gpt_run_learns_and_writes_its_files(gpt_run):
    rows = training_rows(gpt_run)
    assert rows[-1]["loss"] < 0.6 * rows[0]["loss"], [row["loss"] for row in rows]
    assert rows[-1]["val_loss"] < rows[9]["val_loss"]  # steps 10 and 30 evaluate
    assert sorted(os.listdir(gpt_run)) == [".lmkern", ".lmkern.lock", "checkpoint", "checkpoints", "loss.png",
                                           "metrics.jsonl", "options.json"]
    assert os.listdir(gpt_run / "checkpoints") == ["step-00000030"]  # the default keeps 3: one was saved
    files = ["config.json", "manifest.json", "model.safetensors", "state.pt", "tokenizer.json"]
    assert sorted(os.listdir(gpt_run / "checkpoint")) == files
    saved = json.loads((gpt_run / "checkpoint" / "config.json").read_text())
    assert saved["model"] == "gpt" and saved["config"]["context_length"] == 32 and saved["config"]["vocab_size"] == 320
    options = json.loads((gpt_run / "options.json").read_text())
    assert sorted(options) == sorted(OPTIONS_KEYS)  # what --resume reads, in earlier runs' folders too
    assert options["steps"] == 30 and options["learning_rate"] == 3e-3  # given
    assert options["min_learning_rate"] == pytest.approx(3e-4)  # not given: a tenth of the learning rate


def test_bert_run_learns_and_reports_mlm_and_nsp(bert_run):
    rows = training_rows(bert_run)
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"], [row["loss"] for row in rows]
    assert {"val_mlm_loss", "val_mlm_accuracy", "val_nsp_loss", "val_nsp_accuracy"} <= set(rows[-1])
    assert rows[-1]["val_mlm_loss"] < rows[9]["val_mlm_loss"]
    assert all(0 < row["nsp_loss"] < row["loss"] for row in rows)  # the training loss's NSP part, apart


@pytest.mark.parametrize("model", ["gpt", "llama", "bert"])
@pytest.mark.parametrize("kernels", ["torch", "triton"])
def test_training_lowers_the_loss_on_each_backend(prepared, tmp_path, model, kernels):
    """native runs in the fixtures above (Llama's below); triton runs in its CPU
    interpreter, so smaller."""
    data = prepared["wordpiece" if model == "bert" else "bpe"]
    size = ("--steps", 12) if kernels == "torch" else (
        "--steps", 4, "--warmup", 1, "--layers", 1, "--heads", 2, "--width", 32, "--context-length", 16,
        "--batch-size", 4, "--eval-tokens", 32)
    assert train_run(model, data, tmp_path / "run", "--kernels", kernels, "--eval-every", 100, *size) == 0
    losses = [row["loss"] for row in training_rows(tmp_path / "run")]
    assert losses[-1] < losses[0], losses


def test_llama_run_learns_evaluates_and_generates(prepared, tmp_path, capsys):
    """`lmkern train llama` on the GPT's data and tokenizer, then eval and generate on its
    checkpoint, as for GPT."""
    run = tmp_path / "llama"
    assert train_run("llama", prepared["bpe"], run, "--steps", 30, "--eval-every", 10, "--kernels", "native") == 0
    rows = training_rows(run)
    assert rows[-1]["loss"] < 0.75 * rows[0]["loss"], [row["loss"] for row in rows]
    evaluations = read_metrics(str(run))  # the first: the untrained model's
    assert evaluations[-1]["val_perplexity"] < 0.5 * evaluations[0]["val_perplexity"]
    saved = json.loads((run / "checkpoint" / "config.json").read_text())
    assert saved["model"] == "llama" and saved["config"]["n_kv_head"] == 2
    capsys.readouterr()
    assert lmkern("eval", "--checkpoint", run, "--data", prepared["bpe"], "--max-tokens", 512, "--stride", 32,
                  "--json", "--quiet", "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"] == pytest.approx(
        read_metrics(str(run))[-1]["val_perplexity"], rel=1e-5)
    kind, model, folder = load_model(str(run), "native", "cpu")
    tokenizer = load_tokenizer(folder)
    ids, end = tokenizer.encode("The cat", add_special_tokens=False).ids, tokenizer.token_to_id(END_OF_TEXT)
    expected = model.generate(torch.tensor([ids]), 8, eos_token_id=end)[0].tolist()
    assert lmkern("generate", "--checkpoint", run, "--prompt", "The cat", "--greedy", "--max-new-tokens", 8,
                  "--device", "cpu") == 0
    assert capsys.readouterr().out == "The cat" + tokenizer.decode([t for t in expected if t != end]) + "\n"


def test_bert_without_nsp(prepared, tmp_path):
    assert train_run("bert", prepared["wordpiece"], tmp_path / "run", "--no-nsp", "--steps", 4) == 0
    last = read_metrics(str(tmp_path / "run"))[-1]
    assert "val_mlm_accuracy" in last and "val_nsp_accuracy" not in last


@pytest.mark.parametrize("model, precision", [("gpt", "fp32"), ("bert", "fp32"), ("gpt", "fp16"), ("llama", "bf16")])
def test_resume_after_an_interruption_follows_the_same_curve(prepared, tmp_path, monkeypatch, model, precision):
    data = prepared["wordpiece" if model == "bert" else "bpe"]
    options = ("--steps", 8, "--eval-every", 4, "--checkpoint-every", 4, "--kernels", "native", "--dropout", 0.1,
               "--precision", precision)
    assert train_run(model, data, tmp_path / "straight", *options) == 0
    task = tasks.MaskedLMTask if model == "bert" else tasks.CausalLMTask
    batch = task.batch

    def interrupted(self, step, part, parts):
        if step == 6:
            raise KeyboardInterrupt
        return batch(self, step, part, parts)

    monkeypatch.setattr(task, "batch", interrupted)
    assert train_run(model, data, tmp_path / "crashed", *options) == 130  # after the checkpoint of step 4
    monkeypatch.setattr(task, "batch", batch)
    assert lmkern("train", model, "--out", tmp_path / "crashed", "--resume", "--quiet") == 0  # the saved options
    assert curve(read_metrics(str(tmp_path / "crashed"))) == curve(read_metrics(str(tmp_path / "straight")))
    straight, resumed = weights(tmp_path / "straight"), weights(tmp_path / "crashed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


@pytest.mark.parametrize("model", ["gpt", "bert"])
def test_training_under_bf16_autocast_on_cpu(prepared, tmp_path, model):
    """--precision bf16: the path a GPU run takes by default (torch.autocast over fp32
    weights), here on CPU."""
    data = prepared["bpe" if model == "gpt" else "wordpiece"]
    assert train_run(model, data, tmp_path / "run", "--precision", "bf16", "--steps", 12, "--kernels", "native") == 0
    losses = [row["loss"] for row in read_metrics(str(tmp_path / "run"))[1:]]
    assert losses[-1] < losses[0], losses
    assert json.loads((tmp_path / "run" / "options.json").read_text())["precision"] == "bf16"


# The keys of options.json, as runs have written them: --resume reads them.
OPTIONS_KEYS = ["model", "data", "preset", "init", "kernels", "layers", "heads", "width", "context_length", "dropout",
                "nsp",
                "steps", "batch_size", "micro_batch_size", "learning_rate", "min_learning_rate", "warmup_steps",
                "weight_decay", "grad_clip", "eval_every", "eval_tokens", "checkpoint_every", "keep_checkpoints",
                "divergence_factor", "skip_bad_steps", "log_every", "precision", "seed"]


def test_resume_takes_the_saved_options_then_those_given_again(tmp_path):
    """An options.json of a run from before --divergence-factor, --skip-bad-steps,
    --log-every and --precision (benchmarks/results/.../bert-tiny): its values, the options
    given again over them, and the defaults for those it lacks."""
    saved = {"data": "/runs/bdata", "preset": "tiny", "kernels": "auto", "layers": 4, "heads": 4, "width": 128,
             "context_length": 128, "dropout": None, "nsp": True, "steps": 600, "batch_size": 16,
             "micro_batch_size": 16, "learning_rate": 0.001, "min_learning_rate": 0.0001, "warmup_steps": 60,
             "weight_decay": 0.1, "grad_clip": 1.0, "eval_every": 100, "checkpoint_every": 500, "seed": 0,
             "eval_tokens": 32768, "model": "bert"}
    (tmp_path / "options.json").write_text(json.dumps(saved))
    args = cli.parser().parse_args(["train", "bert", "--out", str(tmp_path), "--resume", "--steps", "700", "--lr",
                                    "2e-3"])
    options = dataclasses.asdict(resumed_config(args))
    assert sorted(options) == sorted(OPTIONS_KEYS)
    assert {name: options[name] for name in saved} == {**saved, "steps": 700, "learning_rate": 2e-3}
    defaults = {field.name: field.default for field in dataclasses.fields(RunConfig)}
    assert {name: options[name] for name in set(options) - set(saved)} == {
        name: defaults[name] for name in set(options) - set(saved)}
    args = cli.parser().parse_args(["train", "gpt", "--out", str(tmp_path), "--resume"])
    with pytest.raises(CommandError, match=f"{tmp_path} holds a bert run, not gpt"):
        resumed_config(args)


def test_two_processes_train_like_one(prepared, tmp_path):
    options = ["gpt", "--data", prepared["bpe"], *map(str, SMALL_RUN), "--steps", "3", "--kernels", "native"]
    assert lmkern("train", *options, "--out", tmp_path / "single") == 0
    result = subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", "-m", "lmkern",
         "train", *options, "--out", str(tmp_path / "distributed")],
        capture_output=True, text=True,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    single, distributed = training_rows(tmp_path / "single"), training_rows(tmp_path / "distributed")
    torch.testing.assert_close([r["loss"] for r in distributed], [r["loss"] for r in single], rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(weights(tmp_path / "distributed"), weights(tmp_path / "single"), rtol=1e-5, atol=1e-6)


# -- eval and generate ---------------------------------------------------------------------------


def test_sliding_window_perplexity_scores_each_token_once_with_its_window():
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(vocab_size=50, context_length=8, n_layer=1, n_head=2, n_embd=16, kernels="torch"))
    tokens = np.random.default_rng(0).integers(0, 50, 37).astype(np.uint16)
    result = tasks.perplexity(model, tokens, context_length=8, stride=3, batch_size=4)
    expected, scored = [], set()
    for begin, first in tasks.sliding_windows(len(tokens), 8, 3):  # each token, by itself, from its window's start
        for position in range(first, min(begin + 9, len(tokens))):
            context = torch.from_numpy(tokens[begin:position].astype(np.int64))[None]
            logits = model(context).logits[0, -1]
            expected.append(-torch.log_softmax(logits, -1)[int(tokens[position])].item())
            assert position not in scored and position - begin >= min(position, 8 - 3)
            scored.add(position)
    assert scored == set(range(1, len(tokens))) and result["tokens"] == len(tokens) - 1
    assert result["loss"] == pytest.approx(np.mean(expected), rel=1e-5)
    assert result["perplexity"] == pytest.approx(np.exp(np.mean(expected)), rel=1e-5)


def test_eval_gpt_gives_the_perplexity_of_the_validation_tokens(gpt_run, prepared, capsys):
    arguments = ("eval", "--checkpoint", gpt_run, "--data", prepared["bpe"], "--json", "--quiet", "--device", "cpu")
    # Training evaluated the first 512 validation tokens in windows that do not overlap.
    assert lmkern(*arguments, "--max-tokens", 512, "--stride", 32) == 0
    printed = capsys.readouterr().out.splitlines()
    assert printed[0].startswith("val perplexity")
    trained = read_metrics(str(gpt_run))[-1]["val_perplexity"]
    assert json.loads(printed[-1])["perplexity"] == pytest.approx(trained, rel=1e-5)
    assert lmkern(*arguments, "--stride", 16) == 0  # all of them, windows advancing by half a window
    result = json.loads(capsys.readouterr().out.splitlines()[-1])
    assert result["tokens"] == len(TokenData(prepared["bpe"], "val")) - 1


def test_eval_bert_gives_mlm_and_nsp_accuracy(bert_run, prepared, capsys):
    assert lmkern("eval", "--checkpoint", bert_run, "--data", prepared["wordpiece"], "--max-tokens", 1024,
                  "--json", "--quiet", "--device", "cpu", "--context-length", 32) == 0
    printed = capsys.readouterr().out.splitlines()
    result = json.loads(printed[-1])
    assert "MLM loss" in printed[0] and "NSP accuracy" in printed[0]
    assert 0 < result["mlm_accuracy"] < 1 and 0 <= result["nsp_accuracy"] <= 1 and result["sequences"] == 32


def test_generate_streams_what_the_model_generates(gpt_run, capsys):
    kind, model, folder = load_model(str(gpt_run), "native", "cpu")
    tokenizer = load_tokenizer(folder)
    prompt = "The cat"
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    end = tokenizer.token_to_id(END_OF_TEXT)
    expected = model.generate(torch.tensor([ids]), 12, eos_token_id=end)[0].tolist()
    assert list(stream_tokens(model, ids, 12, eos_token_id=end)) == expected
    sampled = model.generate(torch.tensor([ids]), 12, do_sample=True, temperature=0.9, top_k=20, seed=3)[0].tolist()
    assert list(stream_tokens(model, ids, 12, do_sample=True, temperature=0.9, top_k=20, seed=3)) == sampled

    assert lmkern("generate", "--checkpoint", gpt_run, "--prompt", prompt, "--greedy", "--max-new-tokens", 12,
                  "--device", "cpu") == 0
    text = capsys.readouterr().out
    assert text == prompt + tokenizer.decode([t for t in expected if t != end]) + "\n"
    runs = []
    for _ in range(2):
        assert lmkern("generate", "--checkpoint", gpt_run, "--prompt", "", "--seed", 5, "--max-new-tokens", 20,
                      "--top-p", 0.9, "--device", "cpu") == 0
        runs.append(capsys.readouterr().out)
    assert runs[0] == runs[1] and len(runs[0]) > 1


def test_end_of_text_is_a_document_break_and_min_new_tokens_holds_it_back(gpt_run, monkeypatch, capsys):
    kind, model, folder = load_model(str(gpt_run), "native", "cpu")
    tokenizer = load_tokenizer(folder)
    end = tokenizer.token_to_id(END_OF_TEXT)
    ids = tokenizer.encode("The cat sees the ball.", add_special_tokens=False).ids
    assert "".join(stream_text(tokenizer, ids + [end] + ids, end)) == f"The cat sees the ball.{DOCUMENT_BREAK}" \
        "The cat sees the ball."
    preference = torch.zeros(model.config.vocab_size)  # the greedy choice: end of text first, then token 7
    preference[end], preference[7] = 2.0, 1.0
    def decode(self, input_ids, cache, last=None):  # the logits of one row, at `last` or every position
        return preference.expand(1, -1) if last is not None else preference.expand(1, input_ids.shape[1], -1)

    monkeypatch.setattr(gpt.GPT, "decode", decode)
    assert list(stream_tokens(model, ids, 8, eos_token_id=end)) == [end]
    assert list(stream_tokens(model, ids, 8, eos_token_id=end, min_new_tokens=3)) == [7, 7, 7, end]
    command = ("generate", "--checkpoint", gpt_run, "--prompt", "The cat", "--greedy", "--max-new-tokens", 4,
               "--device", "cpu")
    assert lmkern(*command) == 0
    assert capsys.readouterr().out == "The cat\n"  # it stops at the end of the document
    assert lmkern(*command, "--min-new-tokens", 2) == 0
    assert capsys.readouterr().out == "The cat" + tokenizer.decode([7, 7]) + "\n"
    assert lmkern(*command, "--ignore-eos") == 0
    assert capsys.readouterr().out == f"The cat{DOCUMENT_BREAK * 4}\n"  # end of text, each time


def test_generate_cuts_a_long_prompt_from_the_left(gpt_run, capsys):
    kind, model, folder = load_model(str(gpt_run), "native", "cpu")
    tokenizer = load_tokenizer(folder)
    prompt = "The cat sees the ball. " * 20
    ids = tokenizer.encode(prompt, add_special_tokens=False).ids
    assert len(ids) > model.config.context_length
    expected = list(stream_tokens(model, ids[-24:], 8, eos_token_id=tokenizer.token_to_id(END_OF_TEXT)))
    assert lmkern("generate", "--checkpoint", gpt_run, "--prompt", prompt, "--greedy", "--max-new-tokens", 8,
                  "--device", "cpu") == 0
    printed = capsys.readouterr()
    assert printed.out == prompt + tokenizer.decode(expected) + "\n"
    assert f"the prompt's first {len(ids) - 24} of {len(ids)} tokens are left out" in printed.err


def test_generate_reads_a_prompt_file_and_draws_several_samples(gpt_run, tmp_path, capsys):
    sampling = ("--max-new-tokens", 10, "--top-k", 20, "--device", "cpu", "--checkpoint", gpt_run)
    singles = []
    for seed in (5, 6):
        assert lmkern("generate", "--prompt", "A dog\n", "--seed", seed, *sampling) == 0
        singles.append(capsys.readouterr().out)
    (tmp_path / "prompt.txt").write_text("A dog\n")
    assert lmkern("generate", "--prompt-file", tmp_path / "prompt.txt", "--num-samples", 2, "--seed", 5, *sampling) == 0
    assert capsys.readouterr().out == f"[sample 1 of 2]\n{singles[0]}[sample 2 of 2]\n{singles[1]}"
    assert singles[0] != singles[1]


# -- demo, check and bench --------------------------------------------------------------------------


def test_demo_quick_trains_evaluates_and_samples_among_a_users_files(tmp_path, capsys):
    out = tmp_path / "mine"
    (out / "data").mkdir(parents=True)
    (out / "data" / "labels.csv").write_text("id,label\n1,cat\n")
    error = one_line_error(capsys, lmkern("demo", "--quick", "--out", out, "--device", "cpu"))
    assert "holds other files (data)" in error  # not made by the demo: refused
    assert lmkern("demo", "--quick", "--out", out, "--device", "cpu", "--overwrite") == 0
    assert (out / "data" / "labels.csv").read_text() == "id,label\n1,cat\n"
    printed = capsys.readouterr().out
    before = float(printed.split("validation perplexity before training: ")[1].split()[0])
    during = printed.split("validation perplexity during training: ")[1].splitlines()[0]
    after = float(printed.split("validation perplexity after training: ")[1].split()[0])
    assert after < 0.8 * before, printed
    assert [part.split("(step ")[1] for part in during.split("), ")] == ["5", "10", "15", "20", "25", "30", "35)"]
    assert [line.split(":")[0] for line in printed.splitlines() if line.startswith("step ")] == [
        f"step {step}/40" for step in range(0, 41, 5)]  # not a terminal: a progress line every 5 steps
    assert "sample:\nThe" in printed
    rows = read_metrics(str(out / "run"))
    assert rows[0]["val_perplexity"] == pytest.approx(before, abs=0.05)
    # The eval command the demo prints gives the perplexity it printed.
    command = printed.split("(`lmkern eval ")[1].split("` computes the same)")[0].split()
    assert lmkern("eval", *command, "--json", "--quiet", "--device", "cpu") == 0
    assert json.loads(capsys.readouterr().out.splitlines()[-1])["perplexity"] == pytest.approx(after, abs=0.05)


def test_check_compares_each_backend_with_torch_and_fails_on_a_mismatch(monkeypatch, capsys):
    monkeypatch.setattr("lmkern.cross_entropy", lambda logits, target, backend: cross_entropy(
        logits * (2 if backend == "native" else 1), target, backend=backend))  # native made wrong
    assert lmkern("check", "--tokens", 32, "--vocab", 50, "--device", "cpu") == 1
    verdicts = {line.split("  ")[0]: line.split()[-1] for line in capsys.readouterr().out.splitlines()[2:]}
    assert verdicts == {"torch.nn.functional": "torch", "lmkern torch": "torch", "lmkern triton": "torch",
                        "lmkern native": "MISMATCH"}  # "matches torch", but native


def test_bench_hands_its_arguments_to_the_benchmark_runner(monkeypatch):
    try:
        import lmkern.benchmarks.run as runner
    except ModuleNotFoundError:
        import benchmarks.run as runner
    seen = []
    monkeypatch.setattr(runner, "main", lambda argv: seen.append(argv) or 0)
    assert lmkern("bench", "--op", "cross_entropy", "--quick") == 0
    assert seen == [["--op", "cross_entropy", "--quick"]]


# -- bad input -----------------------------------------------------------------------------------


def corrupt_weights(run, tmp_path):
    copy = tmp_path / "corrupted"
    shutil.copytree(run / "checkpoint", copy)
    with open(copy / "model.safetensors", "r+b") as file:
        file.truncate(os.path.getsize(copy / "model.safetensors") // 2)
    return copy


def oversized_vocabulary(data, tmp_path):
    copy = tmp_path / "oversized"
    shutil.copytree(data, copy)
    meta = json.loads((copy / "meta.json").read_text())
    (copy / "meta.json").write_text(json.dumps(dict(meta, vocab_size=70000)))
    return copy


def other_tokenizer_data(tmp_path):
    text = write_corpus(tmp_path / "text", documents=40)
    assert lmkern("tokenizer", "train", "--data", text, "--kind", "bpe", "--vocab-size", 300,
                  "--out", tmp_path / "t") == 0
    assert lmkern("prepare", "--data", text, "--tokenizer", tmp_path / "t", "--out", tmp_path / "other", "--quiet") == 0
    return tmp_path / "other"


@pytest.mark.parametrize(
    "argv, message",
    [
        (["train", "gpt", "--data", "{tmp}/missing", "--preset", "tiny"], "no meta.json"),
        (["train", "gpt", "--data", "{bpe}", "--preset", "huge"], "--preset huge: unknown GPT preset 'huge'"),
        (["train", "gpt", "--data", "{wordpiece}", "--preset", "tiny"],
         "prepared with a wordpiece tokenizer; GPT needs"),
        (["train", "bert", "--data", "{bpe}", "--preset", "tiny"], "prepared with a bpe tokenizer; BERT needs"),
        (["train", "gpt", "--data", "{oversized}", "--preset", "tiny"], "does not fit the token files' uint16"),
        (["train", "gpt", "--data", "{bpe}", "--preset", "tiny", "--context-length", "100000"],
         "fewer than --context-length"),
        (["train", "gpt", "--data", "{bpe}", "--preset", "tiny", "--batch-size", "6", "--micro-batch-size", "4"],
         "--batch-size 6 must be a multiple of --micro-batch-size 4"),
        (["train", "gpt", "--data", "{bpe}", "--preset", "tiny", "--steps", "0"], "--steps must be at least 1, got 0"),
        (["train", "gpt", "--data", "{bpe}", "--preset", "tiny", "--lr", "1e-3", "--min-lr", "1e-2"],
         "--min-lr must be in [0, --lr 0.001], got 0.01"),
        (["train", "bert", "--data", "{wordpiece}", "--preset", "tiny", "--layers", "0"],
         "--layers must be at least 1, got 0"),
        (["train", "gpt", "--resume"], "holds no run to resume"),
        (["train", "gpt", "--data", "{bpe}"], "--preset is required"),
        (["eval", "--checkpoint", "{tmp}/missing", "--data", "{bpe}"], "--checkpoint {tmp}/missing: no such folder"),
        (["eval", "--checkpoint", "{gpt}", "--data", "{other}"],
         "has 320 tokens, but --data {other} was prepared with one of 300"),
        (["eval", "--checkpoint", "{corrupted}", "--data", "{bpe}"],
         "model.safetensors is not the file this checkpoint saved"),
        (["eval", "--checkpoint", "{gpt}", "--data", "{bpe}", "--stride", "100"],
         "--stride must be in [1, --context-length 32], got 100"),
        (["generate", "--checkpoint", "{bert}", "--prompt", "hello"], "holds a BERT model: generate needs a GPT"),
        (["generate", "--checkpoint", "{gpt}", "--prompt", "hi", "--temperature", "0"], "--temperature must be > 0"),
        (["generate", "--checkpoint", "{gpt}", "--prompt", "hi", "--max-new-tokens", "500"],
         "more than the model's context"),
    ],
)
def test_bad_input_is_a_one_line_error_and_leaves_nothing(prepared, gpt_run, bert_run, tmp_path, capsys, argv, message):
    places = dict(tmp=tmp_path, bpe=prepared["bpe"], wordpiece=prepared["wordpiece"], gpt=gpt_run, bert=bert_run)
    if "{oversized}" in argv:
        places["oversized"] = oversized_vocabulary(prepared["bpe"], tmp_path)
    if "{other}" in argv:
        places["other"] = other_tokenizer_data(tmp_path)
    if "{corrupted}" in argv:
        places["corrupted"] = corrupt_weights(gpt_run, tmp_path)
    before = set(os.listdir(tmp_path))
    capsys.readouterr()
    where = ("--out", tmp_path / "out") if argv[0] == "train" else ("--device", "cpu")
    error = one_line_error(capsys, lmkern(*[a.format(**places) for a in argv], *where))
    assert message.format(**places) in error, error
    assert set(os.listdir(tmp_path)) == before  # no run folder, nothing half-written


def test_a_run_is_not_overwritten_without_resume(prepared, gpt_run, capsys):
    before = os.path.getmtime(gpt_run / "checkpoint" / "model.safetensors")
    error = one_line_error(capsys, train_run("gpt", prepared["bpe"], gpt_run, "--steps", 2))
    assert "already holds a run: --resume it" in error
    assert os.path.getmtime(gpt_run / "checkpoint" / "model.safetensors") == before
