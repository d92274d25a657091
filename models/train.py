"""The training loop GPT and BERT share (pretraining, and fine-tuning by lmkern finetune):
AdamW (fused where torch has it), linear warm-up then cosine (or linear) decay, gradient clipping and accumulation, mixed precision (torch.autocast
over fp32 weights: bf16 by default on a GPU, fp16 with loss scaling),
evaluation before the first step and every N steps, progress (a bar on a terminal, a line
every N steps otherwise), metrics appended to DIR/metrics.jsonl (standard JSON: null for a
non-finite value) with a plot of them in DIR/loss.png, checkpoints through a `save`
callback, exact resume, and DistributedDataParallel under torchrun (each rank takes its
share of every global batch; only rank 0 writes). Randomness is seeded per step and
micro-batch, so a resumed run and a run on any number of processes follow the same curve
as one uninterrupted process.

A step whose loss or gradient norm is not finite, or whose loss is more than
divergence_factor times the first step's, is bad: its update is not applied, and the run
stops with TrainingDiverged — or, while fewer than skip_bad_steps have been, goes on to the
next step (as large-scale trainers skip loss spikes). So the weights, and any checkpoint
saved, never hold a bad step's update.

A task gives the loop its data and loss:

    task.batch(step, part, parts)  the part-th of `parts` equal micro-batches of the global
                                   batch of `step`: a dict of CPU tensors that depends only
                                   on (step, part, parts), so every run and rank agree
    task.losses(model, batch)      {"loss": the micro-batch's mean loss (a scalar tensor),
                                   other terms to log beside it, e.g. "mlm_loss"}
    task.tokens(batch)             how many tokens the micro-batch trains on
    task.evaluate(model)           {metric: value} on held-out data
    task.finished()                optional: asked after each evaluation and checkpoint,
                                   True ends the run there (early stopping; one process)
"""

import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmkern.models.errors import ArgumentValueError, check_at_least
from lmkern.models.files import atomic_file, standard_json

METRICS = "metrics.jsonl"
PLOT = "loss.png"
BOOKKEEPING = ("step", "tokens_per_s", "skipped", "loss_scale")  # the keys of a metrics row that are not metrics


@dataclasses.dataclass
class TrainConfig:
    """The training loop's settings, checked on construction (errors name the field)."""

    steps: int = 1000  # a short run, long enough to see a tiny preset learn
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    learning_rate: float = 6e-4  # GPT-2 small's peak (as nanoGPT)
    min_learning_rate: float = 6e-5  # reached at the last step by the cosine decay: a tenth of the peak
    warmup_steps: int = 100  # a tenth of the default run
    schedule: str = "cosine"  # the decay after warm-up: cosine (GPT-3's), or linear (BERT's, fine-tuning's)
    weight_decay: float = 0.1  # on matrices and embeddings; biases and norms get none (as nanoGPT)
    betas: tuple = (0.9, 0.95)  # GPT-3's AdamW betas (as nanoGPT)
    grad_clip: float = 1.0  # GPT-3's clip of the global gradient norm
    eval_every: int = 100  # ten evaluations over the default run
    checkpoint_every: int = 500  # two checkpoints over the default run (and one at the end of any run)
    seed: int = 0  # with (step, micro-batch), seeds torch's generator (dropout) before each micro-batch
    # An untrained model's loss is about log(vocabulary); twice that is far worse than guessing.
    divergence_factor: float = 2.0
    skip_bad_steps: int = 0  # 0: the first bad step stops the run
    log_every: int = 100  # steps between progress lines when stdout is not a terminal
    # fp32, or bf16 / fp16 under torch.autocast over fp32 weights (fp16 with loss scaling);
    # auto: bf16 on a GPU, as real training runs, fp32 elsewhere.
    precision: str = "auto"

    def __post_init__(self):  # checked on construction: before a run writes anything
        for name in ("steps", "batch_size", "micro_batch_size", "eval_every", "checkpoint_every", "log_every"):
            check_at_least(name, getattr(self, name), 1)
        if self.batch_size % self.micro_batch_size:
            raise ArgumentValueError("{batch_size} {} must be a multiple of {micro_batch_size} {}", self.batch_size,
                                     self.micro_batch_size)
        check_at_least("warmup_steps", self.warmup_steps, 0)
        if self.schedule not in SCHEDULES:
            raise ArgumentValueError("{schedule} must be one of {}, got {!r}", ", ".join(SCHEDULES), self.schedule)
        if not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ArgumentValueError("{min_learning_rate} must be in [0, {learning_rate} {}], got {}",
                                     self.learning_rate, self.min_learning_rate)
        if not self.divergence_factor > 1:
            raise ArgumentValueError("{divergence_factor} must be more than 1, got {}", self.divergence_factor)
        check_at_least("skip_bad_steps", self.skip_bad_steps, 0)
        if self.precision not in PRECISIONS:
            raise ArgumentValueError("{precision} must be one of {}, got {!r}", ", ".join(PRECISIONS), self.precision)


PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SCHEDULES = ("cosine", "linear")


def autocast_dtype(precision, device_type):
    """The dtype a precision trains in under torch.autocast on device_type, None for fp32."""
    if precision == "auto":
        precision = "bf16" if device_type == "cuda" else "fp32"
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def training_autocast(precision, device_type):
    """The torch.autocast context a training step's forward runs in (nothing for fp32)."""
    dtype = autocast_dtype(precision, device_type)
    return contextlib.nullcontext() if dtype is None else torch.autocast(device_type, dtype=dtype)


class TrainingDiverged(Exception):
    """A bad step (see the module's docstring) stopped the run; its update was not applied."""

    def __init__(self, step, problem, last_saved_step):
        saved = (f"the last checkpoint, of step {last_saved_step}, holds the weights before it"
                 if last_saved_step is not None else "no checkpoint was saved before it")
        super().__init__(f"training diverged at step {step}: {problem}; {saved}")
        self.step, self.problem, self.last_saved_step = step, problem, last_saved_step


def bad_step_problem(loss, grad_norm, first_loss, factor):
    """What makes a step bad (a sentence), or None for a good one."""
    if not math.isfinite(loss):
        return f"the loss is {loss}"
    if not math.isfinite(grad_norm):
        return f"the gradient norm is {grad_norm}"
    if first_loss is not None and loss > factor * first_loss:
        return f"the loss {loss:.4g} is more than {factor:g} times the first step's {first_loss:.4g}"
    return None


def learning_rate(config, step):
    """The learning rate of optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = min(1.0, (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps))
    remaining = 1.0 - progress if config.schedule == "linear" else 0.5 * (1.0 + math.cos(math.pi * progress))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * remaining


def optimizer_for(model, config, device):
    decay = [p for p in model.parameters() if p.requires_grad and p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.requires_grad and p.dim() < 2]
    groups = [{"params": decay, "weight_decay": config.weight_decay}, {"params": no_decay, "weight_decay": 0.0}]
    fused = torch.device(device).type in ("cuda", "cpu")  # torch's fused AdamW runs there
    return torch.optim.AdamW(groups, lr=config.learning_rate, betas=config.betas, fused=fused)


class Distributed:
    """This process's place under torchrun (rank 0 of 1 without it)."""

    def __init__(self, device):
        self.world = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = torch.device(device)
        if self.world > 1:
            if self.device.type == "cuda":
                self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
                torch.cuda.set_device(self.device)
            if not dist.is_initialized():
                dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    @property
    def writes(self):
        return self.rank == 0

    def mean(self, value):
        """A tensor's mean over the ranks."""
        if self.world > 1:
            dist.all_reduce(value)
            value = value / self.world
        return value


def finish_distributed():
    """Ends the process group train() started under torchrun, and frees it while Python still
    runs: DistributedDataParallel holds it in a reference cycle, and freed only as the
    interpreter exits, gloo's worker threads can no longer take the GIL they need, and the
    process aborts (at random, once training is done)."""
    if dist.is_initialized():
        dist.destroy_process_group()
        gc.collect()


# -- metrics, their plot, progress ---------------------------------------------------------------


def read_metrics(out_dir, up_to_step=None):
    """The metric rows of out_dir/metrics.jsonl (those up to a step). A last line cut short
    (by a kill while it was written) is left out; any other unreadable line is an error
    naming the file and line."""
    path = os.path.join(out_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as file:
        lines = file.read().split("\n")
    rows = []
    for number, line in enumerate(lines[:-1], 1):  # lines[-1] follows the last newline: empty unless cut short
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            step = row["step"]
        except (ValueError, KeyError, TypeError) as error:
            raise ValueError(f"{path}, line {number}: not a metrics row ({error!r})") from None
        if up_to_step is None or step <= up_to_step:
            rows.append(row)
    return rows


def metrics_line(row):
    """A row as a line of standard JSON: non-finite values (NaN, infinities) as null."""
    return json.dumps(standard_json(row), allow_nan=False) + "\n"


def write_metrics(out_dir, rows):
    with atomic_file(os.path.join(out_dir, METRICS)) as file:
        file.writelines(metrics_line(row) for row in rows)


def plot_metrics(out_dir, rows):
    """Writes metrics_figure(rows) to out_dir/loss.png."""
    figure = metrics_figure(rows)
    import matplotlib.pyplot as plt

    with atomic_file(os.path.join(out_dir, PLOT), "wb") as file:
        figure.savefig(file, format="png", dpi=110)
    plt.close(figure)


def metrics_figure(rows):
    """A panel per metric over the steps — training and validation values of the same name
    together, each loss apart (BERT's MLM and NSP), perplexity on a log scale, the learning
    rate last — with bad steps (non-finite or diverged; not applied) marked in red."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    names = []
    for row in rows:
        for key in row:
            name = key.removeprefix("val_")
            if key not in BOOKKEEPING and name not in names:
                names.append(name)
    names.sort(key=lambda name: (name != "loss", name == "lr"))  # the loss first, the learning rate last
    columns = 2 if len(names) > 2 else 1
    lines = math.ceil(len(names) / columns)
    figure, axes = plt.subplots(lines, columns, figsize=(6 * columns, 2.4 * lines + 0.6), sharex=True, squeeze=False)
    bad_steps = [row["step"] for row in rows if row.get("skipped")]
    for axis, name in zip(axes.flat, names):
        for key, style in ((name, "-"), (f"val_{name}", "o-")):
            points = [(row["step"], row[key]) for row in rows if row.get(key) is not None]
            if points:
                axis.plot(*zip(*points), style, label=key.replace("_", " "), markersize=3, linewidth=1)
        for step in bad_steps:
            axis.axvline(step, color="red", alpha=0.5, linewidth=1)
        if name == "perplexity":
            axis.set_yscale("log")
        axis.set_title("learning rate" if name == "lr" else name.replace("_", " "), fontsize=10)
        axis.legend(fontsize=8)
    for axis in axes.flat[len(names):]:
        axis.set_visible(False)
    for axis in axes[-1]:
        axis.set_xlabel("step")
    if bad_steps:
        figure.suptitle(f"red: {len(bad_steps)} bad steps (non-finite or diverged loss), not applied", color="red",
                        fontsize=10)
    figure.tight_layout()
    return figure


def describe(row):
    """A metrics row as text: "loss 3.21, val_loss 3.4, lr 0.0006, 12,345 tokens/s"."""
    parts = [f"{name} {value:.4g}" if isinstance(value, float) else f"{name} {value}"
             for name, value in row.items() if name not in BOOKKEEPING]
    if "tokens_per_s" in row:
        parts.append(f"{row['tokens_per_s']:,.0f} tokens/s")
    return ", ".join(parts) + (" (bad step: not applied)" if row.get("skipped") else "")


class Progress:
    """Training progress on the writing rank: a bar when stdout is a terminal; otherwise (a
    log file, a pipe) a line every `every` steps, and at each evaluation and bad step, rather
    than a stream of carriage returns."""

    def __init__(self, steps, start, every, enabled):
        terminal = enabled and sys.stdout.isatty()
        self.bar = tqdm(total=steps, initial=start, unit="step") if terminal else None
        self.steps, self.every, self.lines = steps, every, enabled and not terminal

    def update(self, row):
        notable = row.get("skipped") or any(name.startswith("val_") for name in row)
        line = f"step {row['step']}/{self.steps}: {describe(row)}"
        if self.bar is not None:
            self.bar.update(row["step"] - self.bar.n)
            self.bar.set_postfix(loss=f"{row['loss']:.3f}" if "loss" in row else "-")
            if notable:
                self.bar.write(line)
        elif self.lines and (notable or row["step"] % self.every == 0):
            print(line, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


# -- the loop -------------------------------------------------------------------------------------


def train(model, task, config, out_dir, *, save, device, state=None, progress=True):
    """Trains `model` on `task`, writing metrics into out_dir; returns the metric rows (one
    per step, after a step-0 row with the untrained model's evaluation).

    save(step, model, state) writes a checkpoint (it is called on rank 0 only). To continue
    a run, `model` holds the checkpoint's weights and `state` is the training state it was
    saved with. Raises TrainingDiverged at a bad step beyond config.skip_bad_steps, and
    ArgumentValueError if config's micro-batches do not split evenly over the processes.
    """
    place = Distributed(device)
    parts = config.batch_size // config.micro_batch_size
    if config.batch_size % (config.micro_batch_size * place.world):
        raise ArgumentValueError("{batch_size} {} must be a multiple of {micro_batch_size} {} times the {} processes",
                                 config.batch_size, config.micro_batch_size, place.world)
    accumulation = parts // place.world
    model.to(place.device)
    optimizer = optimizer_for(model, config, place.device)
    start, first_loss, bad_steps, last_saved = 0, None, 0, None
    if state is not None:
        optimizer.load_state_dict(state["optimizer"])
        start, first_loss, bad_steps = state["step"], state["first_loss"], state["bad_steps"]
        last_saved = start
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if place.world > 1 else model
    autocast = training_autocast(config.precision, place.device.type)
    # fp16 gradients are scaled up against underflow; a step whose scaled gradients overflow
    # is skipped by the scaler (which then lowers the scale), not counted as diverged.
    scaler = torch.amp.GradScaler(
        place.device.type, enabled=autocast_dtype(config.precision, place.device.type) == torch.float16
    )
    if state is not None and "scaler" in state:
        scaler.load_state_dict(state["scaler"])

    def evaluate():
        model.eval()
        with torch.no_grad(), autocast:
            return task.evaluate(model)

    log = Progress(config.steps, start, config.log_every, progress and place.writes)
    rows = []
    if place.writes:
        rows = read_metrics(out_dir, up_to_step=start) if state is not None else [{"step": 0, **evaluate()}]
        if state is None:
            log.update(rows[0])
        os.makedirs(out_dir, exist_ok=True)
        write_metrics(out_dir, rows)
    for step in range(start, config.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        wrapped.train()
        sums, tokens = {}, 0
        for index in range(accumulation):
            part = place.rank * accumulation + index
            # Randomness (dropout) depends on the step and micro-batch alone: resuming needs no
            # saved RNG, and any split of the parts over ranks trains the same model.
            torch.manual_seed(config.seed * 2**40 + step * parts + part)
            batch = task.batch(step, part, parts)
            tokens += task.tokens(batch) * place.world
            batch = {name: value.to(place.device, non_blocking=True) for name, value in batch.items()}
            last = index == accumulation - 1
            with autocast, (contextlib.nullcontext() if last or place.world == 1 else wrapped.no_sync()):
                losses = {name: value / accumulation for name, value in task.losses(wrapped, batch).items()}
            scaler.scale(losses["loss"]).backward()
            for name, value in losses.items():
                sums[name] = sums.get(name, 0) + value.detach()
        scaler.unscale_(optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        # One wait for the device per step: the losses, averaged over the ranks, and the norm.
        values = torch.cat([place.mean(torch.stack(list(sums.values()))), grad_norm.reshape(1)]).tolist()
        row = {"step": step + 1, **dict(zip(sums, values)), "grad_norm": values[-1], "lr": learning_rate(config, step)}
        overflow = scaler.is_enabled() and not math.isfinite(row["grad_norm"])  # the loss scaler's to handle
        problem = bad_step_problem(row["loss"], 0.0 if overflow else row["grad_norm"], first_loss,
                                   config.divergence_factor)
        if problem is None:
            scaler.step(optimizer)  # no update where the scaled gradients overflowed
            first_loss = row["loss"] if first_loss is None else first_loss
        else:
            bad_steps += 1
            row["skipped"] = True
        if scaler.is_enabled():
            row["loss_scale"] = scaler.get_scale()
        scaler.update()
        optimizer.zero_grad(set_to_none=True)
        row["tokens_per_s"] = tokens / (time.perf_counter() - began)
        done = step + 1
        stop = problem is not None and bad_steps > config.skip_bad_steps
        evaluated = not stop and place.writes and (done % config.eval_every == 0 or done == config.steps)
        if evaluated:
            row.update(evaluate())
        rows.append(row)
        log.update(row)
        if place.writes:
            with open(os.path.join(out_dir, METRICS), "a") as file:
                file.write(metrics_line(row))
            if problem is not None or evaluated:
                plot_metrics(out_dir, rows)
        if stop:
            log.close()
            raise TrainingDiverged(done, problem, last_saved)
        if done % config.checkpoint_every == 0 or done == config.steps:
            if place.writes:
                save(done, model, {"step": done, "optimizer": optimizer.state_dict(), "scaler": scaler.state_dict(),
                                   "first_loss": first_loss, "bad_steps": bad_steps,
                                   "train_config": dataclasses.asdict(config)})
            last_saved = done
        if evaluated and getattr(task, "finished", lambda: False)():
            break
    log.close()
    return rows
