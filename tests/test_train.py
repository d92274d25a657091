"""The training loop: it learns, it resumes after a crash on exactly the same curve — a kill
at any stage of a checkpoint save included — two processes under torchrun (gloo, CPU)
train the same model as one process with the same global batch, a diverging run stops (or
skips a bounded number of bad steps) without saving bad weights, the metrics, their plot
and the progress lines say what happened, and a bad setting is an error that names it."""

import functools
import itertools
import json
import math
import os
import subprocess
import sys

import pytest
import torch
import toy_training

from lmkern.models import checkpoint
from lmkern.models.checkpoint import load_weights, newest_checkpoint, save_stages
from lmkern.models.tokenizer import save_tokenizer, train_tokenizer
from lmkern.models.errors import ArgumentPathError, ArgumentValueError
from lmkern.models.train import TrainConfig, TrainingDiverged, metrics_figure, metrics_line, read_metrics


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def tokenizer_dir(tmp_path):
    save_tokenizer(train_tokenizer(["a few words of text for a tokenizer"] * 10, "bpe", 300), tmp_path / "tokenizer")
    return str(tmp_path / "tokenizer")


def curve(rows):
    """The parts of the metric rows that must repeat exactly (not the timings), as the
    metrics file holds them (null for a non-finite value, which never equals itself)."""
    return [json.loads(metrics_line({key: value for key, value in row.items() if key != "tokens_per_s"}))
            for row in rows]


def assert_same_weights(model, other):
    for name, parameter in model.state_dict().items():
        assert torch.equal(parameter, other.state_dict()[name]), name


def strict_json(line):
    """json.loads that refuses NaN and infinities, which are not JSON."""
    return json.loads(line, parse_constant=lambda name: pytest.fail(f"{name} in a metrics line: {line}"))


def test_learns_and_writes_its_files(tmp_path, tokenizer_dir):
    out = tmp_path / "run"
    _, rows = toy_training.run(str(out), tokenizer_dir, steps=30)
    assert rows[0].keys() == {"step", "val_loss"} and rows[0]["step"] == 0  # the untrained model's evaluation
    assert rows[-1]["loss"] < 0.3 * rows[1]["loss"], [row.get("loss") for row in rows]
    assert "val_loss" in rows[4] and "val_loss" not in rows[1]
    assert {"loss", "grad_norm", "lr", "tokens_per_s"} <= rows[1].keys()
    assert curve(read_metrics(str(out))) == curve(rows)
    assert sorted(os.listdir(out)) == ["checkpoint", "checkpoints", "loss.png", "metrics.jsonl"]
    assert sorted(os.listdir(out / "checkpoints")) == ["step-00000024", "step-00000028", "step-00000030"]  # keep 3
    assert os.path.realpath(out / "checkpoint") == str(out / "checkpoints" / "step-00000030")
    assert sorted(os.listdir(out / "checkpoint")) == ["config.json", "manifest.json", "model.safetensors", "state.pt",
                                                      "tokenizer.json"]
    modes = {name: os.stat(out / "checkpoint" / name).st_mode for name in os.listdir(out / "checkpoint")}
    assert len(set(modes.values())) == 1, modes  # the weights too: safetensors makes its files private


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_resume_after_a_crash_follows_the_same_curve(tmp_path, tokenizer_dir, monkeypatch, precision):
    """fp16: the loss scaler starts so high that the first steps overflow and lower it, so
    that a resume must restore its state to follow the same curve."""
    monkeypatch.setattr(torch.amp, "GradScaler", functools.partial(torch.amp.GradScaler, init_scale=2.0**24))
    straight_model, straight = toy_training.run(str(tmp_path / "straight"), tokenizer_dir, precision=precision)
    if precision == "fp16":
        scales = [row["loss_scale"] for row in straight[1:]]
        assert scales[0] > scales[5] and not math.isfinite(straight[1]["grad_norm"]), scales  # overflowed
    crashed = str(tmp_path / "crashed")
    with pytest.raises(KeyboardInterrupt):
        toy_training.run(crashed, tokenizer_dir, crash_at_step=6, precision=precision)  # after the checkpoint of step 4
    assert sorted(os.listdir(crashed)) == ["checkpoint", "checkpoints", "loss.png", "metrics.jsonl"]
    resumed_model, resumed = toy_training.run(crashed, tokenizer_dir, resume=True, precision=precision)
    assert curve(resumed) == curve(straight)
    assert curve(read_metrics(crashed)) == curve(straight)
    assert_same_weights(resumed_model, straight_model)


class Killed(BaseException):
    """Stands for a kill: raised where a save stops, it runs no cleanup there (save_stages
    has none), so the run folder is left as a kill would leave it."""


def killing_save(out_dir, tokenizer_dir, at_step, after_stages, seen):
    """A save callback that kills the save of step `at_step` once `after_stages` of its
    stages are done (0: before it starts; never, if it has fewer), noting their names in
    `seen`."""

    def save(step, model, state):
        stages = save_stages(out_dir, step, model, state, kind="toy", config={}, tokenizer_dir=tokenizer_dir, keep=1)
        if step == at_step and after_stages == 0:
            raise Killed("before the save")
        for name in stages:
            if step == at_step:
                seen.append(name)
                if len(seen) == after_stages:
                    raise Killed(name)

    return save


@pytest.mark.parametrize("at_step", [4, 8])  # the first save; a later one, which also removes the one before
def test_a_kill_at_any_stage_of_a_save_leaves_a_run_that_resumes_exactly(tmp_path, tokenizer_dir, at_step):
    run = functools.partial(toy_training.run, tokenizer_dir=tokenizer_dir, keep=1, eval_every=12)  # few plots: fast
    straight_model, straight = run(str(tmp_path / "straight"))
    stages = []
    for stage in itertools.count():
        out = str(tmp_path / f"killed-{stage}")
        seen = []
        try:
            run(out, save=killing_save(out, tokenizer_dir, at_step, stage, seen))
        except Killed:
            pass
        else:
            break  # the save has fewer stages than `stage`: each was killed once
        stages = seen
        visible = "made the checkpoint visible" in seen
        expected = at_step if visible else at_step - 4 if at_step > 4 else None
        newest = newest_checkpoint(out)
        assert (newest and int(newest.rsplit("-", 1)[1])) == expected, (stage, seen)
        resumed_model, resumed = run(out, resume=True)
        assert curve(resumed) == curve(straight), (stage, seen)
        assert curve(read_metrics(out)) == curve(straight), (stage, seen)
        assert_same_weights(resumed_model, straight_model)
        assert os.listdir(os.path.join(out, "checkpoints")) == ["step-00000012"], (stage, seen)  # leftovers removed
        assert os.path.realpath(os.path.join(out, "checkpoint")) == os.path.join(out, "checkpoints", "step-00000012")
    assert stages[-1] == ("removed step-00000004" if at_step == 8 else "pointed the link at it"), stages


@pytest.mark.parametrize("fields, message", [
    (dict(steps=0), "steps must be at least 1, got 0"),
    (dict(log_every=0), "log_every must be at least 1, got 0"),
    (dict(batch_size=6, micro_batch_size=4), "batch_size 6 must be a multiple of micro_batch_size 4"),
    (dict(warmup_steps=-1), "warmup_steps must be at least 0, got -1"),
    (dict(learning_rate=1e-3, min_learning_rate=2e-3),
     "min_learning_rate must be in [0, learning_rate 0.001], got 0.002"),
    (dict(divergence_factor=1), "divergence_factor must be more than 1, got 1"),
    (dict(skip_bad_steps=-1), "skip_bad_steps must be at least 0, got -1"),
    (dict(precision="fp8"), "precision must be one of auto, fp32, bf16, fp16, got 'fp8'"),
])
def test_config_errors_name_the_fields(fields, message):
    with pytest.raises(ArgumentValueError) as raised:
        TrainConfig(**fields)
    assert str(raised.value) == message


def test_a_caller_names_the_arguments_in_its_own_words(tmp_path):
    """The command line says its flags where the library says its arguments' names; the
    values, braces and all, stay as they were."""
    with pytest.raises(ArgumentValueError) as raised:
        TrainConfig(batch_size=6, micro_batch_size=4)
    assert raised.value.message({"batch_size": "--batch-size"}) == "--batch-size 6 must be a multiple of " \
        "micro_batch_size 4"
    with pytest.raises(ArgumentPathError) as raised:
        checkpoint.find_checkpoint(str(tmp_path / "run {1}"))
    assert str(raised.value) == f"path {tmp_path}/run {{1}}: no such folder"
    assert raised.value.message({"path": "--checkpoint"}) == f"--checkpoint {tmp_path}/run {{1}}: no such folder"


def test_load_refuses_a_changed_file(tmp_path, tokenizer_dir):
    toy_training.run(str(tmp_path / "run"), tokenizer_dir, steps=4)
    folder = newest_checkpoint(str(tmp_path / "run"))
    weights = os.path.join(folder, "model.safetensors")
    with open(weights, "r+b") as file:  # flip bytes inside the tensor data, past the header
        file.seek(os.path.getsize(weights) - 8)
        file.write(b"\x7f\xff\xff\xff\x7f\xff\xff\xff")
    with pytest.raises(ValueError, match="model.safetensors is not the file this checkpoint saved"):
        load_weights(folder, toy_training.ToyModel())


class PoisonedTask(toy_training.ToyTask):
    """ToyTask whose loss is scaled by `scales[step]` (NaN, or a spike) at those steps."""

    def __init__(self, batch_size, scales):
        super().__init__(batch_size)
        self.scales = scales

    def batch(self, step, part, parts):
        return {**super().batch(step, part, parts), "scale": torch.tensor(self.scales.get(step + 1, 1.0))}

    def losses(self, model, batch):
        return {"loss": model(batch["x"], batch["y"]) * batch["scale"]}


@pytest.mark.parametrize("scale, problem", [(float("nan"), "the loss is nan"),
                                            (10.0, "more than 2 times the first step's")])
def test_a_diverging_run_stops_at_the_bad_step_and_saves_no_bad_weights(tmp_path, tokenizer_dir, scale, problem):
    out = str(tmp_path / "run")
    with pytest.raises(TrainingDiverged, match=f"at step 6: .*{problem}.*the last checkpoint, of step 4") as error:
        toy_training.run(out, tokenizer_dir, task=PoisonedTask(8, {6: scale}))
    assert error.value.step == 6 and error.value.last_saved_step == 4
    assert [step for step, _ in checkpoint.checkpoint_folders(out)] == [4]
    load_weights(newest_checkpoint(out), toy_training.ToyModel())  # finite, whole
    with open(os.path.join(out, "metrics.jsonl")) as file:
        rows = [strict_json(line) for line in file]
    assert [row["step"] for row in rows] == list(range(7))
    assert rows[-1]["skipped"] is True and (rows[-1]["loss"] is None) == (scale != scale)


def test_bad_steps_are_skipped_up_to_a_bound_and_resume_exactly(tmp_path, tokenizer_dir):
    scales = {3: float("nan"), 6: float("inf")}
    out = str(tmp_path / "skips")
    model, rows = toy_training.run(out, tokenizer_dir, task=PoisonedTask(8, scales), skip_bad_steps=2,
                                   checkpoint_every=1, keep=12)
    assert [row["step"] for row in rows if row.get("skipped")] == [3, 6]
    assert all(torch.isfinite(p).all() for p in model.parameters())
    weights = {step: checkpoint.describe_file(os.path.join(folder, "model.safetensors"))["sha256"]
               for step, folder in checkpoint.checkpoint_folders(out)}
    assert weights[3] == weights[2] and weights[6] == weights[5]  # a skipped step changes no weight
    assert weights[4] != weights[3] and weights[7] != weights[6]

    resumed_dir = str(tmp_path / "resumed")
    poisoned = functools.partial(toy_training.run, resumed_dir, tokenizer_dir, task=PoisonedTask(8, scales))
    with pytest.raises(KeyboardInterrupt):
        poisoned(skip_bad_steps=2, save=crash_after_save(resumed_dir, tokenizer_dir, 4))
    # The count of bad steps so far is saved with the checkpoint: step 3's counts after resuming.
    with pytest.raises(TrainingDiverged, match="at step 6: the loss is inf"):
        poisoned(skip_bad_steps=1, resume=True)
    poisoned(skip_bad_steps=2, resume=True)  # from step 4 again
    assert curve(read_metrics(resumed_dir)) == curve(read_metrics(out))


def crash_after_save(out_dir, tokenizer_dir, at_step):
    """A save callback that saves, then interrupts the run after the save of `at_step`."""
    save = toy_training.checkpoint_writer(out_dir, tokenizer_dir, keep=3)

    def save_then_crash(step, model, state):
        save(step, model, state)
        if step == at_step:
            raise KeyboardInterrupt

    return save_then_crash


def test_metrics_survive_a_line_cut_short_and_name_a_damaged_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 0, "val_loss": 3.0}\n{"step": 1, "loss": 2.5}\n{"step": 2, "lo')  # killed mid-line
    assert read_metrics(str(tmp_path)) == [{"step": 0, "val_loss": 3.0}, {"step": 1, "loss": 2.5}]
    path.write_text('{"step": 0, "val_loss": 3.0}\n{"step": 1, "lo\n{"step": 2, "loss": 2.5}\n')
    with pytest.raises(ValueError, match=f"{path}, line 2: not a metrics row"):
        read_metrics(str(tmp_path))


def test_the_plot_shows_each_metric_the_learning_rate_and_the_bad_steps():
    rows = [{"step": 0, "val_mlm_loss": 7.0, "val_nsp_loss": 0.7},
            {"step": 1, "loss": 7.7, "mlm_loss": 7.0, "nsp_loss": 0.7, "grad_norm": 1.0, "lr": 1e-4},
            {"step": 2, "loss": None, "mlm_loss": None, "nsp_loss": None, "grad_norm": None, "lr": 2e-4,
             "skipped": True},
            {"step": 3, "loss": 6.9, "mlm_loss": 6.3, "nsp_loss": 0.6, "grad_norm": 1.0, "lr": 3e-4,
             "val_mlm_loss": 6.5, "val_nsp_loss": 0.69, "val_mlm_accuracy": 0.1}]
    figure = metrics_figure(rows)
    panels = {axis.get_title(): axis for axis in figure.axes if axis.get_visible()}
    assert list(panels) == ["loss", "mlm loss", "nsp loss", "grad norm", "mlm accuracy", "learning rate"]
    mlm = {line.get_label(): line.get_xdata().tolist() for line in panels["mlm loss"].lines
           if not line.get_label().startswith("_")}
    assert mlm == {"mlm loss": [1, 3], "val mlm loss": [0, 3]}
    for axis in panels.values():  # the bad step, marked in every panel
        assert [line.get_xdata()[0] for line in axis.lines if line.get_color() == "red"] == [2]


def test_progress_is_a_line_every_n_steps_when_stdout_is_not_a_terminal(tmp_path, tokenizer_dir, capsys):
    toy_training.run(str(tmp_path / "run"), tokenizer_dir, steps=12, progress=True, log_every=3, eval_every=6)
    printed = capsys.readouterr().out
    assert "\r" not in printed
    assert [line.split(":")[0] for line in printed.splitlines()] == [
        "step 0/12", "step 3/12", "step 6/12", "step 9/12", "step 12/12"]
    assert "val_loss" in printed.splitlines()[2] and "tokens/s" in printed.splitlines()[1]


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
    torch.testing.assert_close([row.get("loss") for row in rows[1:]], [row.get("loss") for row in single[1:]],
                               rtol=1e-5, atol=1e-6)
    model = toy_training.ToyModel()
    load_weights(newest_checkpoint(distributed), model)
    for name, parameter in model.state_dict().items():
        torch.testing.assert_close(parameter, single_model.state_dict()[name], rtol=1e-5, atol=1e-6)


def test_json_files_hold_standard_json_where_a_value_is_not_finite(tmp_path):
    """A constant predictor's Pearson correlation is NaN: eval.json (write_json) and the
    metrics rows write null there, which strict parsers read."""
    from lmkern.models.files import write_json

    value = {"pearson": math.nan, "rows": [[1, math.inf], {"loss": -math.inf, "ok": 0.5}]}
    write_json(tmp_path / "eval.json", value)
    strict = dict(parse_constant=lambda name: pytest.fail(f"non-standard JSON constant {name}"))
    assert json.loads((tmp_path / "eval.json").read_text(), **strict) == {
        "pearson": None, "rows": [[1, None], {"loss": None, "ok": 0.5}]}
    assert json.loads(metrics_line({"step": 3, "val_pearson": math.nan}), **strict) == {"step": 3, "val_pearson": None}
