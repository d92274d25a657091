"""Backward under create_graph=True (double backward), for the ops' autograd Functions.

A kernel's backward computes first derivatives only. Under create_graph=True (gradient
penalties, some meta-learning) the gradients an op returns must themselves be
differentiable, or second derivatives silently lose the op's terms. So each op does one
of two things, and torch.is_grad_enabled() inside a backward tells whether it must:

    reference_grads     the backward is redone through the op's PyTorch reference, whose
                        autograd graph carries the second-order terms: attention, LayerNorm
                        without a residual, linear_gelu and ffn, whose Functions keep their
                        inputs;
    refuse_create_graph the backward raises an error naming the op: cross-entropy and
                        linear cross-entropy, whose Functions keep the gradient of the
                        logits rather than the logits, and add_layer_norm, which keeps the
                        sum rather than its two terms.
"""

import torch


def reference_grads(forward, inputs, needs_input_grad, grad_outputs):
    """The gradients of forward(*inputs) (a function of differentiable torch ops returning a
    tensor or a tuple of them) for the incoming grad_outputs (None for an output that got
    none), with a graph of their own so that they can be differentiated again; None where
    needs_input_grad is False."""
    wanted = [tensor for tensor, needed in zip(inputs, needs_input_grad) if needed]
    with torch.enable_grad():
        outputs = forward(*inputs)
        outputs = outputs if isinstance(outputs, tuple) else (outputs,)
        outputs, grad_outputs = zip(*((out, grad) for out, grad in zip(outputs, grad_outputs) if grad is not None))
        grads = iter(torch.autograd.grad(outputs, wanted, grad_outputs, create_graph=True, materialize_grads=True))
    return tuple(next(grads) if needed else None for needed in needs_input_grad)


def refuse_create_graph(op):
    """Raises, naming the op, when its backward runs under create_graph=True."""
    if torch.is_grad_enabled():
        raise RuntimeError(
            f"lmkern.{op} has no double backward: its gradient cannot be differentiated again "
            f"(create_graph=True). Use torch's own ops for the part of the model that needs second derivatives"
        )
