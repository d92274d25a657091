"""Counter-based random numbers that every backend draws alike, for dropout masks that are
regenerated in backward instead of stored.

The stream is Triton's `tl.rand(seed, offset)`: Philox4x32 with 10 rounds, counter
(offset mod 2^32, offset >> 32, 0, 0) and key (seed mod 2^32, seed >> 32), whose first
output word x becomes a float in [0, 1) as (x if x >= 0 else ~x) * 4.6566127342e-10 with
x read as int32. Triton kernels call tl.rand; `uniform` below is the same in torch (for
the reference), and csrc/philox.h the same in C++ and CUDA.

An op draws one seed per call from torch's default CPU generator (so torch.manual_seed
makes it reproducible, with no device synchronisation) and numbers its elements as
offsets 0, 1, 2, ...; an element is kept by dropout when uniform(seed, offset) >= p.
"""

import torch

_MASK32 = 0xFFFFFFFF
_ROUND_A, _ROUND_B = 0xD2511F53, 0xCD9E8D57
_KEY_A, _KEY_B = 0x9E3779B9, 0xBB67AE85


def draw_seed():
    """A seed for one op call, from torch's default generator."""
    return int(torch.randint(0, 2**62, (), dtype=torch.int64))


def _mul_hi_lo(a, b):
    """(high, low) 32-bit words of a * b for a, b in [0, 2^32) held in int64 tensors,
    computed on 16-bit halves so that no int64 product overflows."""
    a_lo, a_hi = a & 0xFFFF, a >> 16
    b_lo, b_hi = b & 0xFFFF, b >> 16
    lo_lo, hi_lo, lo_hi = a_lo * b_lo, a_hi * b_lo, a_lo * b_hi
    cross = (lo_lo >> 16) + (hi_lo & 0xFFFF) + lo_hi
    high = a_hi * b_hi + (hi_lo >> 16) + (cross >> 16)
    low = ((cross & 0xFFFF) << 16) | (lo_lo & 0xFFFF)
    return high & _MASK32, low


@torch.library.custom_op("lmkern::philox_uniform", mutates_args=())
def uniform(seed: int, offsets: torch.Tensor) -> torch.Tensor:
    """tl.rand(seed, offsets) in torch: float32 in [0, 1), shaped like offsets (int64).

    An op of its own so that torch.compile calls it as one opaque kernel: inductor, given
    its ten rounds to fuse into one expression, does not finish compiling in minutes.
    """
    c0 = offsets & _MASK32
    c1 = (offsets >> 32) & _MASK32
    c2 = torch.zeros_like(offsets)
    c3 = torch.zeros_like(offsets)
    k0, k1 = seed & _MASK32, (seed >> 32) & _MASK32
    for _ in range(10):
        hi_b, lo_b = _mul_hi_lo(c2, torch.full_like(c2, _ROUND_B))
        hi_a, lo_a = _mul_hi_lo(c0, torch.full_like(c0, _ROUND_A))
        c0, c1, c2, c3 = hi_b ^ c1 ^ k0, lo_b, hi_a ^ c3 ^ k1, lo_a
        k0, k1 = (k0 + _KEY_A) & _MASK32, (k1 + _KEY_B) & _MASK32
    signed = torch.where(c0 >= 2**31, c0 - 2**32, c0)  # the word read as int32
    return torch.where(signed < 0, ~signed, signed).to(torch.float32) * 4.6566127342e-10


@uniform.register_fake
def _(seed, offsets):
    return torch.empty_like(offsets, dtype=torch.float32)


def dropout_keep(seed, offsets, p):
    """The dropout mask: True where the element is kept (uniform >= p)."""
    return uniform(seed, offsets) >= p
