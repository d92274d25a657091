"""A GPT training step (lmkern.models.gpt) on each `kernels` value and on the reference
ops under torch.compile, beside transformers' GPT2LMHeadModel with the same weights ("eager"
and "sdpa" attention; absent when transformers is not importable; its loss over full logits,
its labels shifted inside it): GPT-2 small (124M) at context 1024 in bf16 autocast on a
GPU, the tiny preset in fp32 on CPU. Passes and what a step is: benchmarks/bench_models.py.

Compute-bound, in TFLOP/s of model FLOPs: GPT.flops_per_token() (6 N + 12 L H Q T, PaLM's
count, the backward's recomputations not counted) times B T tokens for forward+backward
and the step, a third of that for forward. Its % of the device's peak is the model FLOPs
utilisation (MFU), as GPT.estimate_mfu gives it. Tokens/s beside it: B T per call.
"""

from lmkern.models import gpt_hf
from lmkern.models.gpt import GPT, preset

from .bench_models import TRAIN_PASSES, CausalTrain, labels_call, model_providers, train_dtype, transformers_providers

OP = "gpt_train"
METRIC = "TFLOP/s"
PASSES = TRAIN_PASSES
ITEMS = "tokens"
# What a training step of GPT runs: attention, layer_norm (ln_1, ln_f, the ffn's), linear_gelu
# (ffn) and cross_entropy (linear_cross_entropy).
KERNELS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")
BENCHMARK = CausalTrain(GPT, preset)
config, label, items, work, pass_functions = (BENCHMARK.config, BENCHMARK.label, BENCHMARK.items, BENCHMARK.work,
                                              BENCHMARK.pass_functions)
dtype = train_dtype


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, length=64, vocab=1024)]
    if device == "cuda":
        return [dict(preset="gpt2", batch=batch, length=1024, vocab=None) for batch in (8, 16)]
    return [dict(preset="tiny", batch=4, length=256, vocab=None)]


def providers(device, dtype):
    return [*model_providers(KERNELS, device, dtype),
            *transformers_providers("GPT2LMHeadModel", gpt_hf.config_to_hf, call=labels_call)]
