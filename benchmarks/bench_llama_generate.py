"""Llama generation (lmkern.models.llama, greedy, with its static grouped-query KV cache and
rotary embeddings fused into the cache's attention) on each `kernels` value: the
Llama-3.2-1B-shaped preset in bf16 weights on a GPU, the tiny preset in fp32 on CPU, at
batch 1 and 32, beside transformers' LlamaForCausalLM with the same weights (greedy generate
with its cache, "eager" and "sdpa" attention; absent when transformers is not importable);
beside gpt_generate, with the same passes and metric
(benchmarks/bench_models.py's CausalGenerate).
"""

from lmkern.models import llama_hf
from lmkern.models.llama import Llama, preset

from .bench_models import (GENERATE_PASSES, NOT_COMPILED, CausalGenerate, generate_dtype, model_providers,
                           transformers_providers)

OP = "llama_generate"
METRIC = "GB/s"
PASSES = GENERATE_PASSES
ITEMS = "tokens"
# What a decoding step runs: attention_with_kv_cache (rotary inside; the prompt goes through
# it too), rms_norm (add_rms_norm) and swiglu (the gated FFN).
KERNELS = ("attention_with_kv_cache", "rms_norm", "swiglu")
BENCHMARK = CausalGenerate(Llama, preset)
config, label, items, work, pass_functions = (BENCHMARK.config, BENCHMARK.label, BENCHMARK.items, BENCHMARK.work,
                                              BENCHMARK.pass_functions)
dtype = generate_dtype


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, prompt=8, new=8, vocab=1024)]
    if device == "cuda":
        return [dict(preset="llama-3.2-1b", batch=batch, prompt=128, new=128, vocab=None) for batch in (1, 32)]
    return [dict(preset="tiny", batch=batch, prompt=32, new=32, vocab=8192) for batch in (1, 32)]


def providers(device, dtype):
    return [*model_providers(KERNELS, device, dtype, compile_absent=NOT_COMPILED),
            *transformers_providers("LlamaForCausalLM", llama_hf.config_to_hf)]
