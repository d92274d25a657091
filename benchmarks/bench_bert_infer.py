"""BERT encoder inference (lmkern.models.bert.BertModel: embeddings, encoder, pooler; eval
mode, no grad) on padded batches, as a user embeds or classifies text: a MiniLM-shaped
encoder (6 layers, width 384, 12 heads, FFN 1536, exact GELU: all-MiniLM-L6-v2's) and
BERT-base, 32 sequences of 128 tokens on CPU (256 on a GPU), about a quarter of each
sequence padding (lengths varied across the batch, attention_mask 0 there), in fp32 and
under bf16 autocast (fp32 weights; the case's last word). Forward only.

Providers: lmkern's model for each `kernels` value; transformers' BertModel with the same
weights (lmkern's, exported with to_hf_state_dict) in its "eager" and "sdpa" attention, and
torch.compile of the sdpa one (left out of --quick runs); transformers' absent with the
reason when it is not importable.

Compute-bound, in TFLOP/s over the encoder's matmuls at every position, padding included
(no provider here skips padded positions in its matmuls): per token 2 n_layer (4 H^2 + 2 H F)
for the projections and the FFN, plus 4 n_layer H L for attention's scores and weighted
sums; the embeddings and pooler are not counted. Sequences/s beside it.
"""

import functools

import torch

from lmkern.models import bert_hf
from lmkern.models.bert import BertModel, preset
from lmkern.models.train import training_autocast

from .bench_attention import PADDING, padded_lengths, padding_mask
from .bench_models import model_providers, random_ids, transformers_providers

OP = "bert_infer"
METRIC = "TFLOP/s"
PASSES = ("fwd",)
ITEMS = "sequences"
# What the encoder runs: attention (with the key-padding mask), layer_norm (the embeddings',
# add_layer_norm) and linear_gelu (ffn).
KERNELS = ("attention", "layer_norm", "linear_gelu")
SHAPES = {  # name -> (BERT preset, fields over it)
    "tiny": ("tiny", {}),
    "minilm": ("bert-base", dict(hidden_size=384, n_layer=6, n_head=12, intermediate_size=1536)),
    "bert-base": ("bert-base", {}),
}
PRECISIONS = ("fp32", "bf16")  # bf16: torch.autocast over the fp32 weights


def cases(device, quick):
    if quick:
        return [dict(shape="tiny", batch=4, length=32, precision=precision, vocab=1024) for precision in PRECISIONS]
    if device == "cuda":
        return [dict(shape=shape, batch=256, length=128, precision="bf16", vocab=None) for shape in ("minilm", "bert-base")]
    return [dict(shape=shape, batch=32, length=128, precision=precision, vocab=None)
            for shape in ("minilm", "bert-base") for precision in PRECISIONS]


def config(case):
    name, fields = SHAPES[case["shape"]]
    return preset(name, **fields, **({} if case["vocab"] is None else {"vocab_size": case["vocab"]}))


def label(case):
    vocab = "" if case["vocab"] is None else f" V{case['vocab']}"
    return f"{case['shape']} {case['batch']}x{case['length']} {case['precision']}{vocab}"


def dtype(device):
    """The weights' dtype: fp32 (the bf16 cases run under autocast over them)."""
    return torch.float32


def items(case, pass_name):
    return case["batch"]


@functools.lru_cache
def flops_per_token(shape, length):
    model = config(dict(shape=shape, vocab=None))
    width, ffn = model.hidden_size, model.intermediate_size
    return 2 * model.n_layer * (4 * width**2 + 2 * width * ffn) + 4 * model.n_layer * width * length


def work(case, dtype, pass_name):
    return flops_per_token(case["shape"], case["length"]) * case["batch"] * case["length"]


def hf_config(config):
    return bert_hf.config_to_hf(config, "BertModel")


def providers(device, dtype):
    compiled = "the compiled baseline here is transformers' sdpa model (transformers sdpa torch.compile)"
    return [*model_providers(KERNELS, device, dtype, compile_absent=compiled),
            *transformers_providers("BertModel", hf_config, compiled=True)]


def pass_functions(case, provider, device, dtype):
    model, run = provider.run(BertModel, config(case), device)
    model.eval()
    batch, length = case["batch"], case["length"]
    real = padding_mask(padded_lengths(batch, length, PADDING), length, device)  # (B, L)
    input_ids = random_ids((batch, length), model.config.vocab_size, device).masked_fill(~real, 0)  # 0: [PAD]
    inputs = dict(input_ids=input_ids, attention_mask=real.long(), token_type_ids=torch.zeros_like(input_ids))

    @torch.no_grad()
    def forward():
        with training_autocast(case["precision"], device):
            return run(**inputs)

    return {"fwd": forward}
