"""Drop-in modules: the same constructor arguments and state_dict keys as their torch
counterparts (they subclass them), with lmkern's kernels in forward; AddLayerNorm and
AddRMSNorm, a residual add and the norm in one pass; FusedFFN, the transformer
feed-forward sub-block as one module; and FusedGatedFFN, the gated feed-forward of
Llama-family models (lmkern.swiglu)."""

import torch

import lmkern  # for lmkern.add_layer_norm / add_rms_norm at call time (this module is imported while lmkern is)
from lmkern import functional
from lmkern.ops.ffn import ffn
from lmkern.ops.linear_gelu import check_approximate
from lmkern.ops.swiglu import check_activation, swiglu


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


class LayerNorm(torch.nn.LayerNorm):
    """torch.nn.LayerNorm on lmkern's kernels (see lmkern.layer_norm).

    Keyword-only extra: backend (as in lmkern.layer_norm).
    """

    def __init__(
        self,
        normalized_shape,
        eps=1e-5,
        elementwise_affine=True,
        bias=True,
        device=None,
        dtype=None,
        *,
        backend=None,
    ):
        super().__init__(normalized_shape, eps, elementwise_affine, bias, device, dtype)
        self.backend = backend

    def forward(self, input):
        return functional.layer_norm(
            input, self.normalized_shape, self.weight, self.bias, self.eps, backend=self.backend
        )

    def extra_repr(self):
        backend = f", backend={self.backend!r}" if self.backend is not None else ""
        return super().extra_repr() + backend


class ResidualAdd:
    """What AddLayerNorm and AddRMSNorm add to their norm: the keyword-only dropout and
    prenorm, checked, and a norm over the last dimension only."""

    def __init__(self, normalized_shape, *args, dropout=0.0, prenorm=True, **kwargs):
        super().__init__(normalized_shape, *args, **kwargs)
        if len(self.normalized_shape) != 1:
            raise ValueError(f"normalized_shape must be one dimension, the last, got {normalized_shape}")
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        self.dropout = dropout
        self.prenorm = prenorm

    def extra_repr(self):
        return f"{super().extra_repr()}, prenorm={self.prenorm}, dropout={self.dropout}"


class AddLayerNorm(ResidualAdd, LayerNorm):
    """A residual add, dropout and LayerNorm in one pass (lmkern.add_layer_norm), as a
    LayerNorm over the last dimension (same constructor arguments and state_dict keys)
    whose forward takes a sub-layer's output and the residual stream:

        prenorm=True  (pre-LN):        forward(branch, stream) = (LayerNorm(s), s)
        prenorm=False (post-LN, BERT): forward(branch, stream) = LayerNorm(s)

    with s = stream + dropout(branch), the new residual stream (stream None: s =
    dropout(branch)). Dropout applies in training mode only.

    Keyword-only extras: dropout (drop probability of the branch), prenorm, and LayerNorm's
    backend (as in lmkern.add_layer_norm).
    """

    def forward(self, branch, stream):
        return lmkern.add_layer_norm(
            branch,
            stream,
            self.weight,
            self.bias,
            self.eps,
            dropout_p=self.dropout if self.training else 0.0,
            prenorm=self.prenorm,
            backend=self.backend,
        )


class RMSNorm(torch.nn.RMSNorm):
    """torch.nn.RMSNorm on lmkern's kernels (see lmkern.rms_norm).

    Keyword-only extras: weight_offset (1.0 for Gemma's (1 + weight): the weight is then
    initialised to zeros, so that a new module scales by 1 as torch's does) and backend
    (as in lmkern.rms_norm).
    """

    def __init__(
        self, normalized_shape, eps=None, elementwise_affine=True, device=None, dtype=None, *, weight_offset=0.0,
        backend=None,
    ):
        self.weight_offset = weight_offset  # read by reset_parameters, which torch's __init__ calls
        super().__init__(normalized_shape, eps, elementwise_affine, device, dtype)
        self.backend = backend

    def reset_parameters(self):
        if self.weight is not None and self.weight_offset:
            torch.nn.init.constant_(self.weight, 1.0 - self.weight_offset)
        else:
            super().reset_parameters()

    def forward(self, input):
        return functional.rms_norm(
            input, self.normalized_shape, self.weight, self.eps, weight_offset=self.weight_offset,
            backend=self.backend,
        )

    def extra_repr(self):
        extras = [f"weight_offset={self.weight_offset}"] if self.weight_offset else []
        if self.backend is not None:
            extras.append(f"backend={self.backend!r}")
        return ", ".join([super().extra_repr(), *extras])


class AddRMSNorm(ResidualAdd, RMSNorm):
    """A residual add, dropout and RMSNorm in one pass (lmkern.add_rms_norm), as an RMSNorm
    over the last dimension (same constructor arguments and state_dict keys) whose forward
    takes a sub-layer's output and the residual stream:

        prenorm=True  (pre-norm, Llama): forward(branch, stream) = (RMSNorm(s), s)
        prenorm=False (post-norm):       forward(branch, stream) = RMSNorm(s)

    with s = stream + dropout(branch), the new residual stream (stream None: s =
    dropout(branch)). Dropout applies in training mode only.

    Keyword-only extras: dropout (drop probability of the branch), prenorm, and RMSNorm's
    weight_offset and backend (as in lmkern.add_rms_norm).
    """

    def forward(self, branch, stream):
        return lmkern.add_rms_norm(
            branch,
            stream,
            self.weight,
            self.eps,
            dropout_p=self.dropout if self.training else 0.0,
            prenorm=self.prenorm,
            weight_offset=self.weight_offset,
            backend=self.backend,
        )


class FusedFFN(torch.nn.Module):
    """The transformer feed-forward sub-block in one fused op (lmkern.ffn):

        prenorm=True  (GPT):  x + dropout(fc2(gelu(fc1(norm(x)))))
        prenorm=False (BERT): norm(x + dropout(fc2(gelu(fc1(x)))))

    without the "x +" when residual=False. Dropout applies in training mode only.

    Submodules and state_dict keys are those of a plain torch block with the same names:
    norm (lmkern.nn.LayerNorm(hidden_size), a torch.nn.LayerNorm), fc1
    (torch.nn.Linear(hidden_size, ffn_size)) and fc2 (torch.nn.Linear(ffn_size,
    hidden_size)): "norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight",
    "fc2.bias" (the biases absent with bias=False), registered in the order they apply
    (post-LN: fc1, fc2, norm), which orders parameters() and state_dict().
    FusedFFN.from_modules wraps existing torch modules.

    Args:
        hidden_size, ffn_size: D and F (GPT-2: 768 and 3072).
        eps: LayerNorm's.
        approximate: GELU's, "none" or "tanh" (GPT-2 uses "tanh").
        dropout: drop probability of fc2's output.
        prenorm, residual, recompute, backend: as in lmkern.ffn.
        bias: whether the LayerNorm and both linear layers have biases.
        device, dtype: of the parameters.
    """

    def __init__(
        self,
        hidden_size,
        ffn_size,
        *,
        eps=1e-5,
        approximate="none",
        dropout=0.0,
        prenorm=True,
        residual=True,
        recompute=False,
        bias=True,
        device=None,
        dtype=None,
        backend=None,
    ):
        super().__init__()
        check_approximate(approximate)
        if not 0.0 <= dropout <= 1.0:
            raise ValueError(f"dropout must be in [0, 1], got {dropout}")
        factory = dict(device=device, dtype=dtype)
        norm = LayerNorm(hidden_size, eps=eps, bias=bias, **factory, backend=backend)
        if prenorm:
            self.norm = norm
        self.fc1 = torch.nn.Linear(hidden_size, ffn_size, bias=bias, **factory)
        self.fc2 = torch.nn.Linear(ffn_size, hidden_size, bias=bias, **factory)
        if not prenorm:
            self.norm = norm
        self.approximate = approximate
        self.dropout = dropout
        self.prenorm = prenorm
        self.residual = residual
        self.recompute = recompute
        self.backend = backend

    @classmethod
    def from_modules(
        cls, norm, fc1, activation, fc2, dropout=None, *, prenorm=True, residual=True, recompute=False, backend=None
    ):
        """A FusedFFN that uses these modules' parameters (shared, not copied).

        norm: torch.nn.LayerNorm over D; fc1: torch.nn.Linear(D, F); activation:
        torch.nn.GELU; fc2: torch.nn.Linear(F, D); dropout: torch.nn.Dropout or None. So
        FusedFFN.from_modules(*nn.Sequential(LayerNorm, Linear, GELU, Linear, Dropout),
        residual=False) computes what that Sequential does.
        """
        if not isinstance(norm, torch.nn.LayerNorm) or len(norm.normalized_shape) != 1:
            raise TypeError(f"norm must be a torch.nn.LayerNorm over the last dimension, got {norm!r}")
        if not isinstance(activation, torch.nn.GELU):
            raise TypeError(f"activation must be a torch.nn.GELU, got {activation!r}")
        if dropout is not None and not isinstance(dropout, torch.nn.Dropout):
            raise TypeError(f"dropout must be a torch.nn.Dropout or None, got {dropout!r}")
        hidden_size = norm.normalized_shape[0]
        if not isinstance(fc1, torch.nn.Linear) or fc1.in_features != hidden_size:
            raise ValueError(f"fc1 must be a torch.nn.Linear from {hidden_size} features, got {fc1!r}")
        if not isinstance(fc2, torch.nn.Linear) or (fc2.in_features, fc2.out_features) != (fc1.out_features, hidden_size):
            raise ValueError(
                f"fc2 must be a torch.nn.Linear from {fc1.out_features} features to {hidden_size}, got {fc2!r}"
            )
        module = cls(
            hidden_size,
            fc1.out_features,
            eps=norm.eps,
            approximate=activation.approximate,
            dropout=0.0 if dropout is None else dropout.p,
            prenorm=prenorm,
            residual=residual,
            recompute=recompute,
            device="meta",  # placeholders, replaced by the given modules below
            backend=backend,
        )
        module.norm, module.fc1, module.fc2 = norm, fc1, fc2
        return module

    def forward(self, x):
        return ffn(
            x,
            self.norm.weight,
            self.norm.bias,
            self.fc1.weight,
            self.fc1.bias,
            self.fc2.weight,
            self.fc2.bias,
            eps=self.norm.eps,
            approximate=self.approximate,
            dropout_p=self.dropout if self.training else 0.0,
            prenorm=self.prenorm,
            residual=self.residual,
            recompute=self.recompute,
            backend=self.backend,
        )

    def extra_repr(self):
        extras = [f"prenorm={self.prenorm}", f"approximate={self.approximate!r}", f"dropout={self.dropout}"]
        if not self.residual:
            extras.append("residual=False")
        if self.recompute:
            extras.append("recompute=True")
        if self.backend is not None:
            extras.append(f"backend={self.backend!r}")
        return ", ".join(extras)


class FusedGatedFFN(torch.nn.Module):
    """The gated feed-forward of Llama, Mistral, Qwen and Gemma in one fused op (lmkern.swiglu):

        down_proj(act(gate_proj(x)) * up_proj(x))

    Submodules and state_dict keys are those of transformers' LlamaMLP (bias-free
    torch.nn.Linear layers): gate_proj (hidden_size -> intermediate_size), up_proj (the
    same) and down_proj (intermediate_size -> hidden_size): "gate_proj.weight",
    "up_proj.weight", "down_proj.weight", so a LlamaMLP's state_dict loads as it is.

    Args:
        hidden_size, intermediate_size: D and F (Llama 2 7B: 4096 and 11008).
        activation: "silu" (SwiGLU, Llama's), "gelu" or "gelu_tanh" (GeGLU; Gemma uses
            "gelu_tanh"), as in lmkern.swiglu.
        recompute, backend: as in lmkern.swiglu.
        device, dtype: of the parameters.
    """

    def __init__(
        self, hidden_size, intermediate_size, activation="silu", *, recompute=False, device=None, dtype=None,
        backend=None,
    ):
        super().__init__()
        check_activation(activation)
        factory = dict(bias=False, device=device, dtype=dtype)
        self.gate_proj = torch.nn.Linear(hidden_size, intermediate_size, **factory)
        self.up_proj = torch.nn.Linear(hidden_size, intermediate_size, **factory)
        self.down_proj = torch.nn.Linear(intermediate_size, hidden_size, **factory)
        self.activation = activation
        self.recompute = recompute
        self.backend = backend

    def forward(self, x):
        return swiglu(
            x,
            self.gate_proj.weight,
            self.up_proj.weight,
            self.down_proj.weight,
            activation=self.activation,
            recompute=self.recompute,
            backend=self.backend,
        )

    def extra_repr(self):
        extras = [f"activation={self.activation!r}"]
        if self.recompute:
            extras.append("recompute=True")
        if self.backend is not None:
            extras.append(f"backend={self.backend!r}")
        return ", ".join(extras)
