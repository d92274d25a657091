"""Drop-in modules: the same constructor arguments and state_dict keys as their torch
counterparts (they subclass them), with lmkern's kernels in forward."""

import torch

from lmkern import functional


class CrossEntropyLoss(torch.nn.CrossEntropyLoss):
    """torch.nn.CrossEntropyLoss on lmkern's fused kernel (see lmkern.functional.cross_entropy).

    Keyword-only extras: z_loss, inplace_backward, backend (as in lmkern.cross_entropy).
    """

    def __init__(
        self,
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
        super().__init__(weight, size_average, ignore_index, reduce, reduction, label_smoothing)
        self.z_loss = z_loss
        self.inplace_backward = inplace_backward
        self.backend = backend

    def forward(self, input, target):
        return functional.cross_entropy(
            input,
            target,
            self.weight,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            label_smoothing=self.label_smoothing,
            z_loss=self.z_loss,
            inplace_backward=self.inplace_backward,
            backend=self.backend,
        )

    def extra_repr(self):
        extras = [f"z_loss={self.z_loss}"] if self.z_loss else []
        if self.inplace_backward:
            extras.append("inplace_backward=True")
        if self.backend is not None:
            extras.append(f"backend={self.backend!r}")
        return ", ".join(extras)
