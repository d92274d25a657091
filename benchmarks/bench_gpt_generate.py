"""GPT generation (lmkern.models.gpt, greedy, with its static KV cache) on each `kernels`
value: GPT-2 small in bf16 weights on a GPU, the tiny preset in fp32 on CPU, at batch 1
and 32. Forward only, two passes:

    decode    one step: each sequence's next token over a cache of its P prompt tokens;
              its time is the latency per token, its rate B / latency
    generate  GPT.generate(prompts, N): the prompts into the cache, then N - 1 steps
              (the headline: tokens/s over the B N new tokens, peak memory with the cache)

Memory-bound, in GB/s over the minimal bytes: a step reads every weight once (the token
embedding too, as the LM head) and the cached keys and values of its positions, so decode
moves W + KV(P + 1) and generate N W + KV(N P + N (N - 1) / 2), where W is the weights'
bytes and KV(n) = B n_layer 2 n n_embd bytes of n positions.
"""

import functools

import torch

from lmkern.models.gpt import GPT, KVCache, preset

from .bench_models import model_providers, random_ids

OP = "gpt_generate"
METRIC = "GB/s"
PASSES = ("decode", "generate")
ITEMS = "tokens"
# What a decoding step runs: attention_with_kv_cache (the prompt goes through it too),
# layer_norm (ln_1, ln_f, the ffn's) and linear_gelu (ffn).
KERNELS = ("attention_with_kv_cache", "layer_norm", "linear_gelu")
NOT_COMPILED = "generate() is a Python loop over a growing cache, which this benchmark does not compile"


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, prompt=8, new=8, vocab=1024)]
    if device == "cuda":
        return [dict(preset="gpt2", batch=batch, prompt=128, new=128, vocab=None) for batch in (1, 32)]
    return [dict(preset="tiny", batch=batch, prompt=32, new=32, vocab=None) for batch in (1, 32)]


def config(case):
    return preset(case["preset"], **({} if case["vocab"] is None else {"vocab_size": case["vocab"]}))


def label(case):
    vocab = "" if case["vocab"] is None else f" V{case['vocab']}"
    return f"{case['preset']} b{case['batch']} {case['prompt']}+{case['new']}{vocab}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


@functools.lru_cache
def weight_count(preset_name, vocab):
    """Parameters a step reads: all but the position embedding, of which it reads one row."""
    with torch.device("meta"):
        return GPT(config(dict(preset=preset_name, vocab=vocab))).num_parameters(non_embedding=True)


def items(case, pass_name):
    return case["batch"] * (case["new"] if pass_name == "generate" else 1)


def work(case, dtype, pass_name):
    model = config(case)
    weights = weight_count(case["preset"], case["vocab"]) * dtype.itemsize
    per_position = case["batch"] * model.n_layer * 2 * model.n_embd * dtype.itemsize
    prompt, new = case["prompt"], case["new"]
    if pass_name == "decode":
        return weights + per_position * (prompt + 1)
    return new * weights + per_position * (new * prompt + new * (new - 1) // 2)


def providers(device, dtype):
    return model_providers(KERNELS, device, dtype, compile_absent=NOT_COMPILED)


def pass_functions(case, provider, device, dtype):
    model, _ = provider.run(GPT, config(case), device)
    model.to(dtype).eval()
    batch, prompt = case["batch"], case["prompt"]
    prompts = random_ids((batch, prompt), model.config.vocab_size, device)
    tokens = random_ids((batch, 1), model.config.vocab_size, device, seed=1)
    cache = KVCache(model.config, batch, prompt + 1, device, dtype)
    with torch.no_grad():
        model(prompts, cache=cache)  # the prompts' keys and values, written once

    @torch.no_grad()
    def decode():
        cache.lengths.fill_(prompt)  # the same step again: the cache holds the prompts
        return model.decode(tokens, cache)  # as generate runs each step: no input checks

    return {"decode": decode, "generate": lambda: model.generate(prompts, case["new"])}
