"""A first look at lmkern's kernels: fused softmax cross-entropy on every backend this
machine can run, checked against torch.nn.functional.cross_entropy, with forward+backward
timings. Exit status 1 if a backend disagrees with torch.

    lmkern check [--tokens N] [--vocab V] [--device cpu|cuda]   (or python -m lmkern.check)
"""

import argparse
import sys

import torch
import torch.nn.functional as F

import lmkern
from lmkern import backend
from lmkern.measure import time_ms

# Agreement asked of each backend with torch's own cross_entropy, per dtype.
TOLERANCE = {torch.float32: dict(rtol=1e-4, atol=1e-6), torch.bfloat16: dict(rtol=2e-2, atol=1e-4)}


def loss_and_grad(function, logits, target):
    x = logits.detach().requires_grad_()
    loss = function(x, target)
    loss.backward()
    return loss.detach(), x.grad


def add_arguments(parser):
    """The check's options (`lmkern check` and `python -m lmkern.check` take the same)."""
    parser.add_argument("--tokens", type=int, help="rows of logits (default 1024 on CPU, 16384 on CUDA)")
    parser.add_argument("--vocab", type=int, default=50257, help="classes per row (GPT-2's vocabulary)")
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda" if torch.cuda.is_available() else "cpu")


def check(args):
    """Runs the check of the parsed arguments; returns the exit status."""
    device = args.device
    dtype = torch.bfloat16 if device == "cuda" else torch.float32
    tokens = args.tokens or (16384 if device == "cuda" else 1024)

    logits = (2 * torch.randn(tokens, args.vocab, device=device)).to(dtype)
    target = torch.randint(0, args.vocab, (tokens,), device=device)
    target[torch.rand(tokens, device=device) < 0.1] = -100  # some padding
    expected_loss, expected_grad = loss_and_grad(F.cross_entropy, logits, target)

    print(f"lmkern {lmkern.__version__}: cross_entropy on {tokens} x {args.vocab} {dtype} logits ({device})")
    print(f"{'provider':<22} {'fwd+bwd ms (p20-p80)':>24} {'|loss diff|':>12} {'max |grad diff|':>16}")
    all_match = True
    providers = [("torch.nn.functional", F.cross_entropy)]
    for name in backend.BACKENDS:
        reason = backend.unavailable_reason(name, "cross_entropy", device, dtype)
        if reason is None:
            providers.append((f"lmkern {name}", lambda x, t, name=name: lmkern.cross_entropy(x, t, backend=name)))
        else:
            print(f"{'lmkern ' + name:<22} skipped: {reason}")
    for label, function in providers:
        loss, grad = loss_and_grad(function, logits, target)
        match = torch.allclose(loss, expected_loss, **TOLERANCE[dtype]) and torch.allclose(
            grad, expected_grad, **TOLERANCE[dtype]
        )
        all_match &= match
        x = logits.detach().requires_grad_()
        timing = time_ms(lambda: function(x, target).backward(), device)
        timing_text = f"{timing.median_ms:.2f} ({timing.p20_ms:.2f}-{timing.p80_ms:.2f})"
        loss_diff = (loss - expected_loss).abs().item()
        grad_diff = (grad - expected_grad).abs().max().item()
        status = "matches torch" if match else "MISMATCH"
        print(f"{label:<22} {timing_text:>24} {loss_diff:>12.2e} {grad_diff:>16.2e}  {status}")
    return 0 if all_match else 1


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m lmkern.check", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return check(parser.parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
