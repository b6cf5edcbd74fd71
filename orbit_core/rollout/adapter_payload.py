"""What travels from trainer to engine on a sync: the adapter tensors as safetensors bytes."""

from __future__ import annotations

import torch
from safetensors.torch import load, save
from torch import nn

from orbit_core.errors import OrbitError


def encode(state: dict[str, torch.Tensor]) -> bytes:
    return save({name: t.detach().to("cpu").contiguous() for name, t in state.items()})


def decode(payload: bytes) -> dict[str, torch.Tensor]:
    try:
        return load(payload)
    except Exception as err:  # safetensors raises its own error types for truncated / corrupt buffers
        raise OrbitError(f"adapter payload is not valid safetensors ({type(err).__name__}: {err})",
                         "the sync was corrupted in transit; the engine keeps its previous adapter") from err


def full_weight_bytes(model: nn.Module, dtype: torch.dtype) -> int:
    """Bytes a full-weight sync of this model in ``dtype`` would send (packed bases counted dense)."""
    from orbit_core.quant.linear import QuantLinear

    count, seen = 0, set()
    for module in model.modules():
        if isinstance(module, QuantLinear):
            count += module.in_features * module.out_features + (module.bias.numel() if module.bias is not None else 0)
            continue
        for p in module.parameters(recurse=False):
            if not p.requires_grad and id(p) not in seen:  # tied embeddings count once
                seen.add(id(p))
                count += p.numel()
    return count * torch.empty((), dtype=dtype).element_size()
