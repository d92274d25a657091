"""The transformer feed-forward sub-block in one autograd Function: lmkern.ffn.

    pre-LN (GPT):   out = x + dropout(W2 gelu(W1 LayerNorm(x) + b1) + b2)
    post-LN (BERT): out = LayerNorm(x + dropout(W2 gelu(W1 x + b1) + b2))

built from the kernels of lmkern.layer_norm / add_layer_norm and lmkern.linear_gelu: the
LayerNorm, the first matmul with bias + GELU in its epilogue, the second matmul with bias
+ dropout + residual in its epilogue (pre-LN) or followed by the fused residual add +
dropout + LayerNorm (post-LN).

It saves as little as possible: the fp32 LayerNorm statistics, the (N, F) pre-activation
of GELU and, post-LN, the normalised sum (N, D); with recompute=True not even the
pre-activation. The LayerNorm output, the GELU output and the dropout mask are recomputed
in backward (the GELU output by the same kernel that applies GELU', a row chunk at a
time; the mask from its seed). Eager PyTorch keeps all of them.
"""

import dataclasses
import math

import torch

from lmkern import philox
from lmkern.backend import Call
from lmkern.errors import ArgumentError
from lmkern.ops import layer_norm as ln_ops
from lmkern.ops import linear_gelu as lg_ops
from lmkern.ops.autocast import autocast_dtype, cast_for_autocast, without_autocast
from lmkern.ops.double_backward import reference_grads
from lmkern.ops.ffn.backends import FFN
from lmkern.ops.layer_norm.backends import LAYER_NORM
from lmkern.ops.linear_cross_entropy import add_matmul_wide
from lmkern.ops.linear_gelu.backends import LINEAR_GELU


@dataclasses.dataclass(frozen=True)
class FFNOptions:
    eps: float
    activation: str  # "gelu" or "gelu_tanh"
    dropout_p: float
    seed: int
    prenorm: bool
    residual: bool
    recompute: bool
    backend: str  # of both the LayerNorm and the linear_gelu kernels


def ffn_fwd(norm, linear, x, norm_weight, norm_bias, w1, b1, w2, b2, opt):
    """The forward on the LayerNorm implementation `norm` and the linear one `linear`:
    (out, mean, rstd, pre, summed), the last four what backward needs (pre None with
    opt.recompute; summed, the normalised sum, None pre-LN).

    The matmuls run in the weights' dtype; where x (the residual stream) has another
    (autocast: an fp32 stream, half-precision matmuls), the LayerNorm and the residual
    stay in x's dtype and the branch is cast between them."""
    compute = w1.dtype
    residual = x if opt.residual else None
    summed = None
    if opt.prenorm:
        h, mean, rstd, _ = norm.layer_norm_fwd(x, norm_weight, norm_bias, opt.eps)
        g, pre = linear.linear_gelu_fwd(h.to(compute), w1, b1, opt.activation, not opt.recompute)
        del h
        fused = residual is not None and x.dtype == compute  # the epilogue adds a residual of its own dtype
        out, _ = linear.linear_gelu_fwd(g, w2, b2, "none", False, opt.dropout_p, opt.seed, residual if fused else None)
        if residual is not None and not fused:
            out = (residual + out).to(x.dtype)
    else:
        g, pre = linear.linear_gelu_fwd(x.to(compute), w1, b1, opt.activation, not opt.recompute)
        y, _ = linear.linear_gelu_fwd(g, w2, b2, "none", False)
        del g
        y = y.to(x.dtype)
        adds = residual is not None or opt.dropout_p > 0
        out, mean, rstd, summed = norm.layer_norm_fwd(
            y, norm_weight, norm_bias, opt.eps, residual, opt.dropout_p, opt.seed, keep_sum=adds
        )
        if not adds:
            summed = y
    return out, mean, rstd, pre, summed


class FFNFunction(torch.autograd.Function):
    @staticmethod
    @without_autocast
    def forward(ctx, x, norm_weight, norm_bias, w1, b1, w2, b2, opt):
        norm, linear = LAYER_NORM.implementation(opt.backend), LINEAR_GELU.implementation(opt.backend)
        out, mean, rstd, pre, summed = ffn_fwd(norm, linear, x, norm_weight, norm_bias, w1, b1, w2, b2, opt)
        ctx.save_for_backward(x, norm_weight, norm_bias, w1, b1, w2, b2, mean, rstd, pre, summed)
        ctx.norm, ctx.linear, ctx.opt = norm, linear, opt
        return out

    @staticmethod
    @without_autocast
    def backward(ctx, grad_out):
        x, norm_weight, norm_bias, w1, b1, w2, b2, mean, rstd, pre, summed = ctx.saved_tensors
        norm, linear, opt = ctx.norm, ctx.linear, ctx.opt
        needs = ctx.needs_input_grad
        if torch.is_grad_enabled():  # create_graph=True: differentiable gradients, through the reference

            def forward(*inputs):
                return ffn_fwd(ln_ops.reference, lg_ops.reference, *inputs, opt)[0]

            inputs = (x, norm_weight, norm_bias, w1, b1, w2, b2)
            return *reference_grads(forward, inputs, needs[:7], (grad_out,)), None
        compute = w1.dtype
        has_bias = norm_bias is not None
        grad_out = ln_ops.last_dim_contiguous(grad_out)
        if opt.prenorm:
            # Through dropout and the second bias; the residual's gradient is grad_out itself.
            grad_y, grad_b2, _ = lg_ops.epilogue_bwd(linear, grad_out.to(compute), None, "none", opt.dropout_p, opt.seed)
        else:
            grad_y, grad_x_residual, grad_norm_weight, grad_norm_bias = norm.layer_norm_bwd(
                grad_out, None, summed, norm_weight, mean, rstd, opt.dropout_p, opt.seed, has_bias
            )
            _, grad_b2, _ = lg_ops.epilogue_bwd(linear, grad_y.to(compute), None, "none")
        h = norm.layer_norm_fwd(x, norm_weight, norm_bias, opt.eps)[0] if opt.prenorm else x
        h = h.to(compute)
        if pre is None:  # recompute=True
            pre, _ = linear.linear_gelu_fwd(h, w1, b1, "none", False)
        grad_pre, grad_b1, grad_w2 = gelu_and_fc2_grads(linear, grad_y.to(compute), pre, w2, opt.activation, needs[5])
        del pre, grad_y
        grad_h, grad_w1 = lg_ops.matmul_grads(grad_pre, h, w1, (True, needs[3]))
        grad_h = grad_h.to(x.dtype)
        if opt.prenorm:
            # The residual's gradient enters LayerNorm's backward as the gradient of its input.
            grad_x, _, grad_norm_weight, grad_norm_bias = norm.layer_norm_bwd(
                grad_h, grad_out if opt.residual else None, x, norm_weight, mean, rstd, 0.0, 0, has_bias
            )
        else:
            grad_x = grad_h + grad_x_residual if opt.residual else grad_h
        return (
            grad_x,
            grad_norm_weight,
            grad_norm_bias,
            grad_w1,
            grad_b1 if needs[4] else None,
            grad_w2,
            grad_b2 if needs[6] else None,
            None,
        )


# Row chunks of the backward through fc2 and GELU: GELU's output, recomputed there, exists
# one chunk at a time. At most this many chunks, and none shorter than D rows, so that
# adding a chunk's d(w2) (D x F) moves no more memory than the chunk (rows x F) itself.
BACKWARD_CHUNKS = 4


def gelu_and_fc2_grads(linear, grad_y, pre, w2, activation, needs_w2):
    """Backward through g = gelu(pre) and y = g @ w2.T + b2, given d(y) = grad_y (N, D).

    Returns d(pre) = gelu'(pre) (grad_y @ w2) (N, F), d(b1) (F,) in fp32 and d(w2) =
    grad_y.T @ g (None unless needs_w2), by down_projection_grads: one kernel turns each
    chunk's d(g) into d(pre) in place and recomputes the chunk's g for d(w2). Peak extra
    memory: d(pre) and one chunk of g, where eager autograd holds the saved g, d(g) and
    d(pre) at once.
    """
    grad_pre = grad_y.new_empty(grad_y.shape[0], w2.shape[1])
    grad_b1 = torch.zeros(w2.shape[1], dtype=torch.promote_types(grad_y.dtype, torch.float32), device=grad_y.device)

    def epilogue(rows):
        _, chunk_b1, g = linear.linear_gelu_bwd(grad_pre[rows], pre[rows], activation, 0.0, 0, needs_w2, inplace=True)
        grad_b1.add_(chunk_b1)
        return g

    grad_w2 = down_projection_grads(grad_y, w2, grad_pre, epilogue, needs_w2)
    return grad_pre, grad_b1, grad_w2


def down_projection_grads(grad_y, w2, grad_g, epilogue_bwd, needs_w2):
    """The backward of y = g @ w2.T (+ b2) where g is an epilogue's output that backward
    recomputes rather than saved: row chunk by row chunk, the matmul writes d(g) = grad_y @
    w2 into the chunk's rows of grad_g (N, F), then epilogue_bwd(rows) (a slice) turns them
    in place into the gradient of the epilogue's input and returns the chunk's g (needed
    only if needs_w2), accumulated into d(w2) = grad_y.T @ g in fp32. So g exists one
    chunk at a time. Returns d(w2) in w2's dtype, or None unless needs_w2.
    """
    n_rows = grad_y.shape[0]
    wide = torch.promote_types(grad_y.dtype, torch.float32)
    grad_w2 = torch.zeros_like(w2, dtype=wide) if needs_w2 else None
    step = max(1, math.ceil(n_rows / BACKWARD_CHUNKS), w2.shape[0])
    for start in range(0, n_rows, step):
        rows = slice(start, start + step)
        torch.mm(grad_y[rows], w2, out=grad_g[rows])
        g = epilogue_bwd(rows)
        if needs_w2:
            add_matmul_wide(grad_w2, grad_y[rows].T, g)
    return None if grad_w2 is None else grad_w2.to(w2.dtype)


def ffn(
    x,
    norm_weight,
    norm_bias,
    w1,
    b1,
    w2,
    b2,
    *,
    eps=1e-5,
    approximate="none",
    dropout_p=0.0,
    prenorm=True,
    residual=True,
    recompute=False,
    backend=None,
):
    """The feed-forward sub-block of a transformer layer, forward and backward fused.

        prenorm=True  (GPT):  out = x + dropout(fc2(gelu(fc1(LayerNorm(x)))))
        prenorm=False (BERT): out = LayerNorm(x + dropout(fc2(gelu(fc1(x)))))

    with fc1(h) = h @ w1.T + b1 and fc2(g) = g @ w2.T + b2; residual=False leaves out the
    "x +" (pre-LN with residual=False is nn.Sequential(LayerNorm, Linear, GELU, Linear,
    Dropout)).

    Args:
        x: (..., D) float32/float16/bfloat16 (float64 runs on the torch backend).
        norm_weight, norm_bias: (D,) LayerNorm weight and bias, or None.
        w1: (F, D) and b1: (F,) or None, the first linear layer; w2: (D, F) and b2: (D,)
            or None, the second. Weights in x's dtype; under torch.autocast any float
            dtype, cast to the autocast dtype, in which the matmuls then run while the
            LayerNorm and the residual stay in x's dtype (an fp32 stream stays fp32).
        eps: LayerNorm's eps.
        approximate: GELU's, "none" or "tanh".
        dropout_p: dropout on fc2's output (as F.dropout with training=True), with
            lmkern's counter-based RNG: the mask is drawn again in backward, never stored.
        recompute: also recompute the (N, F) GELU pre-activation in backward (one more
            matmul) instead of saving it.
        backend: "torch", "triton", "native" or "auto" for the LayerNorm and linear_gelu
            kernels; the other matmuls are torch's.

    Returns (..., D) in x's dtype.
    """
    ln_ops.check_float_tensor(x, "x")
    if x.dim() == 0:
        raise ArgumentError("x must have at least one dimension (..., D), got a scalar")
    w1, w2 = cast_for_autocast(x, w1, w2)[1:]
    compute = autocast_dtype(x.device.type) or x.dtype
    width = x.shape[-1]
    ln_ops.check_param(norm_weight, "norm_weight", (width,), x)
    ln_ops.check_param(norm_bias, "norm_bias", (width,), x)
    lg_ops.check_linear(w1, b1, x, width, "w1", "b1", dtype=compute)
    lg_ops.check_linear(w2, b2, x, w1.shape[0], "w2", "b2", dtype=compute)
    if w2.shape[0] != width:
        raise ArgumentError(f"w2 must have shape ({width}, {w1.shape[0]}) to give back x's width, got {tuple(w2.shape)}")
    lg_ops.check_approximate(approximate)
    ln_ops.check_eps_dropout(eps, dropout_p)
    options = FFNOptions(
        eps=float(eps),
        activation=lg_ops.ACTIVATION[approximate],
        dropout_p=float(dropout_p),
        seed=philox.draw_seed() if dropout_p > 0 else 0,
        prenorm=prenorm,
        residual=residual,
        recompute=recompute,
        backend=FFN.resolve(Call.of(x, width=width), backend, empty=x.numel() == 0 or w1.shape[0] == 0),
    )
    out = FFNFunction.apply(
        ln_ops.as_rows(x, width),
        ln_ops.as_stats_param(norm_weight, width, x.dtype),
        ln_ops.as_stats_param(norm_bias, width, x.dtype),
        w1,
        ln_ops.as_stats_param(b1, w1.shape[0], x.dtype),
        w2,
        ln_ops.as_stats_param(b2, width, x.dtype),
        options,
    )
    return out.view(x.shape)
