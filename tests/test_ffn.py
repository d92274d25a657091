"""The fused feed-forward sub-block: every backend against the reference under the
tolerance rule (output and all seven gradients), the reference against plain torch, what
it saves for backward, the dropout mask, the FusedFFN module and its state_dict, and bad
input."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_matches_reference, bad_call_test, outputs_and_grads
from test_linear_gelu import saved_bytes

import lmkern
from lmkern import philox
from lmkern.ops.dropout import dropout

NAMES = ["out", "grad_x", "grad_norm_weight", "grad_norm_bias", "grad_w1", "grad_b1", "grad_w2", "grad_b2"]

# id -> (x shape, ffn width, keyword arguments)
CASES = {
    "gpt2_like": ((2, 6, 48), 192, dict(approximate="tanh")),
    "bert_like": ((10, 64), 256, dict(prenorm=False)),
    "prenorm_dropout_odd": ((3, 5, 33), 70, dict(dropout_p=0.2)),
    "postnorm_dropout_recompute": ((7, 40), 100, dict(prenorm=False, dropout_p=0.3, recompute=True)),
    "no_residual_recompute": ((9, 24), 72, dict(residual=False, recompute=True)),
    "postnorm_no_residual": ((8, 32), 64, dict(prenorm=False, residual=False, approximate="tanh")),
    # 90 rows of width 16: the backward through fc2 and GELU runs in row chunks 23, 23, 23, 21.
    "chunked_backward": ((2, 45, 16), 40, dict(dropout_p=0.1)),
}


def make(shape, ffn_width, dtype, device, bias=True):
    """x and the seven parameters, requires_grad (biases None without bias)."""
    width = shape[-1]

    def param(*size, scale=1.0, offset=0.0):
        return (torch.randn(size) * scale + offset).to(device, dtype).requires_grad_()

    return (
        param(*shape),
        param(width, scale=0.2, offset=1.0),
        param(width, scale=0.2) if bias else None,
        param(ffn_width, width, scale=width**-0.5),
        param(ffn_width, scale=0.5) if bias else None,
        param(width, ffn_width, scale=ffn_width**-0.5),
        param(width, scale=0.5) if bias else None,
    )


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, backend, dtype, case):
    require(backend, device, dtype, "linear_gelu")
    shape, ffn_width, kwargs = CASES[case]

    def op(*args, backend):
        return lmkern.ffn(*args, **kwargs, backend=backend)

    assert_matches_reference(op, make(shape, ffn_width, dtype, device), backend, NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_without_biases_and_noncontiguous_x(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    inputs = list(make((4, 2, 30), 90, torch.float32, "cpu", bias=False))
    inputs[0] = inputs[0].detach().transpose(0, 1).requires_grad_()  # (2, 4, 30), strided

    def op(*args, backend):
        return lmkern.ffn(*args, dropout_p=0.1, backend=backend)

    assert_matches_reference(op, inputs, backend, NAMES)


def plain_torch_ffn(x, norm_w, norm_b, w1, b1, w2, b2, prenorm, residual, approximate, seed=None, p=0.0):
    """The sub-block in eager torch, dropout drawn like lmkern's (same seed, same mask)."""

    def mlp(h):
        y = F.linear(F.gelu(F.linear(h, w1, b1), approximate=approximate), w2, b2)
        return dropout(y.reshape(-1, y.shape[-1]), seed, p).view(y.shape)

    norm = lambda t: F.layer_norm(t, (t.shape[-1],), norm_w, norm_b)  # noqa: E731
    if prenorm:
        return (x if residual else 0) + mlp(norm(x))
    return norm((x if residual else 0) + mlp(x))


@pytest.mark.parametrize("case", CASES)
def test_reference_matches_plain_torch(case):
    shape, ffn_width, kwargs = CASES[case]
    inputs = make(shape, ffn_width, torch.float64, "cpu")
    p = kwargs.get("dropout_p", 0.0)
    torch.manual_seed(0)
    seed = philox.draw_seed()  # what lmkern.ffn draws after the same torch.manual_seed(0)
    options = dict(prenorm=kwargs.get("prenorm", True), residual=kwargs.get("residual", True))
    approximate = kwargs.get("approximate", "none")
    ours = outputs_and_grads(lambda *a: lmkern.ffn(*a, **kwargs, backend="torch"), inputs, torch.float64)
    theirs = outputs_and_grads(
        lambda *a: plain_torch_ffn(*a, **options, approximate=approximate, seed=seed, p=p), inputs, torch.float64
    )
    for name, a, e in zip(NAMES, ours, theirs):
        torch.testing.assert_close(a, e, msg=name)


@pytest.mark.parametrize("backend", BACKENDS)
def test_backends_draw_the_same_mask(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    inputs = make((16, 32), 64, torch.float32, "cpu")
    ones_w2 = torch.zeros(32, 64)
    ones_b2 = torch.ones(32)  # fc2's output is 1 everywhere: out = mask / (1 - p)
    args = (inputs[0], *inputs[1:5], ones_w2, ones_b2)
    masks = []
    for name in ("torch", backend):
        torch.manual_seed(11)
        out = lmkern.ffn(*args, dropout_p=0.5, residual=False, backend=name)
        masks.append(out.detach() != 0)
    assert torch.equal(*masks)
    assert 0.4 < masks[0].float().mean() < 0.6


@pytest.mark.parametrize("prenorm", [True, False])
@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_less_than_eager(backend, prenorm):
    require(backend, "cpu", torch.float32, "linear_gelu")
    n, d, f = 64, 32, 128
    inputs = make((n, d), f, torch.float32, "cpu")
    eager = saved_bytes(lambda: plain_torch_ffn(*inputs, prenorm, True, "none"), inputs)
    fused = saved_bytes(lambda: lmkern.ffn(*inputs, prenorm=prenorm, backend=backend), inputs)
    recomputed = saved_bytes(lambda: lmkern.ffn(*inputs, prenorm=prenorm, recompute=True, backend=backend), inputs)
    stats, summed = 2 * n * 4, 0 if prenorm else n * d * 4
    # Fused: the fp32 statistics, the GELU pre-activation (and post-LN the normalised sum).
    assert fused == stats + n * f * 4 + summed
    assert recomputed == stats + summed
    # Eager keeps the GELU output too, and pre-LN the LayerNorm output.
    assert eager >= fused + n * f * 4 + (n * d * 4 if prenorm else 0)


def test_module_state_dict_round_trips_with_torch_modules():
    class TorchBlock(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.norm, self.fc1, self.fc2 = torch.nn.LayerNorm(24), torch.nn.Linear(24, 96), torch.nn.Linear(96, 24)

    theirs = TorchBlock()
    ours = lmkern.nn.FusedFFN(24, 96, approximate="tanh", backend="torch")
    assert ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24)
    expected = plain_torch_ffn(x, *(p for _, p in theirs.named_parameters()), True, True, "tanh")
    torch.testing.assert_close(ours(x), expected)
    theirs.load_state_dict(lmkern.nn.FusedFFN(24, 96).state_dict())
    assert list(lmkern.nn.FusedFFN(24, 96, bias=False).state_dict()) == ["norm.weight", "fc1.weight", "fc2.weight"]


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_from_sequential_matches_it(backend):
    require(backend, "cpu", torch.float32, "linear_gelu")
    nn = torch.nn
    sequential = nn.Sequential(nn.LayerNorm(40), nn.Linear(40, 80), nn.GELU("tanh"), nn.Linear(80, 40), nn.Dropout(0.1))
    fused = lmkern.nn.FusedFFN.from_modules(*sequential, residual=False, backend=backend)
    assert fused.fc1.weight is sequential[1].weight and fused.approximate == "tanh" and fused.dropout == 0.1
    x = torch.randn(6, 40)
    sequential.eval(), fused.eval()
    torch.testing.assert_close(fused(x), sequential(x))
    fused(x).sum().backward()
    ours = [p.grad.clone() for p in sequential.parameters()]
    sequential.zero_grad()
    sequential(x).sum().backward()
    for a, e in zip(ours, (p.grad for p in sequential.parameters())):
        torch.testing.assert_close(a, e)
    fused.train()
    assert (fused(x) == 0).float().mean() > 0.05  # dropout in training mode only
    with pytest.raises(TypeError, match="activation must be a torch.nn.GELU"):
        lmkern.nn.FusedFFN.from_modules(sequential[0], sequential[1], torch.nn.ReLU(), sequential[3])
    with pytest.raises(ValueError, match="fc2 must be a torch.nn.Linear from 80 features to 40"):
        lmkern.nn.FusedFFN.from_modules(sequential[0], sequential[1], sequential[2], torch.nn.Linear(80, 39))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "linear_gelu")
    _, *params = (p.detach() for p in make((4, 24), 48, torch.float32, "cpu"))

    def step(x):
        pre = lmkern.ffn(x, *params, approximate="tanh")
        post = lmkern.ffn(pre, *params, prenorm=False, recompute=True)
        return post.square().sum()

    assert_compiles_like_eager(step, torch.randn(3, 4, 24))


def _bad_calls():
    x, norm_w, norm_b, w1, b1, w2, b2 = (p.detach() for p in make((4, 16), 32, torch.float32, "cpu"))
    ffn = lmkern.ffn
    return [
        (lambda: ffn(x.long(), norm_w, norm_b, w1, b1, w2, b2), TypeError, "x must be a floating-point tensor"),
        (lambda: ffn(x, norm_w[:3], norm_b, w1, b1, w2, b2), ValueError, r"norm_weight must have shape \(16,\)"),
        (lambda: ffn(x, norm_w, norm_b, w1[:, :8], b1, w2, b2), ValueError, r"w1 must have shape \(out_features, 16\)"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1[:5], w2, b2), ValueError, r"b1 must have shape \(32,\)"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1, w2[:, :5], b2), ValueError, r"w2 must have shape \(out_features, 32\)"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1, w2[:8], None), ValueError, r"w2 must have shape \(16, 32\) to give"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1, w2.half(), b2), ValueError, r"w2 must have the dtype torch.float32 and the input's device"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1, w2, b2, approximate="erf"), ValueError, "approximate must be one of"),
        (lambda: ffn(x, norm_w, norm_b, w1, b1, w2, b2, dropout_p=-0.1), ValueError, r"dropout_p must be in \[0, 1\]"),
        (lambda: lmkern.nn.FusedFFN(16, 32, dropout=2.0), ValueError, r"dropout must be in \[0, 1\]"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)
