"""The training loop: it learns, it resumes after a crash on exactly the same curve, and
two processes under torchrun (gloo, CPU) train the same model as one process with the
same global batch."""

import os
import subprocess
import sys

import pytest
import torch
import toy_training

from lmkern.models.checkpoint import load_weights
from lmkern.models.tokenizer import save_tokenizer, train_tokenizer
from lmkern.models.train import read_metrics


@pytest.fixture
def tokenizer_dir(tmp_path):
    save_tokenizer(train_tokenizer(["a few words of text for a tokenizer"] * 10, "bpe", 300), tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def curve(rows):
    """The parts of the metric rows that must repeat exactly (not the timings)."""
    return [{key: value for key, value in row.items() if key != "tokens_per_s"} for row in rows]


def test_learns_and_writes_its_files(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    _, rows = toy_training.run(str(out), tokenizer_dir, steps=30)
    assert rows[-1]["loss"] < 0.3 * rows[0]["loss"], [row["loss"] for row in rows]
    assert "val_loss" in rows[3] and "val_loss" not in rows[0]
    assert curve(read_metrics(str(out))) == curve(rows)
    assert sorted(os.listdir(out)) == ["checkpoint", "loss.png", "metrics.jsonl"]
    assert sorted(os.listdir(out / "checkpoint")) == ["config.json", "model.safetensors", "state.pt", "tokenizer.json"]


def test_resume_after_a_crash_follows_the_same_curve(tmp_path, tokenizer_dir):
    straight_model, straight = toy_training.run(str(tmp_path / "straight"), tokenizer_dir)
    crashed = str(tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        toy_training.run(crashed, tokenizer_dir, crash_at_step=6)  # after the checkpoint of step 4
    assert sorted(os.listdir(crashed)) == ["checkpoint", "loss.png", "metrics.jsonl"]
    resumed_model, resumed = toy_training.run(crashed, tokenizer_dir, resume=True)
    assert curve(resumed) == curve(straight)
    assert curve(read_metrics(crashed)) == curve(straight)
    for name, parameter in resumed_model.state_dict().items():
        assert torch.equal(parameter, straight_model.state_dict()[name]), name


def test_two_processes_train_like_one(tmp_path, tokenizer_dir):
    single_model, single = toy_training.run(str(tmp_path / "single"), tokenizer_dir)
    script = os.path.join(os.path.dirname(__file__), "toy_training.py")
    distributed = str(tmp_path / "distributed")
    subprocess.run(
        [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", script,
         distributed, tokenizer_dir],
        check=True, capture_output=True, text=True,
    )
    rows = read_metrics(distributed)
    assert [row["step"] for row in rows] == [row["step"] for row in single]
    # The same math; only the order of the gradient sums across processes differs.
    torch.testing.assert_close([row["loss"] for row in rows], [row["loss"] for row in single], rtol=1e-5, atol=1e-6)
    model = toy_training.ToyModel()
    load_weights(os.path.join(distributed, "checkpoint"), model)
    for name, parameter in model.state_dict().items():
        torch.testing.assert_close(parameter, single_model.state_dict()[name], rtol=1e-5, atol=1e-6)
