"""Compile every Triton kernel of lmkern ahead of time for sm_90 and sm_80, without a GPU
(`make triton-check`; CI runs it with the default triton and with the GPU machine's).

Triton's interpreter, which the CPU tests use, runs code that the compiler rejects and
knows no shared-memory or register limit; this check is what the compiler says. For each
case below (an op's host launchers at a representative shape and dtype) the launchers run
on CPU tensors with their kernels swapped for recorders, so the launches recorded are the
ones a GPU call makes, with the same arguments and constexprs. Each launch is bound as
Triton's runtime binds it (argument types, divisibility and constant specialisation); an
autotuned kernel's own pruner (lmkern/ops/triton_tuning.py) picks the configs it could
pick within the target's shared memory; and each is compiled with triton.compile for
GPUTarget("cuda", arch, 32), the way triton/tools/compile.py compiles ahead of time.
ptxas's report gives registers and spills, the compiled kernel its shared memory, and its
PTX the instructions used. Identical compiles (same kernel, specialisation and options)
run once.

Fails (exit status 1) on: a compile error; a config the pruner keeps whose shared memory
is over the target's limit (sm_90 227 KiB, sm_80 163 KiB); spills in a kept config; and,
before compiling, attention calls where the Triton backend's limit and the pruners disagree
(a call it takes that no config fits, or one it refuses that fits).
Writes DIR/triton-<version>-sm_<arch>.md: every (kernel, case, config) with registers,
shared memory, spills, whether wgmma / mma / cp.async / TMA (cp.async.bulk.tensor) are in
the PTX, ptxas's wgmma-serialisation warning, and compile time per kernel.

    python scripts/triton_check.py [--arch 90 80] [--jobs 2] [--out DIR] [--all-configs]

--all-configs compiles the configs the pruner drops too (marked "pruned"), to see what
pruning saves; they do not fail the check.
"""

import argparse
import concurrent.futures
import contextlib
import dataclasses
import io
import itertools
import multiprocessing
import os
import re
import sys
import tempfile
import time
import unittest.mock

# Before triton is imported: compile kernels (not interpret them), print ptxas's report,
# and compile each kernel afresh in a cache of this run's own.
os.environ.pop("TRITON_INTERPRET", None)
os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
os.environ["TRITON_ALWAYS_COMPILE"] = "1"
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # triton 3.9's default, without its warning
os.environ["TRITON_CACHE_DIR"] = tempfile.mkdtemp(prefix="lmkern-triton-check-")

import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.compiler import ASTSource, make_backend  # noqa: E402
from triton.runtime.autotuner import Autotuner  # noqa: E402
from triton.runtime.jit import JITFunction, create_function_from_signature  # noqa: E402

from lmkern.backend import Call  # noqa: E402
from lmkern.benchmarks.harness import stamp  # noqa: E402
from lmkern.ops.apply_rotary import triton_kernels as apply_rotary  # noqa: E402
from lmkern.ops.attention import triton_kernels as attention  # noqa: E402
from lmkern.ops.attention.backends import triton_limit  # noqa: E402
from lmkern.ops.attention_with_kv_cache import triton_kernels as attention_with_kv_cache  # noqa: E402
from lmkern.ops.cross_entropy import triton_kernels as cross_entropy  # noqa: E402
from lmkern.ops.layer_norm import triton_kernels as layer_norm  # noqa: E402
from lmkern.ops.linear_gelu import triton_kernels as linear_gelu  # noqa: E402
from lmkern.ops.swiglu import triton_kernels as swiglu  # noqa: E402
from lmkern.ops.triton_tuning import Target  # noqa: E402

MODULES = (apply_rotary, attention, attention_with_kv_cache, cross_entropy, layer_norm, linear_gelu, swiglu)
# The shared memory a program may use: cudaDevAttrMaxSharedMemoryPerBlockOptin.
SHARED_MEMORY_LIMIT = {90: 227 * 1024, 80: 163 * 1024}
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


# The cases: (op, shape label, function calling the op's host launchers on CPU tensors).
ATTENTION_MASKS = (None, "key padding", "additive", "bias", "key bias", "relative", "relative padding")


def attention_masks(mask, dtype, length):
    """(attn_mask, relative_bias) for B 2, H 16, Lq = Lk = length, as the kernels get them.
    mask: None, "key padding" (BERT's: (B, 1, 1, Lk) bool, broadcast), "additive" (Lq, Lk),
    with its gradient "bias" (T5's (1, H, Lq, Lk)) or "key bias" (B, 1, 1, Lk), "relative"
    (a relative_bias (H, Lq + Lk - 1), with its gradient) or "relative padding" (that beside
    BERT's mask, read as a key bias)."""
    attn_mask = None
    if mask in ("key padding", "relative padding"):
        attn_mask = torch.ones(2, 1, 1, length, dtype=torch.bool).expand(2, 16, length, length)
    elif mask == "additive":
        attn_mask = torch.empty(length, length, dtype=dtype).expand(2, 16, length, length)
    elif mask == "bias":
        attn_mask = torch.empty(1, 16, length, length, dtype=dtype)
    elif mask == "key bias":
        attn_mask = torch.empty(2, 1, 1, length, dtype=dtype)
    relative = mask in ("relative", "relative padding")
    return attn_mask, torch.empty(16, 2 * length - 1, dtype=dtype) if relative else None


def attention_case(head_dim, dtype, causal, mask=None, dropout_p=0.0, causal_shift=0, window_left=-1, length=2048):
    """The forward and backward (with the gradients of a "bias", "key bias" or relative
    bias: attention_bwd_mask_kernel, whose diagonal sums give the relative bias's) at B 2,
    H 16, L `length`; mask: see attention_masks."""

    def run():
        q, k, v = (torch.empty(2, 16, length, head_dim, dtype=dtype) for _ in range(3))
        attn_mask, relative_bias = attention_masks(mask, dtype, length)
        args = (attn_mask, causal, causal_shift, head_dim**-0.5, dropout_p, 0, window_left, relative_bias)
        out, lse = attention.attention_fwd(q, k, v, *args)
        wanted = (mask in ("bias", "key bias"), relative_bias is not None)
        attention.attention_bwd_with_bias_grads(torch.empty_like(out), q, k, v, out, lse, *args, *wanted)

    return run


def decode_case(head_dim, dtype, batch, heads, kv_heads, rotary_dim=None, interleaved=False, window_left=-1):
    """One token per sequence; with rotary_dim, rotary embeddings fused (fp32 caches); with
    window_left >= 0, a sliding window."""

    def run():
        q = torch.empty(batch, heads, 1, head_dim, dtype=dtype)
        k_cache, v_cache = (torch.empty(batch, kv_heads, 4096, head_dim, dtype=dtype) for _ in range(2))
        k_new, v_new = (torch.empty(batch, kv_heads, 1, head_dim, dtype=dtype) for _ in range(2))
        lengths = torch.zeros(batch, dtype=torch.int32)
        rotary = (None, None, False) if rotary_dim is None else (
            *(torch.empty(8192, rotary_dim // 2) for _ in range(2)), interleaved)
        attention_with_kv_cache.attention_with_kv_cache_fwd(
            q, k_cache, v_cache, lengths, k_new, v_new, head_dim**-0.5, *rotary, window_left
        )

    return run


def cross_entropy_case(vocab, dtype, smoothing=0.0, weighted=False):
    def run():
        logits = torch.empty(4096, vocab, dtype=dtype)
        weight = torch.ones(vocab) if weighted else None
        target = torch.zeros(4096, dtype=torch.long)
        cross_entropy.cross_entropy_fwd(logits, target, weight, -100, smoothing, 0.0, False)

    return run


def layer_norm_case(width, dtype, residual=False, dropout_p=0.0, rms=False):
    """LayerNorm's kernels, or with rms RMSNorm's (the same kernels with RMS set, no bias)."""

    def run():
        x = torch.empty(4096, width, dtype=dtype)
        weight, bias = torch.empty(width), None if rms else torch.empty(width)
        res = torch.empty_like(x) if residual else None
        keep_sum = residual or dropout_p > 0
        out, mean, rstd, summed = layer_norm.layer_norm_fwd(x, weight, bias, 1e-5, res, dropout_p, 0, keep_sum, rms)
        grad_sum = torch.empty_like(x) if residual else None
        layer_norm.layer_norm_bwd(torch.empty_like(x), grad_sum, x, weight, mean, rstd, dropout_p, 0, not rms, rms)

    return run


def rotary_case(head_dim, rotary_dim, dtype, interleaved, seqlen=4096, cache_dtype=torch.float32):
    """Queries (B2 H32 L D) rotated forward (a new tensor, and in place) and backward."""

    def run():
        x = torch.empty(2, 32, seqlen, head_dim, dtype=dtype)
        cos, sin = (torch.empty(8192, rotary_dim // 2, dtype=cache_dtype) for _ in range(2))
        positions = torch.zeros(2, seqlen, dtype=torch.long)
        apply_rotary.apply_rotary_fwd(x, cos, sin, positions, interleaved, False)
        apply_rotary.apply_rotary_fwd(x, cos, sin, positions, interleaved, True)
        apply_rotary.apply_rotary_bwd(cos, sin, positions, interleaved, torch.empty_like(x))

    return run


def linear_case(width, ffn_width, dtype, activation, prenorm):
    """The FFN's two matmuls at 8192 tokens, and their epilogues' backward: fc1 with bias +
    GELU, fc2 with bias + dropout + residual (pre-LN) or bias alone (post-LN, where the
    dropout and residual go to add_layer_norm)."""

    def run():
        x = torch.empty(8192, width, dtype=dtype)
        w1, w2 = torch.empty(ffn_width, width, dtype=dtype), torch.empty(width, ffn_width, dtype=dtype)
        b1, b2 = torch.empty(ffn_width), torch.empty(width)
        g, pre = linear_gelu.linear_gelu_fwd(x, w1, b1, activation, True)
        if prenorm:
            out, _ = linear_gelu.linear_gelu_fwd(g, w2, b2, "none", False, 0.1, 0, x)
            linear_gelu.linear_gelu_bwd(torch.empty_like(out), None, "none", 0.1, 0, False)
        else:
            out, _ = linear_gelu.linear_gelu_fwd(g, w2, b2, "none", False)
            linear_gelu.linear_gelu_bwd(torch.empty_like(out), None, "none", 0.0, 0, False)
        linear_gelu.linear_gelu_bwd(torch.empty_like(pre), pre, activation, 0.0, 0, True)

    return run


def swiglu_case(width, ffn_width, dtype, activation):
    """The gated feed-forward at 8192 tokens: the gate and up matmul with its epilogue,
    keeping gate and up (recompute=False) and not (recompute=True), and the epilogue's
    backward on a row chunk of them, as the autograd Function calls it."""

    def run():
        x = torch.empty(8192, width, dtype=dtype)
        w_gate, w_up = (torch.empty(ffn_width, width, dtype=dtype) for _ in range(2))
        _, gate_up = swiglu.swiglu_fwd(x, w_gate, w_up, activation, True)
        swiglu.swiglu_fwd(x, w_gate, w_up, activation, False)
        grad = torch.empty_like(gate_up)
        rows = slice(0, 2048)
        swiglu.swiglu_bwd(grad[0, rows], grad[1, rows], gate_up[0, rows], gate_up[1, rows], activation, True)

    return run


def cases():
    """Every case: attention at head dims 64/128/256 in bf16 and fp32 (fp16, whose code and
    tiles are bf16's, at 64), causal or not (and BERT's padding mask with dropout, an
    additive mask, a learned bias with its gradient, and causal aligned bottom-right;
    sliding windows), decoding with and without a split cache (and
    a window); cross-entropy at GPT-2's,
    Llama 2's and Llama 3's vocabularies; LayerNorm at widths 768 to 32768 (fp32 to 16384,
    the kernels' 64 KiB row limit), RMSNorm at 4096 to 16384; the FFN matmuls at GPT-2 and
    BERT-large sizes; rotary embeddings of Llama-sized queries in both layouts, partial
    rotary, and a decoding step; the gated feed-forward at Llama 2 7B's and Gemma 2B's sizes."""
    found = []
    for head_dim in (64, 128, 256):
        for name, dtype in DTYPES.items():
            if name == "fp16" and head_dim > 64:
                continue  # the code and tiles of bf16's, compiled in full at head dim 64
            for causal in (False, True):
                label = f"B2 H16 L2048 D{head_dim} {'causal' if causal else 'full'} {name}"
                found.append(("attention", label, attention_case(head_dim, dtype, causal)))
    for name in ("fp16", "bf16"):
        found.append(("attention", f"B2 H16 L2048 D64 key padding, dropout 0.1 {name}",
                      attention_case(64, DTYPES[name], False, "key padding", 0.1)))
    found.append(("attention", "B2 H16 L2048 D64 additive mask bf16",
                  attention_case(64, torch.bfloat16, False, "additive")))
    # A learned bias's gradient: T5's (1, H, Lq, Lk), summed over the batch, at head dims
    # 64 (T5's) to 256 (fp32 to 128: at 256 no backward config fits beside a full mask),
    # with a causal window and dropout; and a per-key bias summed over heads and queries too.
    for head_dim, name in ((64, "bf16"), (64, "fp16"), (64, "fp32"), (128, "bf16"), (128, "fp32"), (256, "bf16")):
        found.append(("attention", f"B2 H16 L2048 D{head_dim} bias (1, H, Lq, Lk) with its gradient {name}",
                      attention_case(head_dim, DTYPES[name], False, "bias")))
    found.append(("attention", "B2 H16 L2048 D64 bias (1, H, Lq, Lk) with its gradient, causal window (255, 0), "
                  "dropout 0.1 bf16", attention_case(64, torch.bfloat16, True, "bias", 0.1, window_left=255)))
    found.append(("attention", "B2 H16 L2048 D64 key bias (B, 1, 1, Lk) with its gradient bf16",
                  attention_case(64, torch.bfloat16, False, "key bias")))
    # A relative bias (H, Lq + Lk - 1) read in place and its gradient (the mask-gradient
    # kernel's diagonal sums), at T5's head dim and beyond.
    for head_dim, name, causal in ((64, "bf16", False), (64, "fp16", True), (64, "fp32", False), (128, "bf16", False)):
        label = f"B2 H16 L2048 D{head_dim} relative bias (H, Lq + Lk - 1) with its gradient{' causal' * causal} {name}"
        found.append(("attention", label, attention_case(head_dim, DTYPES[name], causal, "relative")))
    for name in ("bf16", "fp32"):  # T5's encoder: the bias beside its padding mask
        label = f"B2 H16 L2048 D64 relative bias (H, Lq + Lk - 1) with its gradient, key padding {name}"
        found.append(("attention", label, attention_case(64, DTYPES[name], False, "relative padding")))
    for head_dim, name in ((64, "bf16"), (128, "bf16"), (256, "bf16"), (64, "fp32"), (128, "fp32")):
        # A causal shift other than 0 (torch's lower-right CausalBias) compiles a variant of its own.
        found.append(("attention", f"B2 H16 L2048 D{head_dim} causal bottom-right {name}",
                      attention_case(head_dim, DTYPES[name], True, causal_shift=1)))
    for head_dim, name in ((64, "bf16"), (128, "bf16"), (256, "bf16"), (64, "fp16"), (64, "fp32"), (128, "fp32")):
        # A sliding window compiles variants of its own: Mistral's (causal, left 4095 - here
        # 1023), and a two-sided one (a right bound is a shifted causal diagonal).
        found.append(("attention", f"B2 H16 L2048 D{head_dim} causal window (1023, 0) {name}",
                      attention_case(head_dim, DTYPES[name], True, window_left=1023)))
        found.append(("attention", f"B2 H16 L2048 D{head_dim} window (256, 256) {name}",
                      attention_case(head_dim, DTYPES[name], True, causal_shift=256, window_left=512)))
    found.append(("attention", "B2 H16 L2048 D64 window (256, -1), key padding, dropout 0.1 bf16",
                  attention_case(64, torch.bfloat16, False, "key padding", 0.1, window_left=256)))
    for head_dim in (64, 128, 256):
        for name, dtype in DTYPES.items():
            if name == "fp16" and head_dim > 64:
                continue
            found.append(("attention_with_kv_cache", f"B1 H8/1 cache 4096 D{head_dim}, window 1023, split {name}",
                          decode_case(head_dim, dtype, 1, 8, 1, window_left=1023)))
            # On the GPU a split needs few (batch x kv head) programs; here fewer than 4.
            found.append(("attention_with_kv_cache", f"B64 H32/8 cache 4096 D{head_dim}, one split {name}",
                          decode_case(head_dim, dtype, 64, 32, 8)))
            found.append(("attention_with_kv_cache", f"B1 H8/1 cache 4096 D{head_dim}, split {name}",
                          decode_case(head_dim, dtype, 1, 8, 1)))
    for head_dim, rotary_dim, interleaved in ((128, 128, False), (64, 64, True), (128, 64, False)):
        layout = f"rotary {rotary_dim} {'interleaved' if interleaved else 'half-split'}"
        for name in ("fp32", "bf16"):
            found.append(("attention_with_kv_cache", f"B64 H32/8 cache 4096 D{head_dim} {layout}, one split {name}",
                          decode_case(head_dim, DTYPES[name], 64, 32, 8, rotary_dim, interleaved)))
        found.append(("attention_with_kv_cache", f"B1 H8/1 cache 4096 D{head_dim} {layout}, split bf16",
                      decode_case(head_dim, torch.bfloat16, 1, 8, 1, rotary_dim, interleaved)))
    for vocab in (32000, 50257, 128256):
        for name, dtype in DTYPES.items():
            found.append(("cross_entropy", f"N4096 V{vocab} {name}", cross_entropy_case(vocab, dtype)))
    found.append(("cross_entropy", "N4096 V32000 weights, smoothing 0.1 bf16",
                  cross_entropy_case(32000, torch.bfloat16, 0.1, True)))
    for width in (768, 1024, 2048, 4096, 8192, 16384, 32768):
        for name, dtype in DTYPES.items():
            if width * dtype.itemsize <= 65536:
                found.append(("layer_norm", f"N4096 D{width} {name}", layer_norm_case(width, dtype)))
    for width in (768, 1024):
        found.append(("add_layer_norm", f"N4096 D{width} residual, dropout 0.1 bf16",
                      layer_norm_case(width, torch.bfloat16, True, 0.1)))
    # RMSNorm: Llama's widths, the fused backward's widest (8192) and the wide path (16384).
    for width in (4096, 8192, 16384):
        for name in ("fp32", "bf16"):
            if width * DTYPES[name].itemsize <= 65536:
                found.append(("rms_norm", f"N4096 D{width} {name}", layer_norm_case(width, DTYPES[name], rms=True)))
    found.append(("add_rms_norm", "N4096 D4096 residual, dropout 0.1 bf16",
                  layer_norm_case(4096, torch.bfloat16, True, 0.1, rms=True)))
    for name, dtype in DTYPES.items():
        for interleaved in (False, True):
            layout = "interleaved" if interleaved else "half-split"
            found.append(("apply_rotary", f"B2 H32 L4096 D128 {layout} {name}", rotary_case(128, 128, dtype, interleaved)))
    found.append(("apply_rotary", "B2 H32 L4096 D64 rotary 16 (partial) bf16, bf16 caches",
                  rotary_case(64, 16, torch.bfloat16, False, cache_dtype=torch.bfloat16)))
    found.append(("apply_rotary", "B2 H32 L1 D256 decoding bf16", rotary_case(256, 256, torch.bfloat16, False, seqlen=1)))
    for label, width, ffn_width, activation, prenorm in (
        ("GPT-2 pre-LN", 768, 3072, "gelu_tanh", True),
        ("BERT-large post-LN", 1024, 4096, "gelu", False),
    ):
        for name, dtype in DTYPES.items():
            found.append(("ffn", f"{label} M8192 {width}/{ffn_width} {name}",
                          linear_case(width, ffn_width, dtype, activation, prenorm)))
    for name, dtype in DTYPES.items():
        found.append(("swiglu", f"Llama 2 7B M8192 4096/11008 silu {name}", swiglu_case(4096, 11008, dtype, "silu")))
    found.append(("swiglu", "Gemma 2B M8192 2048/16384 gelu_tanh bf16",
                  swiglu_case(2048, 16384, torch.bfloat16, "gelu_tanh")))
    found.append(("swiglu", "M8192 1024/2816 gelu fp32", swiglu_case(1024, 2816, torch.float32, "gelu")))
    return found


# Recording the launches.
@dataclasses.dataclass
class Launch:
    kernel: object  # a JITFunction or an Autotuner over one
    name: str
    args: tuple
    kwargs: dict


class Recorder:
    """Stands in for a kernel: kernel[grid](*args, **kwargs) records the launch."""

    def __init__(self, kernel, name, launches):
        self.kernel, self.name, self.launches = kernel, name, launches

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append(Launch(self.kernel, self.name, args, kwargs))


def kernels():
    """(module, name, kernel) for every kernel launched from the host in MODULES."""
    for module in MODULES:
        for name, value in vars(module).items():
            if name.endswith("_kernel") and isinstance(value, (JITFunction, Autotuner)):
                yield module, name, value


def record(run):
    """The launches that run() makes."""
    launches = []
    with contextlib.ExitStack() as stack:
        for module, name, kernel in kernels():
            stack.enter_context(unittest.mock.patch.object(module, name, Recorder(kernel, name, launches)))
        run()
    return launches


# Binding and compiling.
@dataclasses.dataclass
class Compile:
    """One compile job: a kernel specialised for one launch in one config."""

    name: str
    jit: JITFunction
    signature: dict
    constexprs: dict
    attrs: dict
    options: dict


def config_text(kwargs, options):
    blocks = {key.removeprefix("BLOCK_"): value for key, value in kwargs.items() if key.startswith("BLOCK_")}
    tiles = " ".join(f"{key}={value}" for key, value in blocks.items())
    return f"{tiles} w{options.num_warps} s{options.num_stages}".strip()


def bind(launch, extra_kwargs, backend):
    """The Compile job for a launch with extra keyword arguments (a config's), bound as
    Triton's runtime binds a launch, and a text naming the config."""
    jit = launch.kernel.fn if isinstance(launch.kernel, Autotuner) else launch.kernel
    kwargs = {**launch.kwargs, **extra_kwargs}
    binder = create_function_from_signature(jit.signature, jit.params, backend)
    bound_args, specialization, options = binder(*launch.args, **kwargs)
    options, signature, constexprs, attrs = jit._pack_args(backend, kwargs, bound_args, specialization, options)
    return Compile(launch.name, jit, signature, constexprs, attrs, options.__dict__), config_text(extra_kwargs, options)


def launch_configs(launch, target, all_configs):
    """[(config kwargs, kept by the pruner)] for a launch: an autotuned kernel's configs, or
    the launch's own (kept)."""
    kernel = launch.kernel
    if not isinstance(kernel, Autotuner):
        return [({}, True)]
    args = {**dict(zip(kernel.arg_names, launch.args)), **launch.kwargs}
    pruner = kernel.early_config_prune
    kept = pruner.fitting(kernel.configs, args, target) if pruner else kernel.configs
    return [(config.all_kwargs(), config in kept) for config in kernel.configs if all_configs or config in kept]


PTXAS_REGISTERS = re.compile(r"Used (\d+) registers")
PTXAS_SPILLS = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")


def compile_one(job, target):
    """Compiles a job; returns its resource use, or the error."""
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            compiled = triton.compile(
                ASTSource(job.jit, job.signature, job.constexprs, job.attrs), target=target, options=job.options
            )
    except Exception as error:  # noqa: BLE001  (any compile error is reported, not raised)
        return {"error": f"{type(error).__name__}: {str(error).strip()[-2000:]}"}
    seconds = time.perf_counter() - start
    report = log.getvalue()
    registers = PTXAS_REGISTERS.search(report)
    spills = PTXAS_SPILLS.search(report)
    ptx = compiled.asm["ptx"]
    return {
        "seconds": seconds,
        "registers": int(registers.group(1)) if registers else None,
        "stack": int(spills.group(1)) if spills else None,
        "spill_bytes": int(spills.group(2)) + int(spills.group(3)) if spills else None,
        "shared": compiled.metadata.shared,
        "matrix": "wgmma" if "wgmma.mma_async" in ptx else "mma" if "mma.sync" in ptx else "-",
        "wgmma_serialized": "wgmma.mma_async instructions are serialized" in report,
        "cp_async": bool(re.search(r"cp\.async\.c[ag]", ptx)),
        "tma": "cp.async.bulk.tensor" in ptx,
    }


_JOBS = []  # set before the worker processes fork
_TARGET = None


def _compile_job(index):
    return compile_one(_JOBS[index], _TARGET)


def compile_all(jobs, target, processes):
    """compile_one over jobs in `processes` forked workers, in order."""
    global _JOBS, _TARGET
    _JOBS, _TARGET = jobs, target
    if processes <= 1:
        return [_compile_job(index) for index in range(len(jobs))]
    context = multiprocessing.get_context("fork")
    with concurrent.futures.ProcessPoolExecutor(processes, mp_context=context) as pool:
        return list(pool.map(_compile_job, range(len(jobs)), chunksize=1))


# The check and its table.
def failure(row, limit):
    """Why a row fails the check, or None."""
    result = row["result"]
    if "error" in result:
        return f"compile error: {result['error']}"
    if not row["kept"]:
        return None
    if result["shared"] > limit:
        return f"shared memory {result['shared']} bytes, over the limit of {limit}"
    if result["spill_bytes"]:
        return f"spills {result['spill_bytes']} bytes ({result['stack']} bytes stack frame)"
    return None


def table(rows, arch, version, header, elapsed):
    limit = SHARED_MEMORY_LIMIT[arch]
    per_kernel = {}
    for row in rows:
        if "seconds" in row["result"] and row["first"]:
            seconds, count = per_kernel.get(row["kernel"], (0.0, 0))
            per_kernel[row["kernel"]] = (seconds + row["result"]["seconds"], count + 1)
    compiles = sum(count for _, count in per_kernel.values())
    lines = [
        f"# Triton kernels compiled for sm_{arch} (triton {version})",
        "",
        f"Written by `make triton-check` (scripts/triton_check.py) on {header['date']}, commit {header['commit']}, "
        f"torch {header['versions']['torch']}, on a CPU without a GPU. Shared-memory limit {limit // 1024} KiB per "
        f"program. {compiles} distinct compiles in {elapsed:.0f} s (wall clock, all processes).",
        "",
        "Columns: `flags`, the launch's true boolean and text constexprs (`DKDV`: the dK/dV role of the attention "
        "backward, else dQ); registers per thread and spilled bytes (stores + loads) from ptxas; shared memory per "
        "program (KiB) as Triton launches it; `matrix`: wgmma (Hopper warpgroup MMA) or mma (mma.sync) in the PTX; "
        "`copy`: cp.async and/or TMA (cp.async.bulk.tensor) in the PTX; `serial`: ptxas warned that wgmma is "
        "serialised; `kept`: whether the autotuner's pruner keeps the config for that case (only kept configs can "
        "run). Compile seconds are per distinct compile; a row that repeats one shows `=`.",
        "",
        "## Compile time per kernel",
        "",
        "| kernel | distinct compiles | seconds |",
        "|---|---|---|",
    ]
    lines += [f"| {kernel} | {count} | {seconds:.1f} |" for kernel, (seconds, count) in per_kernel.items()]
    lines += [
        "",
        "## Every kernel, case and config",
        "",
        "| kernel | case | flags | config | registers | spills | shared KiB | matrix | copy | serial | kept "
        "| seconds |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        result = row["result"]
        cells = [row["kernel"], row["case"], row["flags"], row["config"]]
        if "error" in result:
            cells += ["compile error"] + [""] * 7
        else:
            copy = "+".join(name for name, used in (("cp.async", result["cp_async"]), ("TMA", result["tma"])) if used)
            cells += [
                result["registers"], result["spill_bytes"], f"{result['shared'] / 1024:.1f}", result["matrix"],
                copy or "-", "yes" if result["wgmma_serialized"] else "-", "yes" if row["kept"] else "pruned",
                f"{result['seconds']:.1f}" if row["first"] else "=",
            ]
        lines.append("| " + " | ".join(str(cell) for cell in cells) + " |")
    return "\n".join(lines) + "\n"


def flags_text(kwargs):
    """The launch's true boolean and text keyword constexprs, e.g. "DKDV IS_CAUSAL"."""
    return " ".join(name if value is True else f"{name}={value}" for name, value in kwargs.items()
                    if value is True or isinstance(value, str)) or "-"


def check_arch(arch, selected_cases, processes, all_configs):
    """Records, binds and compiles every case for sm_<arch>; returns (rows, seconds)."""
    start = time.perf_counter()
    target = GPUTarget("cuda", arch, 32)
    backend = make_backend(target)
    limit = SHARED_MEMORY_LIMIT[arch]
    rows, jobs, job_index = [], [], {}
    for op, label, run in selected_cases:
        for launch in record(run):
            try:
                configs = launch_configs(launch, Target(limit, wgmma=arch >= 90), all_configs)
            except ValueError as error:  # the pruner kept nothing
                rows.append(dict(kernel=launch.name, case=f"{op}: {label}", flags=flags_text(launch.kwargs),
                                 config="-", kept=True, job=None, first=True, result={"error": str(error)}))
                continue
            for config_kwargs, kept in configs:
                job, config = bind(launch, config_kwargs, backend)
                key = repr((job.name, job.signature, job.constexprs, job.attrs, sorted(job.options.items())))
                first = key not in job_index
                if first:
                    job_index[key] = len(jobs)
                    jobs.append(job)
                rows.append(dict(kernel=launch.name, case=f"{op}: {label}", flags=flags_text(launch.kwargs),
                                 config=config, kept=kept, job=job_index[key], first=first))
    results = compile_all(jobs, target, processes)
    for row in rows:
        if row["job"] is not None:
            row["result"] = results[row["job"]]
    return rows, time.perf_counter() - start


def attention_limit_problems(arch):
    """Where triton_limit (lmkern/ops/attention/backends.py) and the pruners disagree on
    sm_<arch>: a CUDA call it lets through with a launch that no config fits (which would
    fail on the GPU instead of being refused clearly), or one it refuses whose launches all
    fit, over head dims, dtypes, masks, causal or not, dropout, windows, and forward alone or
    with backward."""
    target = Target(SHARED_MEMORY_LIMIT[arch], wgmma=arch >= 90)
    problems = []
    grid = itertools.product(
        (64, 128, 256), DTYPES.items(), ATTENTION_MASKS, (False, True), (0.0, 0.1), (-1, 255), (False, True)
    )
    for head_dim, (name, dtype), mask, causal, dropout_p, window_left, backward in grid:
        launches = record(attention_case(head_dim, dtype, causal, mask, dropout_p, window_left=window_left, length=256))
        if not backward:
            launches = [launch for launch in launches if launch.name == "attention_fwd_kernel"]
        fits = True
        for launch in launches:
            try:
                launch_configs(launch, target, False)
            except ValueError:  # the pruner kept nothing
                fits = False
        attn_mask, relative_bias = attention_masks(mask, dtype, 256)
        call = Call("cuda", dtype, head_dims=(head_dim, head_dim), mask=attn_mask,
                    mask_grad=mask in ("bias", "key bias"), dropout_p=dropout_p, relative_bias=relative_bias is not None, windowed=window_left >= 0,
                    backward=backward)
        refusal = triton_limit(call)
        if fits == (refusal is not None):
            case = (f"D{head_dim} {name} mask {mask}{', causal' * causal}, dropout {dropout_p}, window {window_left}, "
                    f"{'forward and backward' if backward else 'forward'}")
            problems.append(f"{case}: refused ({refusal}) but every launch fits" if refusal else
                            f"{case}: let through but a launch has no config that fits")
    return problems


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", choices=sorted(SHARED_MEMORY_LIMIT), default=[90, 80])
    parser.add_argument("--jobs", type=int, default=2, help="compile processes (default 2)")
    parser.add_argument("--out", help="folder for the tables (default: none written)")
    parser.add_argument("--case", help="only the cases whose op or label contains this text")
    parser.add_argument("--all-configs", action="store_true", help="compile the pruned configs too")
    args = parser.parse_args(argv)
    selected = [case for case in cases() if args.case is None or args.case in f"{case[0]}: {case[1]}"]
    header = stamp("cpu")
    failed = 0
    for arch in args.arch:
        if args.case is None or args.case in "attention limits":
            problems = attention_limit_problems(arch)
            print(f"sm_{arch}, triton {triton.__version__}: attention's triton_limit against the pruners, "
                  f"{len(problems)} problems")
            for problem in problems:
                print(f"  FAILED {problem}")
            failed += len(problems)
        rows, elapsed = check_arch(arch, selected, args.jobs, args.all_configs)
        problems = [(row, failure(row, SHARED_MEMORY_LIMIT[arch])) for row in rows]
        problems = [(row, why) for row, why in problems if why]
        compiled = sum(row["first"] for row in rows)
        print(f"sm_{arch}, triton {triton.__version__}: {len(rows)} (kernel, case, config) rows, {compiled} distinct "
              f"compiles in {elapsed:.0f} s, {len(problems)} problems")
        for row, why in problems:
            print(f"  FAILED {row['kernel']} [{row['case']}] {row['config']}: {why}")
        failed += len(problems)
        if args.out:
            os.makedirs(args.out, exist_ok=True)
            path = os.path.join(args.out, f"triton-{triton.__version__}-sm_{arch}.md")
            with open(path, "w") as file:
                file.write(table(rows, arch, triton.__version__, header, elapsed))
            print(f"  wrote {path}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
