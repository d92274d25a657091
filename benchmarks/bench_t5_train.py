"""A T5 span-corruption training step (lmkern.models.t5.T5: encoder inputs of L tokens,
decoder targets of T, as span corruption makes them: 114 for 512) on each `kernels` value
that runs the position bias with its gradient (relative_bias; one that cannot is absent,
saying why: native on CUDA) and on the reference ops under torch.compile, beside transformers'
T5ForConditionalGeneration with the same weights (its "eager" and "sdpa" attention; absent
when transformers is not importable; its loss over full logits): Flan-T5-small in bf16
autocast on a GPU, the tiny preset in fp32 on CPU. Passes and what a step is:
benchmarks/bench_models.py.

Compute-bound, in TFLOP/s of model FLOPs (forward+backward and the step; a third for
forward), counted as GPT.flops_per_token counts them: 6 per weight per token that goes
through it (the encoder's for the B L input tokens; the decoder's and the LM head's for the
B T target tokens, but the cross-attention's keys and values for the B L encoder outputs)
plus 12 x layers x heads x d_kv x keys per token for attention's scores and weighted sums
(the encoder's L keys, the decoder's T own and L encoder keys). Its % of the device's peak
is the MFU.
"""

import functools

import torch

from lmkern.backend import Call
from lmkern.models import t5_hf
from lmkern.models.t5 import T5, preset
from lmkern.ops.attention.backends import ATTENTION

from .bench_models import (TRAIN_PASSES, case_config, model_providers, random_ids, train_dtype, train_work,
                           training_passes, transformers_providers, vocab_label)
from .harness import Provider

OP = "t5_train"
METRIC = "TFLOP/s"
PASSES = TRAIN_PASSES
ITEMS = "tokens"
# What a training step of T5 runs: rms_norm (add_rms_norm), attention, swiglu (v1.1's gated
# GELU feed-forward) and cross_entropy (linear_cross_entropy).
KERNELS = ("rms_norm", "attention", "swiglu", "cross_entropy")


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, length=64, target=16, vocab=1024)]
    if device == "cuda":
        return [dict(preset="flan-t5-small", batch=batch, length=512, target=114, vocab=None) for batch in (16, 64)]
    return [dict(preset="tiny", batch=4, length=256, target=58, vocab=8192)]


def config(case):
    return case_config(preset, case)


def label(case):
    return f"{case['preset']} {case['batch']}x{case['length']}+{case['target']}{vocab_label(case)}"


dtype = train_dtype


@functools.lru_cache
def weights(preset_name, vocab):
    """Weights per token: (the encoder's, the decoder's but the cross-attention's keys and
    values, those keys and values, the LM head's), the position-bias tables (looked up, not
    multiplied) left out."""
    def count(modules):
        return sum(p.numel() for module in modules for name, p in module.named_parameters()
                   if "relative_attention_bias" not in name)

    with torch.device("meta"):
        model = T5(config(dict(preset=preset_name, vocab=vocab)))
    cross = [linear for block in model.decoder.block for linear in (block.layer[1].EncDecAttention.k,
                                                                     block.layer[1].EncDecAttention.v)]
    return count([model.encoder]), count([model.decoder.block]) - count(cross), count(cross), count([model.lm_head])


def items(case, pass_name):
    return case["batch"] * (case["length"] + case["target"])


def work(case, dtype, pass_name):
    c = config(case)
    encoder, decoder, cross, head = weights(case["preset"], case["vocab"])
    inputs, targets = case["batch"] * case["length"], case["batch"] * case["target"]
    inner = c.num_heads * c.d_kv
    attention = (inputs * 12 * c.num_layers * inner * case["length"]
                 + targets * 12 * c.num_decoder_layers * inner * (case["target"] + case["length"]))
    flops = 6 * (inputs * (encoder + cross) + targets * (decoder + head)) + attention
    return train_work(flops, pass_name)


def providers(device, dtype):
    """model_providers, those whose attention cannot run the position bias with its gradient
    (relative_bias, beside the encoder's key padding) absent, then transformers'."""
    # flan-t5-small's heads; the tiny preset's differ, but no backend's limit on the bias reads them
    padding = torch.ones(1, 1, 1, 8, dtype=torch.bool, device=device)
    bias_gradient = Call(device, dtype, head_dims=(64, 64), mask=padding, mask_grad=False, dropout_p=0.0,
                         relative_bias=True, windowed=False, backward=True)
    ours = []
    for provider in model_providers(KERNELS, device, dtype):
        kernels = provider.name.removeprefix("lmkern ")
        reason = None if provider.absent or kernels not in ATTENTION.backends else (
            ATTENTION.unavailable(kernels, bias_gradient))
        ours.append(Provider(provider.name, absent=reason) if reason else provider)
    return [*ours, *transformers_providers("T5ForConditionalGeneration", t5_hf.config_to_hf)]


def pass_functions(case, provider, device, dtype):
    model, run = provider.run(T5, config(case), device)
    vocab, batch = model.config.vocab_size, case["batch"]
    input_ids = random_ids((batch, case["length"]), vocab, device)
    inputs = dict(input_ids=input_ids, attention_mask=torch.ones_like(input_ids),
                  labels=random_ids((batch, case["target"]), vocab, device, seed=1))
    return training_passes(model, run, inputs, device)
