"""What the model-level benchmarks (bench_gpt_train.py, bench_gpt_generate.py,
bench_llama_train.py, bench_llama_generate.py, bench_bert_train.py, bench_bert_infer.py,
bench_t5_train.py) share: a provider per `kernels` value of lmkern's models, torch.compile
of the model on the reference ops, transformers' model of the same architecture with the same weights, the
passes of a training step, and the case functions of a decoder's training and generation
benchmarks (CausalTrain, CausalGenerate).

A provider's run builds the model for a case: run(model_class, config, device) returns
(model, the callable to run it: the model itself, or its torch.compile). Every provider
builds its model from the same seed, so all start from the same weights (transformers'
models get lmkern's, through to_hf_state_dict).

A training step is what lmkern.models.train takes per micro-batch: forward under bf16
autocast on a GPU (fp32 weights), backward, gradient clipping, then the training loop's
fused AdamW and zero_grad(set_to_none=True). Its passes:

    fwd      forward and the loss (in train mode, recording the graph for backward)
    fwd+bwd  forward and backward, gradients freed before it (as after zero_grad)
    step     the whole step: forward, backward, clipping, AdamW
"""

import dataclasses
import functools
import inspect
import math

import torch

from lmkern import backend
from lmkern.models.train import TrainConfig, autocast_dtype, optimizer_for, training_autocast

from .harness import Provider, backend_unavailable

TRAIN_PASSES = ("fwd", "fwd+bwd", "step")
GENERATE_PASSES = ("decode", "generate")
NOT_COMPILED = "generate() is a Python loop over a growing cache, which this benchmark does not compile"
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


def build_transformers(model_class, config, device, *, hf_class, hf_config, implementation, call=None,
                       compiled=False):
    """(transformers' model `hf_class` with the weights lmkern's model_class gets from seed 0
    (exported with its to_hf_state_dict), the callable that runs it): its attention
    `implementation` ("eager", "sdpa"), its config hf_config(config), a dict of Hugging
    Face's config.json; call(hf_model) adapts the model to how the benchmark calls lmkern's
    (default: the model itself)."""
    import transformers

    ours, _ = build(model_class, config, device, kernels="torch")
    their_config = transformers.AutoConfig.for_model(**hf_config(ours.config), attn_implementation=implementation)
    with torch.device(device):
        theirs = getattr(transformers, hf_class)(their_config)
    theirs.load_state_dict(ours.to_hf_state_dict())
    run = theirs if call is None else call(theirs)
    return theirs, (torch.compile(run, dynamic=False) if compiled else run)


def labels_call(model):
    """A transformers causal LM called as the training step calls lmkern's: input_ids and
    targets (its labels, which it shifts by one itself) -> an output with .loss."""
    return lambda input_ids, targets: model(input_ids=input_ids, labels=targets)


def transformers_providers(hf_class, hf_config, *, call=None, compiled=False):
    """Providers "transformers eager" and "transformers sdpa" (build_transformers: the same
    weights as lmkern's), and with `compiled` "transformers sdpa torch.compile" (left out of
    --quick runs); each absent with the reason when transformers is not importable."""
    implementations = [("eager", False), ("sdpa", False)] + ([("sdpa", True)] if compiled else [])
    names = [f"transformers {name}{' torch.compile' if compile else ''}" for name, compile in implementations]
    try:
        import transformers

        transformers.logging.set_verbosity_error()  # random configs' notes on special tokens
    except ImportError as error:
        return [Provider(name, absent=f"transformers is not importable ({error})") for name in names]
    return [
        Provider(name, functools.partial(build_transformers, hf_class=hf_class, hf_config=hf_config,
                                         implementation=implementation, call=call, compiled=compile),
                 slow=COMPILE_SLOW if compile else None)
        for name, (implementation, compile) in zip(names, implementations)
    ]


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


def generate_dtype(device):
    """What the generation benchmarks run in: bf16 weights on a GPU, fp32 on CPU."""
    return torch.bfloat16 if device == "cuda" else torch.float32


def train_dtype(device):
    """The dtype the training loop's default precision computes in on the device."""
    return autocast_dtype(TrainConfig().precision, device) or torch.float32


def random_ids(shape, high, device, seed=0):
    """int64 ids in [0, high), the same in every run."""
    return torch.randint(0, high, shape, generator=torch.Generator().manual_seed(seed)).to(device)


def case_config(preset, case, **fields):
    """The model config of a case: preset(case's preset, **fields), with the case's
    vocabulary if it sets one (quick runs take a small one)."""
    vocab = {} if case["vocab"] is None else {"vocab_size": case["vocab"]}
    return preset(case["preset"], **fields, **vocab)


def vocab_label(case):
    return "" if case["vocab"] is None else f" V{case['vocab']}"


@dataclasses.dataclass(frozen=True)
class CausalTrain:
    """The case functions of a decoder's training-step benchmark (a CausalLM with
    flops_per_token()): cases are dicts of preset, batch, length and vocab (None: the
    preset's). Compute-bound, in TFLOP/s of model FLOPs: flops_per_token() times B T tokens
    for forward+backward and the step, a third of that for forward."""

    model_class: type
    preset: object  # preset(name, **fields) -> config

    def config(self, case):
        """The case's preset at context `length`, so that flops_per_token counts attention there."""
        return case_config(self.preset, case, context_length=case["length"])

    def label(self, case):
        return f"{case['preset']} {case['batch']}x{case['length']}{vocab_label(case)}"

    @functools.lru_cache
    def flops_per_token(self, preset_name, length, vocab):
        with torch.device("meta"):  # sizes only, no memory
            return self.model_class(self.config(dict(preset=preset_name, length=length, vocab=vocab))).flops_per_token()

    def items(self, case, pass_name):
        return case["batch"] * case["length"]

    def work(self, case, dtype, pass_name):
        flops = self.flops_per_token(case["preset"], case["length"], case["vocab"]) * self.items(case, pass_name)
        return train_work(flops, pass_name)

    def pass_functions(self, case, provider, device, dtype):
        model, run = provider.run(self.model_class, self.config(case), device)
        vocab, shape = model.config.vocab_size, (case["batch"], case["length"])
        batch = dict(input_ids=random_ids(shape, vocab, device), targets=random_ids(shape, vocab, device, seed=1))
        return training_passes(model, run, batch, device)


def weights_read_per_step(model):
    """Parameters a decoding step reads in full: all but the embedding tables, of which it
    reads a row each (a table tied to the LM head is read in full as the head)."""
    read = {id(p): p for module in model.modules() if not isinstance(module, torch.nn.Embedding)
            for p in module.parameters(recurse=False)}
    return sum(p.numel() for p in read.values())


@dataclasses.dataclass(frozen=True)
class CausalGenerate:
    """The case functions of a decoder's generation benchmark (greedy, over its static KV
    cache): cases are dicts of preset, batch, prompt, new and vocab. Two passes, forward only:

        decode    one step: each sequence's next token over a cache of its P prompt tokens;
                  its time is the latency per token, its rate B / latency
        generate  model.generate(prompts, N): the prompts into the cache, then N - 1 steps

    Memory-bound, in GB/s over the minimal bytes: a step reads every weight once (see
    weights_read_per_step) and the cached keys and values of its positions, so decode moves
    W + KV(P + 1) and generate N W + KV(N P + N (N - 1) / 2), where W is the weights' bytes
    and KV(n) the bytes of n positions' keys and values in every layer."""

    model_class: type
    preset: object

    def config(self, case):
        return case_config(self.preset, case)

    def label(self, case):
        return f"{case['preset']} b{case['batch']} {case['prompt']}+{case['new']}{vocab_label(case)}"

    @functools.lru_cache
    def sizes(self, preset_name, vocab):
        """(weights a step reads, elements of one position's keys and values in every layer)."""
        with torch.device("meta"):
            model = self.model_class(self.config(dict(preset=preset_name, vocab=vocab)))
        return weights_read_per_step(model), 2 * math.prod(model.cache_layout())

    def items(self, case, pass_name):
        return case["batch"] * (case["new"] if pass_name == "generate" else 1)

    def work(self, case, dtype, pass_name):
        weights, position = (count * dtype.itemsize for count in self.sizes(case["preset"], case["vocab"]))
        per_position = case["batch"] * position
        prompt, new = case["prompt"], case["new"]
        if pass_name == "decode":
            return weights + per_position * (prompt + 1)
        return new * weights + per_position * (new * prompt + new * (new - 1) // 2)

    def pass_functions(self, case, provider, device, dtype):
        model, _ = provider.run(self.model_class, self.config(case), device)
        model.to(dtype).eval()
        batch, prompt = case["batch"], case["prompt"]
        prompts = random_ids((batch, prompt), model.config.vocab_size, device)
        tokens = random_ids((batch, 1), model.config.vocab_size, device, seed=1)
        if not isinstance(model, self.model_class):  # transformers' (transformers_providers)
            return transformers_generate_passes(model, prompts, tokens, case["new"])
        cache = model.new_cache(batch, prompt + 1)  # in the weights' dtype, as model.to(dtype) set
        with torch.no_grad():
            model(prompts, cache=cache)  # the prompts' keys and values, written once

        @torch.no_grad()
        def decode():
            cache.lengths.fill_(prompt)  # the same step again: the cache holds the prompts
            return model.decode(tokens, cache)  # as generate runs each step: no input checks

        return {"decode": decode, "generate": lambda: model.generate(prompts, case["new"])}


def transformers_generate_passes(model, prompts, tokens, new):
    """CausalGenerate's passes for a transformers causal LM: decode, one step of `tokens`
    over its cache (a DynamicCache) of the prompts, cropped back to them after each step;
    generate, model.generate(prompts) greedy with its cache for exactly `new` tokens (no
    end-of-sequence token is set), which returns the prompts before them."""
    with torch.no_grad():
        output = model(prompts, use_cache=True)
    # The cache's name: "cache" in transformers 5.2x, "past_key_values" before.
    name = "cache" if "cache" in inspect.signature(model.forward).parameters else "past_key_values"
    cache = output[name]

    @torch.no_grad()
    def decode():
        logits = model(tokens, use_cache=True, **{name: cache}).logits
        cache.crop(-tokens.shape[1])  # back to the prompts
        return logits

    def generate():
        return model.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=new, do_sample=False,
                              use_cache=True, pad_token_id=0)

    return {"decode": decode, "generate": generate}
