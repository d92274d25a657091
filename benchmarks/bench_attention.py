"""Attention (B, H, L, D), causal and not, with a sliding window, with a key-padding mask
(BERT's padded batches) and with grouped-query heads (GQA): lmkern's backends against each
SDPA backend of torch (flash, memory-efficient, cuDNN, math; each absent with its reason
where it cannot run a kind of case), torch.compile of the math, and flash-attn.

Compute-bound, in TFLOP/s over the two matmuls of forward: 4 B H L^2 D, halved when
causal; backward 2.5x forward (five matmuls, one of them recomputing the scores);
forward+backward 3.5x. With a sliding window the work is 4 B H D times the (query, key)
pairs inside it; its cases keep the window fixed over several L, so that kernels which
skip the key blocks outside it show a time linear in L (a constant TFLOP/s), where torch's,
given the window as a dense mask, stay quadratic. With key padding (a boolean (B, 1, 1, L)
mask, the same for every provider, about a quarter of each sequence padded) the work is
counted over the real keys only, 4 H D L sum_b n_b for sequences of n_b real tokens: what
a kernel that skips padded keys need not compute. GQA changes no count: every query head
attends over L keys. With a learned bias (T5's relative position bias: a float (1, H, L, L)
mask that requires grad, broadcast over the batch, not causal) backward also computes the
bias's gradient, summed over the batch; the work counted is the same. A case whose last
word is bf16 runs in bf16 whatever the op's dtype. lmkern's kernels
also run those cases given the bias as T5's model does, per distance ((H, 2L - 1),
relative_bias: added in the kernels, its gradient summed there, no (H, L, L) tensor).
"""

import dataclasses
import functools
import math
import warnings

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "attention"
METRIC = "TFLOP/s"
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")


NO_WINDOW = (-1, -1)
PADDING = 0.25  # of each padded case's tokens, on average


def window_cases(heads, head_dim, seqlens, left):
    """Mistral-style sliding windows (causal, `left` keys before each query) of one fixed
    size at lengths `seqlens`, one sequence each: the time should grow linearly in L."""
    return [
        dict(batch=1, heads=heads, seqlen=seqlen, head_dim=head_dim, causal=True, window=(left, 0))
        for seqlen in seqlens
    ]


def cpu_case(seqlen, head_dim, causal, heads=8, tokens=2048, **kind):
    """A CPU case of `tokens` tokens per batch (2048: the batch shrinks as L grows, so that
    the time grows linearly in L), `heads` query heads; kind: kv_heads (GQA), padding, bias,
    precision ("bf16": inputs in bf16)."""
    return dict(batch=max(1, tokens // seqlen), heads=heads, seqlen=seqlen, head_dim=head_dim, causal=causal, **kind)


def cases(device, quick):
    if quick:
        return [dict(batch=2, heads=4, seqlen=128, head_dim=64, causal=causal) for causal in (False, True)] + (
            window_cases(4, 64, (128, 256), 31)
        ) + [
            dict(batch=2, heads=4, seqlen=128, head_dim=80, causal=True),
            dict(batch=4, heads=4, seqlen=128, head_dim=64, causal=False, padding=PADDING),
            dict(batch=2, heads=8, kv_heads=2, seqlen=128, head_dim=64, causal=True),
            dict(batch=2, heads=4, seqlen=128, head_dim=64, causal=False, bias=True),
        ]
    if device == "cuda":  # 16k tokens per batch and model width 2048, as flash-attention's benchmarks
        return [
            dict(batch=16384 // seqlen, heads=2048 // head_dim, seqlen=seqlen, head_dim=head_dim, causal=causal)
            for head_dim in (64, 128)
            for seqlen in (512, 1024, 2048, 4096, 8192, 16384)
            for causal in (False, True)
        ] + window_cases(16, 128, (4096, 8192, 16384, 32768), 1023) + [
            dict(batch=16384 // seqlen, heads=16, seqlen=seqlen, head_dim=64, causal=False, bias=True)
            for seqlen in (512, 2048)  # T5's learned position bias, at t5-large's heads
        ]
    # What users' models run, kept to a few minutes on a small CPU: head dims 64 and 128
    # causal and not over L; 32 (MiniLM's encoder, not causal), 80 and 96 (Phi-2's and
    # Phi-3's decoders, causal), all at 8 heads to compare; BERT-base's padded batches (12
    # heads, 32 x 128 and 4 x 512); Llama-3.2-1B's grouped heads (32 query heads over 8);
    # t5-small's encoder with its learned position bias (8 heads, 16 x 128 and 4 x 512); bf16
    # inputs (the case's last word) at head dims 32 and 64 and BERT's padded batch; L 4096;
    # batch x heads from 1 (one head of 2048 tokens) to 512 (64 x 8 heads of 128 tokens).
    return [
        *(cpu_case(seqlen, 64, causal) for seqlen in (128, 512, 2048) for causal in (False, True)),
        *(cpu_case(512, 128, causal) for causal in (False, True)),
        cpu_case(512, 32, False),
        cpu_case(512, 80, True),
        cpu_case(512, 96, True),
        cpu_case(128, 64, False, heads=12, tokens=4096, padding=PADDING),
        cpu_case(512, 64, False, heads=12, padding=PADDING),
        *(cpu_case(seqlen, 64, True, heads=32, tokens=seqlen, kv_heads=8) for seqlen in (512, 1024)),
        *(cpu_case(seqlen, 64, False, bias=True) for seqlen in (128, 512)),
        *(cpu_case(512, 64, causal, precision="bf16") for causal in (False, True)),
        cpu_case(512, 32, False, precision="bf16"),
        cpu_case(128, 64, False, heads=12, tokens=4096, padding=PADDING, precision="bf16"),
        cpu_case(4096, 64, True, tokens=4096),
        cpu_case(2048, 64, False, heads=1),
        cpu_case(128, 64, False, tokens=8192),
    ] + window_cases(8, 64, (512, 1024, 2048), 127)


def label(case):
    heads = f"{case['heads']}/{case['kv_heads']}" if "kv_heads" in case else case["heads"]
    causal = " causal" if case["causal"] else ""
    window = case.get("window", NO_WINDOW)
    windowed = f" window {window}" if window != NO_WINDOW else ""
    padded = f" padding {case['padding']:.0%}" if "padding" in case else ""
    bias = " bias" if case.get("bias") else ""
    precision = f" {case['precision']}" if "precision" in case else ""
    return f"{case['batch']}x{heads}x{case['seqlen']}x{case['head_dim']}{causal}{windowed}{padded}{bias}{precision}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def padded_lengths(batch, seqlen, padding):
    """Real tokens of each of `batch` sequences padded to seqlen: padded by fractions spread
    evenly from 0.4x to 1.6x `padding` (their mean), so that the lengths vary as in a real
    batch (bench_bert_infer.py's batches too)."""
    fractions = torch.linspace(0.4 * padding, 1.6 * padding, batch) if batch > 1 else torch.tensor([padding])
    return [seqlen - round(seqlen * float(fraction)) for fraction in fractions]


def padding_mask(lengths, seqlen, device):
    """(B, L) bool, True on each sequence's real tokens (its first n_b, for n_b in lengths)."""
    return torch.arange(seqlen, device=device) < torch.tensor(lengths, device=device)[:, None]


def real_lengths(case):
    return padded_lengths(case["batch"], case["seqlen"], case["padding"])


def key_padding_mask(case, device):
    """(B, 1, 1, L) bool, True on each sequence's real tokens, or None for a case without padding."""
    return padding_mask(real_lengths(case), case["seqlen"], device)[:, None, None, :] if "padding" in case else None


def make_inputs(case, device, dtype):
    """q (B, H, L, D), k and v (B, H_kv, L, D), causal, window, and the mask: the key
    padding (B, 1, 1, L) bool, a learned bias (1, H, L, L) requiring grad, or None. In bf16
    for a case of that precision, else in `dtype`."""
    dtype = torch.bfloat16 if case.get("precision") == "bf16" else dtype
    batch, heads, seqlen, head_dim = case["batch"], case["heads"], case["seqlen"], case["head_dim"]
    q = torch.randn(batch, heads, seqlen, head_dim, device=device, dtype=dtype, requires_grad=True)
    kv_shape = (batch, case.get("kv_heads", heads), seqlen, head_dim)
    k, v = (torch.randn(kv_shape, device=device, dtype=dtype, requires_grad=True) for _ in range(2))
    if case.get("bias"):
        mask = torch.randn(1, heads, seqlen, seqlen, device=device, dtype=dtype, requires_grad=True)
    else:
        mask = key_padding_mask(case, device)
    return q, k, v, case["causal"], case.get("window", NO_WINDOW), mask


def window_pairs(seqlen, causal, window):
    """The (query, key) pairs that a sliding window (left, right) lets attend."""
    left, right = window
    right = 0 if causal else right
    return sum(
        min(seqlen - 1, i + right if right >= 0 else seqlen) - max(0, i - left if left >= 0 else 0) + 1
        for i in range(seqlen)
    )


def work(case, dtype, pass_name):
    window = case.get("window", NO_WINDOW)
    if window != NO_WINDOW:
        pairs = window_pairs(case["seqlen"], case["causal"], window)
        forward = 4 * case["batch"] * case["heads"] * pairs * case["head_dim"]
    else:
        keys = sum(real_lengths(case)) if "padding" in case else case["batch"] * case["seqlen"]
        forward = 4 * case["heads"] * case["seqlen"] * keys * case["head_dim"]
        if case["causal"]:
            forward //= 2
    return {"fwd": forward, "bwd": 2.5 * forward, "fwd+bwd": 3.5 * forward}[pass_name]


@functools.lru_cache(maxsize=4)
def visible_mask(seqlen, causal, window, device):
    """(L, L) boolean: which keys each query sees, causal and within the window."""
    left, right = window
    offset = torch.arange(seqlen, device=device)[None, :] - torch.arange(seqlen, device=device)[:, None]  # j - i
    visible = torch.ones(seqlen, seqlen, dtype=torch.bool, device=device)
    if causal:
        visible &= offset <= 0
    if left >= 0:
        visible &= offset >= -left
    if right >= 0:
        visible &= offset <= right
    return visible


def is_gqa(q, k):
    return q.shape[1] != k.shape[1]


def math_attention(q, k, v, causal, window, mask):
    """softmax(q k^T / sqrt(D) + mask) v written out in torch ops, as eager code would (GQA's
    key and value heads repeated, as transformers' repeat_kv; a boolean mask as -inf)."""
    if is_gqa(q, k):
        k, v = (t.repeat_interleave(q.shape[1] // k.shape[1], dim=1) for t in (k, v))
    scores = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])
    if causal or window != NO_WINDOW:
        scores = scores.masked_fill(~visible_mask(q.shape[-2], causal, window, q.device), float("-inf"))
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return torch.softmax(scores.float(), dim=-1).to(q.dtype) @ v


def lmkern_attention(q, k, v, causal, window, mask, backend):
    return lmkern.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, window_size=window,
                                               enable_gqa=is_gqa(q, k), backend=backend)


@functools.lru_cache(maxsize=4)
def relative_bias(heads, seqlen, device, dtype):
    """T5's form of a learned bias: one value per head and distance, (H, 2L - 1), requiring grad."""
    return torch.randn(heads, 2 * seqlen - 1, device=device, dtype=dtype, requires_grad=True)


def lmkern_relative_attention(q, k, v, causal, window, mask, backend):
    """The bias cases with the bias per distance (relative_bias, added in the kernels and its
    gradient summed there) in place of the case's (1, H, L, L) tensor."""
    bias = relative_bias(q.shape[1], q.shape[2], q.device, q.dtype)
    return lmkern.scaled_dot_product_attention(q, k, v, is_causal=causal, window_size=window, relative_bias=bias,
                                               backend=backend)


def relative_providers(device, dtype):
    """lmkern's kernel backends on the bias cases given the bias per distance."""
    only_for = (lambda case: case.get("bias", False), "relative_bias stands for a learned bias: the bias cases only")
    return [dataclasses.replace(provider, name=f"{provider.name} relative_bias", only_for=only_for)
            for provider in lmkern_providers(OP, device, dtype, lmkern_relative_attention)
            if provider.name in ("lmkern triton", "lmkern native")]


def case_kind(case):
    """What decides whether an SDPA backend can run a case: its head dim, causal, window,
    key padding, GQA, a learned bias and the precision."""
    return (case["head_dim"], case["causal"], case.get("window", NO_WINDOW) != NO_WINDOW, "padding" in case,
            "kv_heads" in case, case.get("bias", False), case.get("precision"))


def probe_case(case):
    """A small case of the same kind: two sequences of 64 tokens, two key/value heads."""
    window = case.get("window", NO_WINDOW)
    kind = dict(kv_heads=2, heads=4) if "kv_heads" in case else dict(heads=2)
    return dict(case, batch=2, seqlen=64, **kind, **({"window": (min(window[0], 31), window[1])}
                                                      if window != NO_WINDOW else {}))


def sdpa_provider(name, device, dtype):
    """torch's SDPA restricted to one of its backends, given the same mask (a key padding
    combined with the window's as a dense mask, or the learned bias) and enable_gqa: absent
    if it cannot run a small causal forward and backward here, and for the kinds of case
    (case_kind) that it cannot run (the reason is torch's)."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    backend = getattr(SDPBackend, name)

    def run(q, k, v, causal, window=NO_WINDOW, mask=None):
        if window != NO_WINDOW or (causal and mask is not None):  # one dense mask: SDPA has no window
            mask = visible_mask(q.shape[-2], causal, window, q.device) & (True if mask is None else mask)
        with sdpa_kernel(backend):
            return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal and mask is None,
                                                  enable_gqa=is_gqa(q, k))

    def cannot_run(inputs):
        """torch's reason why the backend cannot run forward and backward on inputs, or None."""
        try:
            with warnings.catch_warnings():  # torch warns why each backend it skips cannot run
                warnings.simplefilter("ignore")
                run(*inputs).sum().backward()
        except RuntimeError as error:
            return f"cannot run here: {str(error).splitlines()[0]}"
        return None

    probed = {}  # case_kind -> reason or None

    def reason(case):
        kind = case_kind(case)
        if kind not in probed:
            probed[kind] = cannot_run(make_inputs(probe_case(case), device, dtype))
        return probed[kind]

    provider_name = f"sdpa {name.lower()}"
    probe = torch.randn(1, 1, 64, 64, device=device, dtype=dtype, requires_grad=True)
    absent = cannot_run((probe, probe, probe, True))
    if absent:
        return Provider(provider_name, absent=absent)
    return Provider(provider_name, run, only_for=(lambda case: reason(case) is None, reason))


def _flash_attn():
    from flash_attn import flash_attn_func

    def run(q, k, v, causal, window, mask):  # flash-attn's layout is (B, L, H, D); GQA as it is
        out = flash_attn_func(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), causal=causal, window_size=window)
        return out.transpose(1, 2)

    return run


def providers(device, dtype):
    return [
        *(sdpa_provider(name, device, dtype) for name in SDPA_BACKENDS),
        compiled_provider(math_attention),
        *lmkern_providers(OP, device, dtype, lmkern_attention),
        *relative_providers(device, dtype),
        dataclasses.replace(optional_provider("flash_attn", device, _flash_attn), only_for=(
            lambda case: "padding" not in case and not case.get("bias"),
            "flash_attn_func takes no mask (padded batches go through flash_attn_varlen_func, not timed here) "
            "and no learned bias")),
    ]
