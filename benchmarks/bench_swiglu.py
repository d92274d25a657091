"""The gated feed-forward of Llama-family models, down(act(x gate^T) * (x up^T)): lmkern.swiglu
against the same three bias-free linear layers in torch eager (transformers' LlamaMLP),
torch.compile of it, and Liger-Kernel's fused activation-and-multiply between torch's
matmuls (LigerSiLUMulFunction for SwiGLU, LigerGELUMulFunction for tanh GeGLU) when
importable.

Compute-bound, reported in TFLOP/s over the three matmuls of width D and F: forward
6 N D F, backward 12 N D F, forward+backward 18 N D F. The peak memory of forward+backward
is the other point: lmkern.swiglu saves only the (2, N, F) gate and up pre-activations,
where eager keeps gate, act(gate), up and their product.
"""

import torch
import torch.nn.functional as F

import lmkern

from .harness import Provider, compiled_provider, lmkern_providers, optional_provider

OP = "swiglu"
METRIC = "TFLOP/s"


def cases(device, quick):
    if quick:
        return [dict(tokens=256, hidden=64, ffn=176, activation="silu"),
                dict(tokens=130, hidden=96, ffn=300, activation="gelu_tanh")]
    if device == "cuda":  # Llama 2 7B (SwiGLU) and Gemma 2B (tanh GeGLU), 8192 tokens
        return [dict(tokens=8192, hidden=4096, ffn=11008, activation="silu"),
                dict(tokens=8192, hidden=2048, ffn=16384, activation="gelu_tanh")]
    return [dict(tokens=512, hidden=768, ffn=2048, activation="silu"),
            dict(tokens=512, hidden=512, ffn=2048, activation="gelu_tanh")]


def label(case):
    return f"{case['tokens']}x{case['hidden']}/{case['ffn']} {case['activation']}"


def dtype(device):
    return torch.bfloat16 if device == "cuda" else torch.float32


def make_inputs(case, device, dtype):
    hidden, ffn = case["hidden"], case["ffn"]

    def param(*shape, scale=1.0):
        return (torch.randn(*shape, device=device, dtype=dtype) * scale).requires_grad_()

    return (param(case["tokens"], hidden), param(ffn, hidden, scale=hidden**-0.5),
            param(ffn, hidden, scale=hidden**-0.5), param(hidden, ffn, scale=ffn**-0.5), case["activation"])


def work(case, dtype, pass_name):
    matmuls = 6 * case["tokens"] * case["hidden"] * case["ffn"]
    return {"fwd": matmuls, "bwd": 2 * matmuls, "fwd+bwd": 3 * matmuls}[pass_name]


ACTIVATIONS = {"silu": F.silu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}


def eager(x, w_gate, w_up, w_down, activation):
    """transformers' LlamaMLP: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    return F.linear(ACTIVATIONS[activation](F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


def fused(x, w_gate, w_up, w_down, activation, backend):
    return lmkern.swiglu(x, w_gate, w_up, w_down, activation=activation, backend=backend)


def _liger():
    from liger_kernel.ops.geglu import LigerGELUMulFunction
    from liger_kernel.ops.swiglu import LigerSiLUMulFunction

    functions = {"silu": LigerSiLUMulFunction, "gelu_tanh": LigerGELUMulFunction}

    def run(x, w_gate, w_up, w_down, activation):
        return F.linear(functions[activation].apply(F.linear(x, w_gate), F.linear(x, w_up)), w_down)

    return run


def providers(device, dtype):
    return [
        Provider("torch eager", eager),
        compiled_provider(eager),
        *lmkern_providers(OP, device, dtype, fused),
        optional_provider("liger_kernel", device, _liger),
    ]
