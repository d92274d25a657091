"""What GPT and BERT share: their weight initialisation, the checks of token ids, labels
and attention masks, and the loading of checkpoints written under parameter names since renamed."""

import torch


def init_weights(module):
    """GPT-2's and BERT's initialisation of one module: normal(0, 0.02) weights of linear
    layers and embeddings, zero biases (LayerNorms start as torch's: ones, zeros). For
    model.apply(init_weights)."""
    if isinstance(module, (torch.nn.Linear, torch.nn.Embedding)):
        torch.nn.init.normal_(module.weight, std=0.02)
    if isinstance(module, torch.nn.Linear) and module.bias is not None:
        torch.nn.init.zeros_(module.bias)


def check_ids(name, ids, limit=None, shape=None, ignore_index=None):
    """Raises TypeError unless ids is an int64 tensor, ValueError unless it has `shape`
    (None: any (batch, length)) and, with a limit, holds values in [0, limit) or equal to
    ignore_index. Reading the values waits on the device."""
    if not isinstance(ids, torch.Tensor) or ids.dtype != torch.int64:
        got = ids.dtype if isinstance(ids, torch.Tensor) else type(ids).__name__
        raise TypeError(f"{name} must be an int64 tensor, got {got}")
    wrong_shape = (ids.dim() != 2) if shape is None else (ids.shape != shape)
    if wrong_shape:
        raise ValueError(f"{name} must have shape {'(batch, length)' if shape is None else tuple(shape)}, "
                         f"got {tuple(ids.shape)}")
    if limit is None:
        return
    bad = ((ids < 0) | (ids >= limit)) & (ids != ignore_index)
    if bad.any():
        allowed = f"[0, {limit})" + ("" if ignore_index is None else f" or {ignore_index}")
        raise ValueError(f"{name} must hold values in {allowed}, got {int(ids[bad][0])}")


def check_attention_mask(attention_mask, input_ids):
    """attention_mask ((B, T), nonzero on real tokens), or all True if None; raises
    ValueError unless it is a tensor of input_ids' shape."""
    if attention_mask is None:
        return torch.ones_like(input_ids, dtype=torch.bool)
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.shape != input_ids.shape:
        got = tuple(attention_mask.shape) if isinstance(attention_mask, torch.Tensor) else type(attention_mask).__name__
        raise ValueError(f"attention_mask must have input_ids' shape {tuple(input_ids.shape)}, got {got}")
    return attention_mask


def load_renamed(module, renames):
    """Makes module.load_state_dict (and so safetensors' load_model) take state dicts
    written before its parameters were renamed: renames maps an old name prefix, relative
    to the module, to the new one ({"ln_2.": "mlp.norm."})."""

    def rename(module, state_dict, prefix, *_):
        for old, new in renames.items():
            for name in [name for name in state_dict if name.startswith(prefix + old)]:
                state_dict[prefix + new + name.removeprefix(prefix + old)] = state_dict.pop(name)

    module.register_load_state_dict_pre_hook(rename)
