"""GPT generation (lmkern.models.gpt, greedy, with its static KV cache) on each `kernels`
value, beside transformers' GPT2LMHeadModel with the same weights (greedy generate with its
cache, "eager" and "sdpa" attention; absent when transformers is not importable): GPT-2
small in bf16 weights on a GPU, the tiny preset in fp32 on CPU, at batch 1 and 32. The same
prompts and number of new tokens for every provider (transformers' generate returns the
prompts too; the rate counts the new tokens only). Forward only, two passes, decode (one step: the latency per token) and generate
(the headline: tokens/s over the B N new tokens, peak memory with the cache); memory-bound,
in GB/s over the minimal bytes: benchmarks/bench_models.py's CausalGenerate.
"""

from lmkern.models import gpt_hf
from lmkern.models.gpt import GPT, preset

from .bench_models import (GENERATE_PASSES, NOT_COMPILED, CausalGenerate, generate_dtype, model_providers,
                           transformers_providers)

OP = "gpt_generate"
METRIC = "GB/s"
PASSES = GENERATE_PASSES
ITEMS = "tokens"
# What a decoding step runs: attention_with_kv_cache (the prompt goes through it too),
# layer_norm (ln_1, ln_f, the ffn's) and linear_gelu (ffn).
KERNELS = ("attention_with_kv_cache", "layer_norm", "linear_gelu")
BENCHMARK = CausalGenerate(GPT, preset)
config, label, items, work, pass_functions = (BENCHMARK.config, BENCHMARK.label, BENCHMARK.items, BENCHMARK.work,
                                              BENCHMARK.pass_functions)
dtype = generate_dtype


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, prompt=8, new=8, vocab=1024)]
    if device == "cuda":
        return [dict(preset="gpt2", batch=batch, prompt=128, new=128, vocab=None) for batch in (1, 32)]
    return [dict(preset="tiny", batch=batch, prompt=32, new=32, vocab=None) for batch in (1, 32)]


def providers(device, dtype):
    return [*model_providers(KERNELS, device, dtype, compile_absent=NOT_COMPILED),
            *transformers_providers("GPT2LMHeadModel", gpt_hf.config_to_hf)]
