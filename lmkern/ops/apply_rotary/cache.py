"""lmkern.rotary_cache: the cos and sin caches of lmkern.apply_rotary, with the frequency
scalings of long-context models (linear, dynamic NTK, Llama 3), computed as Hugging Face
transformers' rope init functions compute them."""

import math

import torch

from lmkern.errors import ArgumentError

# The keys each scaling takes beside its type, as Hugging Face configs' rope_scaling names them.
SCALING_KEYS = {
    "linear": ("factor",),
    "dynamic": ("factor", "original_max_position_embeddings"),
    "llama3": ("factor", "low_freq_factor", "high_freq_factor", "original_max_position_embeddings"),
}


def _scaling_options(scaling):
    """(type, {key: value}) of a scaling dict, checked."""
    if not isinstance(scaling, dict):
        raise ArgumentError(f"scaling must be None or a dict, got {type(scaling).__name__}")
    kind = scaling.get("rope_type", scaling.get("type"))
    if kind not in SCALING_KEYS:
        raise ArgumentError(
            f"scaling must have rope_type (or type) one of {', '.join(map(repr, SCALING_KEYS))}, got {kind!r}"
        )
    missing = [key for key in SCALING_KEYS[kind] if key not in scaling]
    if missing:
        raise ArgumentError(f"scaling of rope_type {kind!r} needs {', '.join(SCALING_KEYS[kind])}, missing {missing}")
    options = {key: float(scaling[key]) for key in SCALING_KEYS[kind]}
    if not options["factor"] > 0:
        raise ArgumentError(f"scaling's factor must be > 0, got {scaling['factor']}")
    if "original_max_position_embeddings" in options and not options["original_max_position_embeddings"] >= 1:
        raise ArgumentError(
            f"scaling's original_max_position_embeddings must be >= 1, got {scaling['original_max_position_embeddings']}"
        )
    return kind, options


def _base_frequencies(rotary_dim, base):
    """theta_i = base^(-2i / rotary_dim), i < rotary_dim / 2, in fp32 as Hugging Face computes them."""
    return 1.0 / (base ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64).float() / rotary_dim))


def inverse_frequencies(rotary_dim, max_positions, base=10000.0, scaling=None):
    """The rotary_dim / 2 frequencies theta_i (fp32, on CPU), scaled as `scaling` says (see
    rotary_cache)."""
    if scaling is None:
        return _base_frequencies(rotary_dim, base)
    kind, options = _scaling_options(scaling)
    factor = options["factor"]
    if kind == "linear":  # positions divided by factor
        return _base_frequencies(rotary_dim, base) / factor
    if kind == "dynamic":  # NTK-aware: a larger base once past the original context
        original = options["original_max_position_embeddings"]
        seqlen = max(max_positions, original)
        if rotary_dim <= 2:
            raise ArgumentError(f"rotary_dim must be > 2 for dynamic scaling, got {rotary_dim}")
        base = base * ((factor * seqlen / original) - (factor - 1)) ** (rotary_dim / (rotary_dim - 2))
        return _base_frequencies(rotary_dim, base)
    # Llama 3: long wavelengths divided by factor, short ones kept, smoothly in between.
    original = options["original_max_position_embeddings"]
    low, high = options["low_freq_factor"], options["high_freq_factor"]
    if not high > low:
        raise ArgumentError(f"scaling's high_freq_factor must be > low_freq_factor {low}, got {high}")
    theta = _base_frequencies(rotary_dim, base)
    wavelength = 2 * math.pi / theta
    scaled = torch.where(wavelength > original / low, theta / factor, theta)
    smooth = (original / wavelength - low) / (high - low)
    smoothed = (1 - smooth) * scaled / factor + smooth * scaled
    medium = ~(wavelength < original / high) & ~(wavelength > original / low)
    return torch.where(medium, smoothed, scaled)


def rotary_cache(rotary_dim, max_positions, *, base=10000.0, scaling=None, device=None, dtype=torch.float32):
    """The (cos, sin) caches of lmkern.apply_rotary: each (max_positions, rotary_dim / 2),
    row p holding cos(p theta_i) and sin(p theta_i) for theta_i = base^(-2i / rotary_dim).

    Args:
        rotary_dim: the even number of elements of each head that are rotated.
        max_positions: the positions the cache holds (0 .. max_positions - 1).
        base: the frequencies' base (10000 in Llama 2; 500000 in Llama 3).
        scaling: None, or a dict in the form of Hugging Face configs' rope_scaling, with
            rope_type (or type) and its keys:
              {"rope_type": "linear", "factor": f}: positions divided by f;
              {"rope_type": "dynamic", "factor": f, "original_max_position_embeddings": n}:
                  dynamic NTK, the base enlarged for a context of max(max_positions, n)
                  tokens (Hugging Face recomputes it as the sequence grows; a cache built
                  for max_positions holds the frequencies it uses at that length);
              {"rope_type": "llama3", "factor": f, "low_freq_factor": lo,
               "high_freq_factor": hi, "original_max_position_embeddings": n}: Llama 3.1's.
            Other keys are ignored. The frequencies are transformers' (fp32, as its rope
            init functions compute them); the angles p theta_i are formed in fp64.
        device, dtype: of the caches (fp32 by default).
    """
    if isinstance(rotary_dim, bool) or not isinstance(rotary_dim, int) or rotary_dim < 2 or rotary_dim % 2:
        raise ArgumentError(f"rotary_dim must be an even int >= 2, got {rotary_dim!r}")
    if isinstance(max_positions, bool) or not isinstance(max_positions, int) or max_positions < 1:
        raise ArgumentError(f"max_positions must be an int >= 1, got {max_positions!r}")
    if not base > 0:
        raise ArgumentError(f"base must be > 0, got {base!r}")
    theta = inverse_frequencies(rotary_dim, max_positions, float(base), scaling)
    angles = torch.outer(torch.arange(max_positions, dtype=torch.float64), theta.double())
    return angles.cos().to(device=device, dtype=dtype), angles.sin().to(device=device, dtype=dtype)
