"""The gated feed-forward of Llama-family models (SwiGLU, GeGLU) in one autograd Function:
lmkern.swiglu.

    out = (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T

Forward: the gate and up projections as one pass whose epilogue computes h = act(gate) *
up (on Triton one matmul kernel with two accumulators; natively ATen's matmuls writing
into one (2, N, F) buffer, then one epilogue kernel), then the down projection (torch's
matmul). It saves the inputs and the (2, N, F) pre-activations gate and up, or with
recompute=True only the inputs; never h. Backward, a row chunk at a time: the matmul
writes d(h) = d(out) @ w_down, one kernel turns it in place into d(gate) and writes d(up),
recomputing the chunk's h for d(w_down) = d(out).T @ h (fp32 accumulation); then d(x) =
d(gate) @ w_gate + d(up) @ w_up, d(w_gate) = d(gate).T @ x, d(w_up) = d(up).T @ x.
Eager PyTorch keeps gate, act(gate), up and h.
"""

import math

import torch
import torch.nn.functional as F

from lmkern.backend import Call
from lmkern.errors import ArgumentError
from lmkern.ops import lazy_submodules
from lmkern.ops.autocast import cast_for_autocast, without_autocast
from lmkern.ops.double_backward import reference_grads
from lmkern.ops.ffn import down_projection_grads
from lmkern.ops.layer_norm import check_float_tensor, last_dim_contiguous
from lmkern.ops.linear_gelu import check_linear, matmul_grads
from lmkern.ops.swiglu import reference
from lmkern.ops.swiglu.backends import SWIGLU

__getattr__ = lazy_submodules(__name__)


def swiglu_forward(impl, x, w_gate, w_up, w_down, activation, keep_preactivation):
    """(out, gate_up) on implementation impl; gate_up (2, N, F) or None."""
    h, gate_up = impl.swiglu_fwd(x, w_gate, w_up, activation, keep_preactivation)
    return F.linear(h, w_down), gate_up


class SwiGLUFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, w_gate, w_up, w_down, activation, recompute, backend):
        impl = SWIGLU.implementation(backend)
        out, gate_up = swiglu_forward(impl, x, w_gate, w_up, w_down, activation, not recompute)
        ctx.save_for_backward(x, w_gate, w_up, w_down, gate_up)
        ctx.impl, ctx.activation = impl, activation
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        x, w_gate, w_up, w_down, gate_up = ctx.saved_tensors
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through the reference

            def forward(*inputs):
                return swiglu_forward(reference, *inputs, ctx.activation, False)[0]

            return *reference_grads(forward, (x, w_gate, w_up, w_down), needs[:4], (grad_out,)), None, None, None
        if gate_up is None:  # recompute=True
            gate_up = reference.project(x, w_gate, w_up)
        grad_gate, grad_up, grad_w_down = gated_and_down_grads(
            ctx.impl, last_dim_contiguous(grad_out), gate_up, w_down, ctx.activation, needs[3]
        )
        del gate_up
        grad_x, grad_w_gate = matmul_grads(grad_gate, x, w_gate, needs[:2])
        _, grad_w_up = matmul_grads(grad_up, x, w_up, (False, needs[2]))
        if grad_x is not None:
            grad_x.addmm_(grad_up, w_up)  # d(x) = d(gate) @ w_gate + d(up) @ w_up, no second (N, D)
        return grad_x, grad_w_gate, grad_w_up, grad_w_down, None, None, None


def gated_and_down_grads(impl, grad_out, gate_up, w_down, activation, needs_w_down):
    """Backward through h = act(gate) * up and out = h @ w_down.T, given d(out) = grad_out
    (N, D_out) and gate_up (2, N, F): d(gate) and d(up) (N, F) each, and d(w_down) (None
    unless needs_w_down). By ffn's down_projection_grads, a row chunk at a time: the
    matmul writes d(h) into d(gate)'s rows, impl.swiglu_bwd turns it into d(gate) in place,
    writes d(up) and recomputes the chunk's h for d(w_down)."""
    grad_gate, grad_up = torch.empty_like(gate_up)

    def epilogue_bwd(rows):
        return impl.swiglu_bwd(grad_gate[rows], grad_up[rows], gate_up[0, rows], gate_up[1, rows], activation,
                               needs_w_down)

    grad_w_down = down_projection_grads(grad_out, w_down, grad_gate, epilogue_bwd, needs_w_down)
    return grad_gate, grad_up, grad_w_down


def check_activation(activation):
    if activation not in reference.ACTIVATIONS:
        raise ArgumentError(f"activation must be one of {reference.ACTIVATIONS}, got {activation!r}")


def swiglu(x, w_gate, w_up, w_down, *, activation="silu", recompute=False, backend=None):
    """The gated feed-forward of Llama, Mistral, Qwen, Gemma and T5 v1.1, fused:

        out = (act(x @ w_gate.T) * (x @ w_up.T)) @ w_down.T

    i.e. down_proj(act(gate_proj(x)) * up_proj(x)) for bias-free nn.Linear layers.

    Args:
        x: (..., D) float32/float16/bfloat16 (float64 runs on the torch backend).
        w_gate, w_up: (F, D), the gate_proj and up_proj weights; w_down: (D_out, F), the
            down_proj weight. All in x's dtype; under torch.autocast any float dtype, and
            x and the weights are cast to the autocast dtype, as F.linear casts them.
        activation: "silu" (SwiGLU: Llama, Mistral, Qwen), "gelu" (GeGLU with exact GELU)
            or "gelu_tanh" (GeGLU with the tanh approximation, Gemma's and T5 v1.1's
            gelu_new / gelu_pytorch_tanh).
        recompute: save no (2, N, F) gate and up pre-activations for backward but
            recompute them there (2 N D F more multiply-adds, 2 N F elements less memory).
        backend: "torch", "triton", "native" or "auto" for the gated epilogue and its
            backward; the matmuls outside the Triton forward kernel are torch's.

    Returns (..., D_out) in x's dtype (the autocast dtype under autocast). Gradients come
    in their inputs' dtypes, weight gradients of the down projection accumulated in fp32.
    They can be differentiated again (create_graph=True): that backward runs through the
    reference.
    """
    check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ArgumentError("x must have at least one dimension (..., D), got a scalar")
    for name, weight in (("w_gate", w_gate), ("w_up", w_up), ("w_down", w_down)):
        check_float_tensor(weight, name)
    x, w_gate, w_up, w_down = cast_for_autocast(x, w_gate, w_up, w_down)
    check_linear(w_gate, None, x, x.shape[-1], "w_gate")
    if w_up.shape != w_gate.shape:
        raise ArgumentError(f"w_up must have w_gate's shape {tuple(w_gate.shape)}, got {tuple(w_up.shape)}")
    check_linear(w_up, None, x, x.shape[-1], "w_up")
    check_linear(w_down, None, x, w_gate.shape[0], "w_down")
    check_activation(activation)
    rows = x.reshape(math.prod(x.shape[:-1]), x.shape[-1])
    name = SWIGLU.resolve(Call.of(x), backend, empty=0 in (*rows.shape, *w_gate.shape, w_down.shape[0]))
    out = SwiGLUFunction.apply(rows, w_gate, w_up, w_down, activation, recompute, name)
    return out.view(*x.shape[:-1], w_down.shape[0])
