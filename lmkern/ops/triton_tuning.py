"""Autotuning of lmkern's Triton kernels: candidate configs pruned to what fits the device
before any is compiled, and a switch that fixes each kernel to one config.

An autotuned kernel lists its candidate configs best first, with a function that tells,
for one config, a launch's arguments (the kernel's parameters by name) and a Target, the
shared memory in bytes and the 32-bit registers per thread that the config's large tiles
need. The Target matters: on Hopper (sm_90) wgmma reads a matrix product's operands from
shared memory, where Ampere's mma.sync (sm_80) holds both in registers.
Before the autotuner compiles or times anything, its early_config_prune keeps the first
MAX_CONFIGS configs whose tiles fit: shared memory within the device's limit per block, and tile registers
within REGISTER_BUDGET of the 255 a thread can have (the rest hold addresses, masks and
temporaries), so that no kept config spills. The estimates are checked, not trusted:
scripts/triton_check.py compiles every kept config for sm_90 and sm_80 and fails on one
that spills or overflows shared memory.

LMKERN_TRITON_ONE_CONFIG=1 keeps only the first config that fits: no timing runs and one
compile per kernel variant (for tests and quick checks; the first is a good config, not
necessarily the best).
"""

import dataclasses
import functools
import os

import torch
import triton

ONE_CONFIG_ENV = "LMKERN_TRITON_ONE_CONFIG"
# Registers per thread the tiles may take; a thread has 255.
REGISTER_BUDGET = 168
# Configs kept per launch at most (the first that fit), to bound compile and tuning time.
MAX_CONFIGS = 4


def one_config():
    """Whether LMKERN_TRITON_ONE_CONFIG fixes each kernel to its first fitting config."""
    return os.environ.get(ONE_CONFIG_ENV, "0").lower() in ("1", "true", "on", "yes")


@dataclasses.dataclass(frozen=True)
class Target:
    """What a config must fit: shared memory per program in bytes (None: no limit, as in
    the interpreter), and whether matrix products take operands from shared memory (wgmma)."""

    shared_memory: int = None
    wgmma: bool = True


@functools.lru_cache
def device_target(device_index):
    """The Target of a CUDA device (Triton's own shared-memory limit)."""
    shared = triton.runtime.driver.active.utils.get_device_properties(device_index)["max_shared_mem"]
    return Target(shared, torch.cuda.get_device_capability(device_index)[0] == 9)


def tile_registers(elements, bytes_per_element, num_warps):
    """32-bit registers per thread that a tile of `elements` takes, spread over the warps."""
    return elements * bytes_per_element / 4 / (32 * num_warps)


class ConfigPruner:
    """An autotuner's early_config_prune: the configs, in their order, whose tiles fit.

    resources(config, args, target) -> (shared memory bytes, registers per thread), args
    being the launch's arguments by name (tensors, integers and constexprs).
    """

    def __init__(self, resources):
        self.resources = resources

    def fitting(self, configs, args, target):
        """The first MAX_CONFIGS configs that fit the Target's shared memory and
        REGISTER_BUDGET; only the first under LMKERN_TRITON_ONE_CONFIG."""
        kept = []
        for config in configs:
            shared, registers = self.resources(config, args, target)
            if (target.shared_memory is None or shared <= target.shared_memory) and registers <= REGISTER_BUDGET:
                kept.append(config)
        if not kept:
            raise ValueError(
                f"no Triton config fits: {len(configs)} candidates, {target}, "
                f"{REGISTER_BUDGET} tile registers per thread"
            )
        return kept[: 1 if one_config() else MAX_CONFIGS]

    def __call__(self, configs, named_args, **kwargs):
        args = {**named_args, **kwargs}
        device = next(value.device for value in args.values() if hasattr(value, "device"))
        return self.fitting(configs, args, device_target(device.index) if device.type == "cuda" else Target())


def autotune(configs, key, resources, do_not_specialize=()):
    """triton.autotune over `configs` (best first) pruned by ConfigPruner(resources), on
    triton.jit(do_not_specialize=...): the decorator stack of every autotuned kernel."""

    def decorate(fn):
        jitted = triton.jit(fn, do_not_specialize=list(do_not_specialize))
        prune = {"early_config_prune": ConfigPruner(resources)}
        return triton.autotune(configs=configs, key=key, prune_configs_by=prune)(jitted)

    return decorate
