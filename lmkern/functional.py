"""Drop-in twins of torch.nn.functional: same names, arguments, layouts and results, plus
keyword-only extras (z_loss, inplace_backward, backend).

scaled_dot_product_attention is lmkern's own, which already has torch's signature and
(B, H, L, D) layout (4-D inputs only)."""

import torch
import torch.nn.functional as F
from torch.nn import _reduction

from lmkern.errors import ArgumentError, ArgumentTypeError
from lmkern.ops.attention import scaled_dot_product_attention  # noqa: F401  (re-exported)
from lmkern.ops.cross_entropy import cross_entropy as _cross_entropy
from lmkern.ops.layer_norm import layer_norm  # noqa: F401  (already torch's signature)
from lmkern.ops.rms_norm import rms_norm  # noqa: F401  (already torch's signature)


def cross_entropy(
    input,
    target,
    weight=None,
    size_average=None,
    ignore_index=-100,
    reduce=None,
    reduction="mean",
    label_smoothing=0.0,
    *,
    z_loss=0.0,
    inplace_backward=False,
    backend=None,
):
    """torch.nn.functional.cross_entropy on lmkern's fused kernel.

    Layouts as in torch: input (C,), (N, C) or (N, C, d1, ..., dK) with classes in dim 1,
    target (), (N,) or (N, d1, ..., dK) class indices. For K >= 1 the classes are moved
    last and copied to be contiguous (so inplace_backward then saves no memory). Class
    probabilities as target (a float tensor shaped like input) are computed by torch
    itself, with backend "torch" or "auto" only. The keyword-only extras are those of
    lmkern.cross_entropy.
    """
    if size_average is not None or reduce is not None:
        reduction = _reduction.legacy_get_string(size_average, reduce)
    if isinstance(target, torch.Tensor) and target.is_floating_point():
        if backend not in (None, "auto", "torch") or z_loss or inplace_backward:
            raise ArgumentError(
                "class-probability targets run on torch's own cross_entropy: they take "
                "backend 'torch' or 'auto', z_loss=0 and inplace_backward=False"
            )
        return F.cross_entropy(
            input, target, weight, ignore_index=ignore_index, reduction=reduction, label_smoothing=label_smoothing
        )
    for name, tensor in (("input", input), ("target", target)):
        if not isinstance(tensor, torch.Tensor):
            raise ArgumentTypeError(f"{name} must be a tensor, got {type(tensor).__name__}")
    if input.dim() == 0:
        raise ArgumentError("input must have shape (C,), (N, C) or (N, C, d1, ..., dK), got a scalar")
    expected = input.shape[:1] + input.shape[2:] if input.dim() > 1 else torch.Size([])
    if target.shape != expected:
        raise ArgumentError(
            f"target must have shape {tuple(expected)} (input {tuple(input.shape)} without its class dim 1), "
            f"got {tuple(target.shape)}"
        )
    classes = input.shape[1] if input.dim() > 1 else input.shape[0]
    logits = input.movedim(1, -1).reshape(-1, classes) if input.dim() > 1 else input[None]
    loss = _cross_entropy(
        logits,
        target.reshape(-1),
        weight,
        ignore_index,
        reduction,
        label_smoothing,
        z_loss=z_loss,
        inplace_backward=inplace_backward,
        backend=backend,
    )
    return loss.reshape(target.shape) if reduction == "none" else loss
