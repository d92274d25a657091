"""Rotary position embeddings in plain PyTorch: the oracle the kernels are tested against.

x is (B, H, L, D); the first R = rotary_dim elements of each head are rotated, the rest
pass through. cos and sin are caches (P, R / 2): row p holds cos(p theta_i) and
sin(p theta_i) for the R / 2 frequencies theta_i. Token l of sequence b sits at position
p = positions[b, l]. The pairs rotated together are (x_i, x_{i + R/2}) in the half-split
layout (Llama, Hugging Face's rotate_half) and (x_{2i}, x_{2i+1}) in the interleaved one
(GPT-J); pair i turns by the angle p theta_i:
    out_1 = x_1 cos - x_2 sin,  out_2 = x_2 cos + x_1 sin
A rotation's transpose is the rotation by minus the angle, so backward is the same
formula with -sin (conjugate=True) applied to the output's gradient.

The math runs in fp32 (fp64 for fp64 x) whatever the dtype of cos and sin; the result
is rounded once to x's dtype. A position outside [0, P) gives NaN in the rotated part
(never a read out of bounds); the public function refuses such positions on CPU first.
"""

import torch


def rotate(x, cos, sin, positions, interleaved, conjugate, out=None):
    """Rotates x (B, H, L, D) by the angles of cos and sin (P, R / 2) at positions (B, L)
    int64; conjugate rotates by minus the angles. Writes into out (B, H, L, D) when
    given (x itself, for in place), else returns a new contiguous tensor."""
    compute = torch.promote_types(x.dtype, torch.float32)
    half = cos.shape[1]
    rotary_dim = 2 * half
    in_range = (positions >= 0) & (positions < cos.shape[0])  # (B, L)
    safe = torch.where(in_range, positions, 0)
    nan = torch.tensor(float("nan"), dtype=compute, device=x.device)
    c = torch.where(in_range[..., None], cos[safe].to(compute), nan)[:, None]  # (B, 1, L, R/2)
    s = torch.where(in_range[..., None], sin[safe].to(compute), nan)[:, None]
    if conjugate:
        s = -s
    rotated = x[..., :rotary_dim].to(compute)
    if interleaved:
        x1, x2 = rotated[..., 0::2], rotated[..., 1::2]
    else:
        x1, x2 = rotated[..., :half], rotated[..., half:]
    out1, out2 = x1 * c - x2 * s, x2 * c + x1 * s
    if interleaved:
        rotated = torch.stack((out1, out2), dim=-1).flatten(-2)
    else:
        rotated = torch.cat((out1, out2), dim=-1)
    rotated = rotated.to(x.dtype)
    if out is None:
        return torch.cat((rotated, x[..., rotary_dim:]), dim=-1)
    out[..., :rotary_dim].copy_(rotated)
    if out is not x:
        out[..., rotary_dim:].copy_(x[..., rotary_dim:])
    return out


def apply_rotary_fwd(x, cos, sin, positions, interleaved, inplace):
    """out (B, H, L, D) in x's dtype: x rotated (x itself, rotated in place, if inplace).
    x: (B, H, L, D), any strides. cos, sin: (P, R / 2), R <= D. positions: (B, L) int64."""
    return rotate(x, cos, sin, positions, interleaved, False, x if inplace else None)


def apply_rotary_bwd(cos, sin, positions, interleaved, grad_out):
    """grad_x (B, H, L, D) in grad_out's dtype: grad_out rotated back (by -sin)."""
    return rotate(grad_out, cos, sin, positions, interleaved, True)
