"""The gated feed-forward (SwiGLU / GeGLU): every backend and activation against the
reference under the tolerance rule (output and all gradients), odd and strided shapes,
what backward saves against eager, empty input, the torch.library registration, bad
input, and lmkern.nn.FusedGatedFFN against transformers' LlamaMLP. Second derivatives
and autocast: tests/test_dropin.py and tests/test_autocast.py."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, DEVICES, DTYPES, assert_compiles_like_eager, require
from op_check import assert_all_close_to_truth, assert_matches_reference, bad_call_test, outputs_and_grads
from test_linear_gelu import saved_bytes

import lmkern

ACTIVATIONS = ("silu", "gelu", "gelu_tanh")
NAMES = ["out", "grad_x", "grad_w_gate", "grad_w_up", "grad_w_down"]

# id -> (x shape, F, D_out, recompute)
CASES = {
    "square": ((40, 64), 96, 64, False),
    "batch_dims_recompute": ((2, 9, 48), 80, 48, True),
    "odd": ((33, 70), 50, 23, False),
    "one_row": ((1, 24), 40, 24, True),
    "tiny_odd": ((17, 7), 13, 9, False),
}


def make(shape, features, out_features, dtype, device):
    """x (..., D) and the weights scaled so that gate and up are O(1) (the activations'
    curved part) and so is out."""
    d = shape[-1]
    x = torch.randn(shape).to(device, dtype).requires_grad_()
    w_gate, w_up = ((torch.randn(features, d) / d**0.5 * 1.5).to(device, dtype).requires_grad_() for _ in range(2))
    w_down = (torch.randn(out_features, features) / features**0.5).to(device, dtype).requires_grad_()
    return x, w_gate, w_up, w_down


def op(activation, recompute=False):
    def run(x, w_gate, w_up, w_down, backend):
        return lmkern.swiglu(x, w_gate, w_up, w_down, activation=activation, recompute=recompute, backend=backend)

    return run


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("device", DEVICES)
def test_matches_reference(device, backend, dtype, activation, case):
    require(backend, device, dtype, "swiglu")
    shape, features, out_features, recompute = CASES[case]
    inputs = make(shape, features, out_features, dtype, device)
    assert_matches_reference(op(activation, recompute), inputs, backend, NAMES)


@pytest.mark.parametrize("backend", BACKENDS)
def test_noncontiguous_input_and_weights(backend):
    require(backend, "cpu", torch.float32, "swiglu")
    x = torch.randn(3, 20, 2, 64)[:, :, 1].requires_grad_()  # strided rows
    w_gate = (torch.randn(64, 50) / 8).T.requires_grad_()  # (50, 64) transposed
    w_up = (torch.randn(50, 128) / 8)[:, ::2].requires_grad_()  # strided columns
    w_down = (torch.randn(50, 30) / 7).T.requires_grad_()
    assert_matches_reference(op("silu"), (x, w_gate, w_up, w_down), backend, NAMES)


def eager_mlp(x, w_gate, w_up, w_down, activation):
    """Llama's MLP as transformers writes it: down_proj(act_fn(gate_proj(x)) * up_proj(x))."""
    act = {"silu": F.silu, "gelu": F.gelu, "gelu_tanh": lambda t: F.gelu(t, approximate="tanh")}[activation]
    return F.linear(act(F.linear(x, w_gate)) * F.linear(x, w_up), w_down)


@pytest.mark.parametrize("activation", ACTIVATIONS)
def test_reference_matches_eager(activation):
    inputs = make((2, 5, 24), 40, 24, torch.float64, "cpu")
    ours = outputs_and_grads(lambda *a: op(activation)(*a, backend="torch"), inputs)
    theirs = outputs_and_grads(lambda *a: eager_mlp(*a, activation), inputs)
    for a, e in zip(ours, theirs):
        torch.testing.assert_close(a, e)


@pytest.mark.parametrize("activation", ACTIVATIONS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("backend", ["native", "triton"])
def test_epilogue_backward_on_strided_rows_matches_reference(backend, dtype, activation):
    """The kernels' contract alone: in place over d(h), rows of the (2, N, F) buffers, any
    row strides."""
    require(backend, "cpu", dtype, "swiglu")
    reference, kernels = (lmkern.backend.OPS["swiglu"].implementation(name) for name in ("torch", backend))
    gate_up = torch.randn(2, 30, 45).to(dtype)
    grads = torch.randn(2, 30, 45).to(dtype)
    wide = torch.randn(30, 90).to(dtype)[:, :45]  # rows 90 apart
    results = []
    for impl in (reference, kernels):
        grad_gate, grad_up = grads.clone(), wide.clone()
        grad_gate[1] = 0
        h = impl.swiglu_bwd(grad_gate[0, 5:25], grad_up[5:25], gate_up[0, 5:25], gate_up[1, 5:25], activation, True)
        results.append((grad_gate, grad_up, h))
    tolerance = dict(atol=1e-5, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-2, rtol=1e-2)
    for got, want in zip(*reversed(results)):
        torch.testing.assert_close(got, want, **tolerance)
    h_ref = reference.swiglu_fwd(torch.eye(45).to(dtype), torch.eye(45).to(dtype), torch.eye(45).to(dtype),
                                 activation, False)[0]
    h_kernel = kernels.swiglu_fwd(torch.eye(45).to(dtype), torch.eye(45).to(dtype), torch.eye(45).to(dtype),
                                  activation, True)[0]
    torch.testing.assert_close(h_kernel, h_ref, **tolerance)


@pytest.mark.parametrize("backend", BACKENDS)
def test_saves_less_than_eager(backend):
    """Fused: the (2, N, F) gate and up (nothing with recompute); eager: gate, act(gate),
    up and h besides x."""
    require(backend, "cpu", torch.float32, "swiglu")
    n, d, f = 64, 32, 128
    inputs = make((n, d), f, d, torch.float32, "cpu")
    eager = saved_bytes(lambda: eager_mlp(*inputs, "silu"), inputs)
    fused = saved_bytes(lambda: op("silu")(*inputs, backend=backend), inputs)
    recomputed = saved_bytes(lambda: op("silu", recompute=True)(*inputs, backend=backend), inputs)
    print(f"saved bytes ({backend}): eager {eager}, fused {fused}, recompute {recomputed}")
    assert fused == 2 * n * f * 4
    assert recomputed == 0
    assert eager >= fused + 2 * n * f * 4


@pytest.mark.parametrize("shape", [(0, 16, 24, 16), (5, 16, 0, 16), (5, 0, 24, 16), (5, 16, 24, 0)],
                         ids=["no_rows", "no_features", "no_width", "no_outputs"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_empty_input(backend, shape):
    require(backend, "cpu", torch.float32, "swiglu")
    n, d, f, d_out = shape
    x, w_gate, w_up, w_down = make((n, d), f, d_out, torch.float32, "cpu")
    out = lmkern.swiglu(x, w_gate, w_up, w_down, backend=backend)
    assert out.shape == (n, d_out)
    out.sum().backward()
    for tensor in (x, w_gate, w_up, w_down):
        assert torch.equal(tensor.grad, torch.zeros_like(tensor))


@pytest.mark.parametrize("device", DEVICES)
def test_native_ops_pass_opcheck(device):
    require("native", device, torch.float32, "swiglu")
    x, w_gate, w_up = torch.randn(10, 24, device=device), torch.randn(40, 24, device=device), torch.randn(
        40, 24, device=device)
    for activation in ACTIVATIONS:
        torch.library.opcheck(torch.ops.lmkern.swiglu_fwd.default, (x, w_gate, w_up, activation))
    gate_up = torch.randn(2, 10, 40, device=device)
    for want in (True, False):
        grads = torch.randn(2, 10, 40, device=device)
        torch.library.opcheck(torch.ops.lmkern.swiglu_bwd_.default,
                              (grads[0], grads[1], gate_up[0], gate_up[1], "silu", want))


def test_compiles_with_fullgraph_on_cpu():
    require("native", "cpu", torch.float32, "swiglu")
    w_gate, w_up, w_down = torch.randn(60, 30) / 5, torch.randn(60, 30) / 5, torch.randn(30, 60) / 8

    def step(x):
        return (lmkern.swiglu(x, w_gate, w_up, w_down).sum()
                + lmkern.swiglu(x, w_gate, w_up, w_down, activation="gelu", recompute=True).square().sum())

    assert_compiles_like_eager(step, torch.randn(3, 8, 30))


@pytest.mark.parametrize("backend", BACKENDS)
def test_module_matches_transformers_llama_mlp(backend):
    require(backend, "cpu", torch.float32, "swiglu")
    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaMLP

    config = LlamaConfig(hidden_size=48, intermediate_size=136, num_attention_heads=4, num_key_value_heads=4,
                         hidden_act="silu", mlp_bias=False)
    theirs = LlamaMLP(config)
    ours = lmkern.nn.FusedGatedFFN(48, 136, backend=backend)
    assert list(ours.state_dict()) == list(theirs.state_dict())
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(2, 7, 48)

    def run(module):
        return lambda x, *params: torch.func.functional_call(module, dict(zip(names, params)), (x,))

    names = [name for name, _ in theirs.named_parameters()]
    params = [p.detach().requires_grad_() for _, p in theirs.named_parameters()]
    inputs = [x.requires_grad_(), *params]
    actual = outputs_and_grads(run(ours), inputs)
    baseline = outputs_and_grads(run(theirs), inputs)
    truth = outputs_and_grads(run(theirs.double()), [t.double() for t in inputs])
    assert_all_close_to_truth(actual, truth, baseline, ["out", "grad_x", *(f"grad {n}" for n in names)])


def test_module_options_and_repr():
    module = lmkern.nn.FusedGatedFFN(16, 24, activation="gelu_tanh", recompute=True, backend="torch")
    assert [name for name, _ in module.named_parameters()] == ["gate_proj.weight", "up_proj.weight", "down_proj.weight"]
    assert module.gate_proj.bias is None
    assert "activation='gelu_tanh'" in repr(module) and "recompute=True" in repr(module)
    assert module(torch.randn(3, 16)).shape == (3, 16)
    with pytest.raises(ValueError, match="activation must be one of"):
        lmkern.nn.FusedGatedFFN(16, 24, activation="relu")


def _bad_calls():
    x, w_gate, w_up, w_down = torch.randn(4, 10), torch.randn(6, 10), torch.randn(6, 10), torch.randn(10, 6)
    sw = lmkern.swiglu
    return [
        (lambda: sw(x.long(), w_gate, w_up, w_down), TypeError, "x must be a floating-point tensor"),
        (lambda: sw(x, w_gate.long(), w_up, w_down), TypeError, "w_gate must be a floating-point tensor"),
        (lambda: sw(x[0, 0], w_gate, w_up, w_down), ValueError, "x must have at least one dimension"),
        (lambda: sw(x, w_gate[:, :9], w_up, w_down), ValueError, r"w_gate must have shape \(out_features, 10\)"),
        (lambda: sw(x, w_gate, w_up[:5], w_down), ValueError, r"w_up must have w_gate's shape \(6, 10\), got \(5, 10\)"),
        (lambda: sw(x, w_gate, w_up, w_down[:, :5]), ValueError, r"w_down must have shape \(out_features, 6\)"),
        (lambda: sw(x, w_gate, w_up.double(), w_down), ValueError, r"w_up must have the dtype torch.float32"),
        (lambda: sw(x, w_gate, w_up, w_down.half()), ValueError, r"w_down must have the dtype torch.float32"),
        (lambda: sw(x, w_gate.to("meta"), w_up, w_down), ValueError, r"w_gate must have the dtype .* input's device"),
        (lambda: sw(x, w_gate, w_up, w_down, activation="relu"), ValueError,
         r"activation must be one of \('silu', 'gelu', 'gelu_tanh'\), got 'relu'"),
        (lambda: sw(x, w_gate, w_up, w_down, backend="cuda"), ValueError, "backend must be one of"),
    ]


test_bad_arguments_name_the_argument = bad_call_test(_bad_calls)


def test_native_ops_check_their_arguments():
    require("native", "cpu", torch.float32, "swiglu")
    x, w = torch.randn(4, 10), torch.randn(6, 10)
    with pytest.raises(RuntimeError, match="activation must be 'silu', 'gelu' or 'gelu_tanh', got 'relu'"):
        torch.ops.lmkern.swiglu_fwd(x, w, w, "relu")
    with pytest.raises(RuntimeError, match=r"swiglu_fwd: w_up must be Float of shape \(6, 10\)"):
        torch.ops.lmkern.swiglu_fwd(x, w, w[:5], "silu")
    grad = torch.randn(4, 6)
    with pytest.raises(RuntimeError, match=r"swiglu_bwd_: up must have shape \[4, 6\]"):
        torch.ops.lmkern.swiglu_bwd_(grad, grad.clone(), grad, grad[:3], "silu", False)
    with pytest.raises(RuntimeError, match="swiglu_bwd_: gate must be contiguous in its last dimension"):
        torch.ops.lmkern.swiglu_bwd_(grad, grad.clone(), torch.randn(6, 4).T, grad, "silu", False)
