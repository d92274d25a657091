"""The gated feed-forward (SwiGLU, GeGLU) in plain PyTorch: the oracle the kernels are
tested against.

    gate = x @ w_gate.T,  up = x @ w_up.T          (the two halves of one (2, N, F) buffer)
    h = act(gate) * up                              act: "silu", "gelu" or "gelu_tanh"
    out = h @ w_down.T                              (torch's matmul on every backend)

Each backend implements the first two lines (swiglu_fwd) and the backward of the second
(swiglu_bwd): d(gate) = d(h) up act'(gate), d(up) = d(h) act(gate), recomputing h for
d(w_down) in the same pass. The matmuls of the backward follow in the autograd Function.
Everything runs in the input's dtype, as eager code would.
"""

import torch
import torch.nn.functional as F

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")


def activate(pre, activation):
    if activation == "silu":
        return F.silu(pre)
    return F.gelu(pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def activation_backward(grad, pre, activation):
    """grad * act'(pre), in grad's dtype."""
    if activation == "silu":
        return torch.ops.aten.silu_backward(grad, pre)
    return torch.ops.aten.gelu_backward(grad, pre, approximate="tanh" if activation == "gelu_tanh" else "none")


def project(x, w_gate, w_up):
    """(2, N, F): x @ w_gate.T and x @ w_up.T written into one buffer, with neither weight
    copied (ATen's matmul, a BLAS or cuBLAS, on every backend)."""
    gate_up = x.new_empty(2, x.shape[0], w_gate.shape[0])
    torch.mm(x, w_gate.T, out=gate_up[0])
    torch.mm(x, w_up.T, out=gate_up[1])
    return gate_up


def swiglu_fwd(x, w_gate, w_up, activation, keep_preactivation):
    """h = act(x @ w_gate.T) * (x @ w_up.T).

    x: (N, D), w_gate and w_up: (F, D), all in one dtype. activation: one of ACTIVATIONS.
    Returns h (N, F) in x's dtype and, if keep_preactivation, gate_up (2, N, F), gate and
    up, for backward; else None.
    """
    gate, up = F.linear(x, w_gate), F.linear(x, w_up)
    h = activate(gate, activation) * up
    return h, torch.stack((gate, up)) if keep_preactivation else None


def swiglu_bwd(grad_gate, grad_up, gate, up, activation, want_activation):
    """Backward of h = act(gate) * up, in place.

    grad_gate: (R, F) holding d(h) on entry, d(gate) = d(h) up act'(gate) on return;
    grad_up: (R, F) written with d(up) = d(h) act(gate); gate, up: (R, F) the saved
    pre-activations. All with a contiguous last dim. Returns h = act(gate) * up (R, F) if
    want_activation (the input of the down projection, recomputed rather than saved),
    else None.
    """
    grad_h = grad_gate.clone()
    act = activate(gate, activation)
    grad_up.copy_(grad_h * act)
    grad_gate.copy_(activation_backward(grad_h * up, gate, activation))
    return act * up if want_activation else None
