"""lmkern.nn's modules for the models' sub-blocks against plain torch modules of the same
state_dict, on every backend: AddLayerNorm (BERT's residual add + LayerNorm) and
AddRMSNorm (Llama's) compute norm(stream + branch) (and the sum, pre-norm), FusedFFN computes GPT's x + mlp(ln_2(x))
and BERT's LayerNorm(x + ffn(x)), values and gradients, each with its op's dropout in
training mode only; and the order of FusedFFN's parameters, which follows the math."""

import pytest
import torch
import torch.nn.functional as F
from conftest import BACKENDS, require

import lmkern


# norm -> (lmkern's module, torch's norm, lmkern's op, the op's kernels)
ADD_NORMS = {
    "layer_norm": (lmkern.nn.AddLayerNorm, torch.nn.LayerNorm,
                   lambda b, s, m, **k: lmkern.add_layer_norm(b, s, m.weight, m.bias, m.eps, **k), "layer_norm"),
    "rms_norm": (lmkern.nn.AddRMSNorm, torch.nn.RMSNorm,
                 lambda b, s, m, **k: lmkern.add_rms_norm(b, s, m.weight, m.eps, **k), "rms_norm"),
}


@pytest.mark.parametrize("norm", ADD_NORMS)
@pytest.mark.parametrize("prenorm", [True, False], ids=["prenorm", "postnorm"])
@pytest.mark.parametrize("backend", BACKENDS)
def test_add_norm_modules_normalise_the_sum_as_torch(backend, prenorm, norm):
    module, torch_module, op, kernels = ADD_NORMS[norm]
    require(backend, "cpu", torch.float32, kernels)
    theirs = torch_module(24, eps=1e-6)
    with torch.no_grad():
        for parameter in theirs.parameters():
            parameter.normal_()
    ours = module(24, eps=1e-6, dropout=0.3, prenorm=prenorm, backend=backend)
    assert isinstance(ours, torch_module) and ours.state_dict().keys() == theirs.state_dict().keys()
    ours.load_state_dict(theirs.state_dict())
    branch, stream = torch.randn(3, 5, 24, requires_grad=True), torch.randn(3, 5, 24)
    out = ours.eval()(branch, stream)  # dropout in training mode only
    if prenorm:
        out, summed = out
        torch.testing.assert_close(summed, stream + branch)
    expected = theirs(stream + branch)
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (branch, *ours.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), (branch, *theirs.parameters()))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)

    torch.manual_seed(1)
    trained = ours.train()(branch, stream)
    torch.manual_seed(1)
    expected = op(branch, stream, ours, dropout_p=0.3, prenorm=prenorm, backend=backend)
    torch.testing.assert_close(trained, expected, rtol=0, atol=0)  # the op's dropout mask, from torch's seed
    assert not torch.allclose(trained[0] if prenorm else trained, out)


@pytest.mark.parametrize("norm", ADD_NORMS)
def test_add_norm_modules_refuse_bad_arguments(norm):
    module = ADD_NORMS[norm][0]
    with pytest.raises(ValueError, match=r"normalized_shape must be one dimension, the last, got \(4, 6\)"):
        module((4, 6))
    with pytest.raises(ValueError, match=r"dropout must be in \[0, 1\], got 2.0"):
        module(8, dropout=2.0)


def test_add_norm_modules_show_their_options():
    module = lmkern.nn.AddLayerNorm(8, 1e-6, dropout=0.1, prenorm=False, backend="torch")
    assert repr(module) == "AddLayerNorm((8,), eps=1e-06, elementwise_affine=True, bias=True, backend='torch', " \
        "prenorm=False, dropout=0.1)"
    module = lmkern.nn.AddRMSNorm(8, 1e-6, dropout=0.1, backend="torch")
    assert repr(module) == "AddRMSNorm((8,), eps=1e-06, elementwise_affine=True, backend='torch', prenorm=True, " \
        "dropout=0.1)"


def test_fused_ffn_parameters_come_in_the_order_they_apply():
    pre, post = (lmkern.nn.FusedFFN(8, 16, prenorm=prenorm) for prenorm in (True, False))
    assert list(pre.state_dict()) == ["norm.weight", "norm.bias", "fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"]
    assert list(post.state_dict()) == ["fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias", "norm.weight", "norm.bias"]


class TorchFFN(torch.nn.Module):
    """The feed-forward sub-block in plain torch, under FusedFFN's state_dict names."""

    def __init__(self, hidden_size, ffn_size, eps, approximate, prenorm):
        super().__init__()
        self.norm = torch.nn.LayerNorm(hidden_size, eps=eps)
        self.fc1 = torch.nn.Linear(hidden_size, ffn_size)
        self.fc2 = torch.nn.Linear(ffn_size, hidden_size)
        self.approximate, self.prenorm = approximate, prenorm

    def mlp(self, h):
        return self.fc2(F.gelu(self.fc1(h), approximate=self.approximate))

    def forward(self, x):
        return x + self.mlp(self.norm(x)) if self.prenorm else self.norm(x + self.mlp(x))


# As the models use FusedFFN: GPT's block (pre-LN, tanh GELU), BERT's layer (post-LN, exact GELU).
FFN_CASES = {"gpt": dict(prenorm=True, approximate="tanh", eps=1e-5),
             "bert": dict(prenorm=False, approximate="none", eps=1e-12)}


@pytest.mark.parametrize("case", FFN_CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_fused_ffn_computes_the_torch_sub_block(backend, case):
    for op in ("layer_norm", "linear_gelu"):
        require(backend, "cpu", torch.float32, op)
    fields = FFN_CASES[case]
    torch.manual_seed(0)
    theirs = TorchFFN(24, 64, **fields)
    with torch.no_grad():
        theirs.norm.weight.normal_(), theirs.norm.bias.normal_()
    ours = lmkern.nn.FusedFFN(24, 64, dropout=0.3, backend=backend, **fields)
    ours.load_state_dict(theirs.state_dict())
    x = torch.randn(3, 5, 24, requires_grad=True)
    out, expected = ours.eval()(x), theirs(x)  # dropout in training mode only
    torch.testing.assert_close(out, expected)
    grads = torch.autograd.grad(out.square().sum(), (x, *ours.parameters()))
    expected_grads = torch.autograd.grad(expected.square().sum(), (x, *(theirs.get_parameter(name)
                                                                         for name, _ in ours.named_parameters())))
    for grad, expected_grad in zip(grads, expected_grads):
        torch.testing.assert_close(grad, expected_grad)

    torch.manual_seed(1)
    trained = ours.train()(x)
    torch.manual_seed(1)
    op = lmkern.ffn(x, ours.norm.weight, ours.norm.bias, ours.fc1.weight, ours.fc1.bias, ours.fc2.weight,
                    ours.fc2.bias, eps=fields["eps"], approximate=fields["approximate"], dropout_p=0.3,
                    prenorm=fields["prenorm"], backend=backend)
    torch.testing.assert_close(trained, op, rtol=0, atol=0)  # the op's dropout mask, from torch's seed
    assert not torch.allclose(trained, out)
