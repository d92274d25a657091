"""The pretraining loop GPT and BERT share: AdamW (fused where torch has it), linear
warm-up then cosine decay, gradient clipping and accumulation, bf16 autocast on GPU,
evaluation every N steps, a progress bar, metrics appended to DIR/metrics.jsonl with a
loss curve in DIR/loss.png, checkpoints in DIR/checkpoint, exact resume, and
DistributedDataParallel under torchrun (each rank takes its share of every global batch;
only rank 0 writes). Randomness is seeded per step and micro-batch, so a resumed run and
a run on any number of processes follow the same curve as one uninterrupted process.

A task gives the loop its data and loss:

    task.batch(step, part, parts)  the part-th of `parts` equal micro-batches of the global
                                   batch of `step`: a dict of CPU tensors that depends only
                                   on (step, part, parts), so every run and rank agree
    task.loss(model, batch)        the micro-batch's mean loss, a scalar tensor
    task.tokens(batch)             how many tokens the micro-batch trains on
    task.evaluate(model)           {metric: value} on held-out data
"""

import contextlib
import dataclasses
import json
import math
import os
import time

import torch
import torch.distributed as dist
from tqdm import tqdm

from lmkern.models.checkpoint import load_state, load_weights, save_checkpoint

CHECKPOINT = "checkpoint"
METRICS = "metrics.jsonl"


@dataclasses.dataclass
class TrainConfig:
    steps: int = 1000
    batch_size: int = 32  # sequences per optimizer step, over all ranks and micro-batches
    micro_batch_size: int = 8  # sequences per forward pass on one rank
    learning_rate: float = 6e-4
    min_learning_rate: float = 6e-5  # reached at the last step by the cosine decay
    warmup_steps: int = 100
    weight_decay: float = 0.1  # on matrices and embeddings; biases and norms get none (as nanoGPT)
    betas: tuple = (0.9, 0.95)
    grad_clip: float = 1.0
    eval_every: int = 100
    checkpoint_every: int = 500
    seed: int = 0  # with (step, micro-batch), seeds torch's generator (dropout) before each micro-batch

    def __post_init__(self):  # checked on construction: before a run writes anything
        for option, value in (("--steps", self.steps), ("--batch-size", self.batch_size),
                              ("--micro-batch-size", self.micro_batch_size), ("--eval-every", self.eval_every),
                              ("--checkpoint-every", self.checkpoint_every)):
            if value < 1:
                raise ValueError(f"{option} must be at least 1, got {value}")
        if self.batch_size % self.micro_batch_size:
            raise ValueError(
                f"--batch-size {self.batch_size} must be a multiple of --micro-batch-size {self.micro_batch_size}"
            )
        if self.warmup_steps < 0 or not 0 <= self.min_learning_rate <= self.learning_rate:
            raise ValueError(f"need --warmup >= 0 and 0 <= --min-lr <= --lr, got {self.warmup_steps}, "
                             f"{self.min_learning_rate} and {self.learning_rate}")


def learning_rate(config, step):
    """The learning rate of optimizer step `step` (0-based)."""
    if step < config.warmup_steps:
        return config.learning_rate * (step + 1) / config.warmup_steps
    progress = (step - config.warmup_steps) / max(1, config.steps - 1 - config.warmup_steps)
    cosine = 0.5 * (1.0 + math.cos(math.pi * min(1.0, progress)))
    return config.min_learning_rate + (config.learning_rate - config.min_learning_rate) * cosine


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


def read_metrics(out_dir, up_to_step=None):
    path = os.path.join(out_dir, METRICS)
    if not os.path.exists(path):
        return []
    with open(path) as file:
        rows = [json.loads(line) for line in file if line.strip()]
    return [row for row in rows if up_to_step is None or row["step"] <= up_to_step]


def write_metrics(out_dir, rows):
    with open(os.path.join(out_dir, METRICS), "w") as file:
        file.writelines(json.dumps(row) + "\n" for row in rows)


def plot_losses(out_dir, rows):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(7, 4))
    axes.plot([r["step"] for r in rows], [r["loss"] for r in rows], label="train loss", linewidth=1)
    for key in sorted({k for r in rows for k in r if k.startswith("val_") and k.endswith("loss")}):
        points = [(r["step"], r[key]) for r in rows if key in r]
        axes.plot(*zip(*points), "o-", label=key.replace("_", " "), markersize=3)
    axes.set_xlabel("step")
    axes.set_ylabel("loss")
    axes.legend()
    figure.tight_layout()
    figure.savefig(os.path.join(out_dir, "loss.png"), dpi=110)
    plt.close(figure)


def train(model, task, config, out_dir, *, kind, model_config, tokenizer_dir, device, resume=False, progress=True):
    """Trains `model` on `task`; returns the metric rows (one per step)."""
    place = Distributed(device)
    parts = config.batch_size // config.micro_batch_size
    if config.batch_size % (config.micro_batch_size * place.world):
        raise ValueError(
            f"--batch-size {config.batch_size} must be a multiple of --micro-batch-size {config.micro_batch_size} "
            f"times the {place.world} processes"
        )
    accumulation = parts // place.world
    model.to(place.device)
    optimizer = optimizer_for(model, config, place.device)
    start, rows = 0, []
    checkpoint = os.path.join(out_dir, CHECKPOINT)
    if resume:
        load_weights(checkpoint, model)
        state = load_state(checkpoint)
        optimizer.load_state_dict(state["optimizer"])
        start = state["step"]
        rows = read_metrics(out_dir, up_to_step=start)
    wrapped = torch.nn.parallel.DistributedDataParallel(model) if place.world > 1 else model
    autocast = (
        torch.autocast("cuda", dtype=torch.bfloat16) if place.device.type == "cuda" else contextlib.nullcontext()
    )
    if place.writes:
        os.makedirs(out_dir, exist_ok=True)
        write_metrics(out_dir, rows)
    bar = tqdm(total=config.steps, initial=start, disable=not (progress and place.writes), unit="step")
    for step in range(start, config.steps):
        began = time.perf_counter()
        for group in optimizer.param_groups:
            group["lr"] = learning_rate(config, step)
        wrapped.train()
        step_loss = torch.zeros((), device=place.device)
        tokens = 0
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
                loss = task.loss(wrapped, batch) / accumulation
            loss.backward()
            step_loss += loss.detach()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        done = step + 1
        row = {
            "step": done,
            "loss": place.mean(step_loss).item(),
            "lr": learning_rate(config, step),
            "tokens_per_s": tokens / (time.perf_counter() - began),
        }
        evaluate = done % config.eval_every == 0 or done == config.steps
        if evaluate and place.writes:
            model.eval()
            with torch.no_grad(), autocast:
                row.update(task.evaluate(model))
        rows.append(row)
        bar.update(1)
        bar.set_postfix(loss=f"{row['loss']:.3f}", tok_s=f"{row['tokens_per_s']:.0f}")
        if place.writes:
            with open(os.path.join(out_dir, METRICS), "a") as file:
                file.write(json.dumps(row) + "\n")
            if done % config.checkpoint_every == 0 or done == config.steps:
                state = {"step": done, "optimizer": optimizer.state_dict(), "train_config": dataclasses.asdict(config)}
                save_checkpoint(checkpoint, model, kind, model_config, tokenizer_dir, state)
            if evaluate:
                plot_losses(out_dir, rows)
    bar.close()
    return rows
