"""torch.autocast at the ops' boundaries.

Under autocast each op casts its own inputs, once, at its public function, by the contract
of its kind (README, "Mixed precision"):

    matmul ops (attention, linear_gelu, ffn, linear_cross_entropy)  compute in the autocast
        dtype, floating inputs cast to it as F.linear casts them (a no-op where they
        already are);
    normalisations (layer_norm, add_layer_norm, rms_norm, add_rms_norm)  cast nothing: fp32 statistics for any
        input, the output in the normalised rows' dtype;
    losses (cross_entropy, linear_cross_entropy)  return fp32 whatever the logits' dtype.

Inside, forward and backward run with autocast off (without_autocast), so that the
kernels' own matmuls and reductions (fp32 accumulators among them) run in the dtypes the
op chose, whether backward is called inside an autocast block or not.
"""

import contextlib
import functools

import torch

# The device types torch.autocast knows (asking about others raises).
AUTOCAST_DEVICE_TYPES = ("cpu", "cuda", "xpu", "mps", "hpu", "mtia", "xla")


def autocast_dtype(device_type):
    """The dtype torch.autocast computes matmuls in on this device type, or None when it is off."""
    if device_type not in AUTOCAST_DEVICE_TYPES or not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def cast_for_autocast(*tensors):
    """tensors with the floating ones cast to the autocast dtype of the first tensor's
    device type; as they are when autocast is off there (None and non-tensors stay)."""
    first = next((t for t in tensors if isinstance(t, torch.Tensor)), None)
    dtype = None if first is None else autocast_dtype(first.device.type)
    if dtype is None:
        return tensors
    return tuple(t.to(dtype) if isinstance(t, torch.Tensor) and t.is_floating_point() else t for t in tensors)


def autocast_off(device_type):
    """A context in which autocast is off on device_type (a no-op where it is off already)."""
    if autocast_dtype(device_type) is None:
        return contextlib.nullcontext()
    return torch.autocast(device_type, enabled=False)


def without_autocast(method):
    """Runs an autograd Function's forward or backward with autocast off on the device of
    its first tensor argument."""

    @functools.wraps(method)
    def run(ctx, *args):
        device_type = next((arg.device.type for arg in args if isinstance(arg, torch.Tensor)), "cpu")
        with autocast_off(device_type):
            return method(ctx, *args)

    return run
