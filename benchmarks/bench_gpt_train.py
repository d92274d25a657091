"""A GPT training step (lmkern.models.gpt) on each `kernels` value and on the reference
ops under torch.compile: GPT-2 small (124M) at context 1024 in bf16 autocast on a GPU, the
tiny preset in fp32 on CPU. Passes and what a step is: benchmarks/bench_models.py.

Compute-bound, in TFLOP/s of model FLOPs: GPT.flops_per_token() (6 N + 12 L H Q T, PaLM's
count, the backward's recomputations not counted) times B T tokens for forward+backward
and the step, a third of that for forward. Its % of the device's peak is the model FLOPs
utilisation (MFU), as GPT.estimate_mfu gives it. Tokens/s beside it: B T per call.
"""

import functools

import torch

from lmkern.models.gpt import GPT, preset

from .bench_models import TRAIN_PASSES, model_providers, random_ids, train_dtype, train_work, training_passes

OP = "gpt_train"
METRIC = "TFLOP/s"
PASSES = TRAIN_PASSES
ITEMS = "tokens"
# What a training step of GPT runs: attention, layer_norm (ln_1, ln_f, the ffn's), linear_gelu
# (ffn) and cross_entropy (linear_cross_entropy).
KERNELS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, length=64, vocab=1024)]
    if device == "cuda":
        return [dict(preset="gpt2", batch=batch, length=1024, vocab=None) for batch in (8, 16)]
    return [dict(preset="tiny", batch=4, length=256, vocab=None)]


def config(case):
    """The model of a case: its preset at context `length` (so that flops_per_token counts
    attention at that length), with a smaller vocabulary for quick runs."""
    vocab = {} if case["vocab"] is None else {"vocab_size": case["vocab"]}
    return preset(case["preset"], context_length=case["length"], **vocab)


def label(case):
    vocab = "" if case["vocab"] is None else f" V{case['vocab']}"
    return f"{case['preset']} {case['batch']}x{case['length']}{vocab}"


dtype = train_dtype


@functools.lru_cache
def flops_per_token(preset_name, length, vocab):
    with torch.device("meta"):  # sizes only, no memory
        return GPT(config(dict(preset=preset_name, length=length, vocab=vocab))).flops_per_token()


def items(case, pass_name):
    return case["batch"] * case["length"]


def work(case, dtype, pass_name):
    flops = flops_per_token(case["preset"], case["length"], case["vocab"]) * items(case, pass_name)
    return train_work(flops, pass_name)


def providers(device, dtype):
    return model_providers(KERNELS, device, dtype)


def pass_functions(case, provider, device, dtype):
    model, run = provider.run(GPT, config(case), device)
    vocab, shape = model.config.vocab_size, (case["batch"], case["length"])
    batch = dict(input_ids=random_ids(shape, vocab, device), targets=random_ids(shape, vocab, device, seed=1))
    return training_passes(model, run, batch, device)
