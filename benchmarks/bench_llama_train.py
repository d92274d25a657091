"""A Llama training step (lmkern.models.llama) on each `kernels` value and on the reference
ops under torch.compile, beside transformers' LlamaForCausalLM with the same weights ("eager"
and "sdpa" attention; absent when transformers is not importable; its loss over full
logits): the Llama-3.2-1B-shaped preset at context 2048 in bf16 autocast on
a GPU, the tiny preset in fp32 on CPU; beside gpt_train, with the same passes and metric
(benchmarks/bench_models.py's CausalTrain: TFLOP/s of Llama.flops_per_token() times B T).
"""

from lmkern.models import llama_hf
from lmkern.models.llama import Llama, preset

from .bench_models import TRAIN_PASSES, CausalTrain, labels_call, model_providers, train_dtype, transformers_providers

OP = "llama_train"
METRIC = "TFLOP/s"
PASSES = TRAIN_PASSES
ITEMS = "tokens"
# What a training step of Llama runs: rms_norm (add_rms_norm), apply_rotary, attention,
# swiglu (the gated FFN) and cross_entropy (linear_cross_entropy).
KERNELS = ("rms_norm", "apply_rotary", "attention", "swiglu", "cross_entropy")
BENCHMARK = CausalTrain(Llama, preset)
config, label, items, work, pass_functions = (BENCHMARK.config, BENCHMARK.label, BENCHMARK.items, BENCHMARK.work,
                                              BENCHMARK.pass_functions)
dtype = train_dtype


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, length=64, vocab=1024)]
    if device == "cuda":
        return [dict(preset="llama-3.2-1b", batch=batch, length=2048, vocab=None) for batch in (2, 4)]
    return [dict(preset="tiny", batch=4, length=256, vocab=8192)]


def providers(device, dtype):
    return [*model_providers(KERNELS, device, dtype),
            *transformers_providers("LlamaForCausalLM", llama_hf.config_to_hf, call=labels_call)]
