"""What the model-level benchmarks (bench_gpt_train.py, bench_gpt_generate.py,
bench_bert_train.py) share: a provider per `kernels` value of lmkern's models, torch.compile
of the model on the reference ops, and the passes of a training step.

A provider's run builds the model for a case: run(model_class, config, device) returns
(model, the callable to run it: the model itself, or its torch.compile). Every provider
builds its model from the same seed, so all start from the same weights.

A training step is what lmkern.models.train takes per micro-batch: forward under bf16
autocast on a GPU (fp32 weights), backward, gradient clipping, then the training loop's
fused AdamW and zero_grad(set_to_none=True). Its passes:

    fwd      forward and the loss (in train mode, recording the graph for backward)
    fwd+bwd  forward and backward, gradients freed before it (as after zero_grad)
    step     the whole step: forward, backward, clipping, AdamW
"""

import dataclasses
import functools

import torch

from lmkern import backend
from lmkern.models.train import TrainConfig, autocast_dtype, optimizer_for, training_autocast

from .harness import Provider, backend_unavailable

TRAIN_PASSES = ("fwd", "fwd+bwd", "step")
COMPILE_SLOW = "compiling a whole model takes tens of seconds to minutes"


def build(model_class, config, device, *, kernels, compiled=False):
    """(model, the callable that runs it) with `kernels`, on `device`, from seed 0."""
    torch.manual_seed(0)
    with torch.device(device):
        model = model_class(dataclasses.replace(config, kernels=kernels))
    return model, (torch.compile(model, dynamic=False) if compiled else model)


def model_providers(ops, device, dtype, *, compile_absent=None):
    """A provider "lmkern <kernels>" per kernels value the model takes (absent with the
    reason where one of its kernel families `ops` cannot run), then "torch.compile": the
    model with kernels="torch" under torch.compile (absent with compile_absent if given;
    left out of --quick runs, as compiling takes long)."""
    providers = []
    for kernels in backend.CHOICES:
        reason = backend_unavailable(kernels, ops, device, dtype)
        run = None if reason else functools.partial(build, kernels=kernels)
        providers.append(Provider(f"lmkern {kernels}", run, reason))
    compiled = None if compile_absent else functools.partial(build, kernels="torch", compiled=True)
    providers.append(Provider("torch.compile", compiled, compile_absent, slow=COMPILE_SLOW))
    return providers


def autocast(device):
    """The training loop's default precision on the device: bf16 autocast on a GPU, fp32 on CPU."""
    return training_autocast(TrainConfig().precision, device)


def training_passes(model, run, batch, device):
    """{pass name: callable} for a training step of `model`, run(**batch) returning an
    output with .loss."""
    config = TrainConfig()
    optimizer = optimizer_for(model, config, device)
    model.train()

    def forward():
        with autocast(device):
            return run(**batch).loss

    def forward_backward():
        model.zero_grad(set_to_none=True)
        forward().backward()

    def step():
        forward_backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), config.grad_clip)
        optimizer.step()

    return {"fwd": forward, "fwd+bwd": forward_backward, "step": step}


def train_work(flops, pass_name):
    """FLOPs of a pass from those of forward+backward: forward is a third of them (the
    backward of a matmul costs two), and the optimizer's are not counted (as MFU has it)."""
    return flops / 3 if pass_name == "fwd" else flops


def train_dtype(device):
    """The dtype the training loop's default precision computes in on the device."""
    return autocast_dtype(TrainConfig().precision, device) or torch.float32


def random_ids(shape, high, device, seed=0):
    """int64 ids in [0, high), the same in every run."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed)).to(device)
