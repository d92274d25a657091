"""A BERT pretraining step (lmkern.models.bert.BertForPreTraining: masked-LM and
next-sentence losses) on each `kernels` value: BERT-base in bf16 autocast on a GPU, the
tiny preset in fp32 on CPU, at sequences of 128 and 512 tokens (BERT's two phases), all
real tokens, 15 % of each sequence masked, dropout 0.1 as BERT. Passes and what a step
is: benchmarks/bench_models.py.

Compute-bound, in TFLOP/s of model FLOPs (forward+backward and the step; a third for
forward), counted as GPT.flops_per_token counts them: 6 per weight per token that goes
through it (the encoder's for the B L tokens, the MLM head's and tied decoder's for the M
masked ones, the pooler's and NSP head's for the B [CLS]) plus 12 n_layer H L per token for
attention's scores and weighted sums. Its % of the device's peak is the MFU. Sequences/s
beside it.
"""

import functools

import torch

from lmkern.models.bert import BertForPreTraining, preset

from .bench_models import TRAIN_PASSES, model_providers, random_ids, train_dtype, train_work, training_passes

OP = "bert_train"
METRIC = "TFLOP/s"
PASSES = TRAIN_PASSES
ITEMS = "sequences"
# What a pretraining step runs: attention, layer_norm (add_layer_norm, the MLM head's),
# linear_gelu (ffn, the MLM head's) and cross_entropy (linear_cross_entropy, NSP).
KERNELS = ("attention", "layer_norm", "linear_gelu", "cross_entropy")
MASKED = 0.15  # of each sequence's tokens, as BERT


def cases(device, quick):
    if quick:
        return [dict(preset="tiny", batch=2, length=64, vocab=1024)]
    if device == "cuda":
        return [dict(preset="bert-base", batch=64, length=128, vocab=None),
                dict(preset="bert-base", batch=16, length=512, vocab=None)]
    return [dict(preset="tiny", batch=8, length=128, vocab=None), dict(preset="tiny", batch=2, length=512, vocab=None)]


def config(case):
    """The model of a case: its preset with BERT's 512 positions (the tiny preset has 128),
    with a smaller vocabulary for quick runs."""
    return preset(case["preset"], max_position=512, **({} if case["vocab"] is None else {"vocab_size": case["vocab"]}))


def label(case):
    vocab = "" if case["vocab"] is None else f" V{case['vocab']}"
    return f"{case['preset']} {case['batch']}x{case['length']}{vocab}"


dtype = train_dtype


def masked_per_sequence(length):
    return round(MASKED * length)


@functools.lru_cache
def weights(preset_name, vocab):
    """Weights per token: (encoder's and embedding projection's, MLM head's with the
    decoder, pooler's and NSP head's)."""
    def count(module):
        return 0 if module is None else sum(p.numel() for p in module.parameters())

    with torch.device("meta"):
        model = BertForPreTraining(config(dict(preset=preset_name, vocab=vocab)))
    bert, n_layer = model.bert, model.config.n_layer
    encoder = count(bert.layers[0]) * n_layer + count(bert.embeddings.project)
    return encoder, count(model.mlm_dense) + bert.embeddings.word.weight.numel(), count(bert.pooler) + count(model.nsp)


def items(case, pass_name):
    return case["batch"]


def work(case, dtype, pass_name):
    model = config(case)
    encoder, mlm, pooler = weights(case["preset"], case["vocab"])
    batch, length = case["batch"], case["length"]
    tokens, masked = batch * length, batch * masked_per_sequence(length)
    attention = 12 * model.n_layer * model.hidden_size * length
    flops = 6 * (tokens * encoder + masked * mlm + batch * pooler) + tokens * attention
    return train_work(flops, pass_name)


def providers(device, dtype):
    return model_providers(KERNELS, device, dtype)


def pass_functions(case, provider, device, dtype):
    model, run = provider.run(BertForPreTraining, config(case), device)
    vocab, (batch, length) = model.config.vocab_size, (case["batch"], case["length"])
    input_ids = random_ids((batch, length), vocab, device)
    # The same number of masked positions in every sequence, so that the work is known.
    order = torch.rand(batch, length, generator=torch.Generator().manual_seed(2)).argsort(1)  # a permutation per row
    masked = (order < masked_per_sequence(length)).to(device)
    labels = torch.where(masked, random_ids((batch, length), vocab, device, seed=1), -100)
    segments = (torch.arange(length, device=device) >= length // 2).long().expand(batch, length)  # A, then B
    inputs = dict(input_ids=input_ids, token_type_ids=segments, attention_mask=torch.ones_like(input_ids),
                  labels=labels, next_sentence_label=random_ids((batch,), 2, device, seed=3))
    return training_passes(model, run, inputs, device)
