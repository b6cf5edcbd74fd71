"""One MoE layer's packed int4 experts stacked per weight kind, so a chunk of experts is
dequantized by one kernel call instead of one call per expert and weight.

The per-expert ``QuantLinear`` modules keep working: their buffers become views into the stack, so
stacking costs no memory once done. Other formats keep the per-expert path (the models' side
falls back when a layer has no bank).
"""

from __future__ import annotations

import torch
from torch import nn

from orbit_core.quant.linear import QuantLinear
from orbit_kernels.int4 import int4_dequant

KINDS = ("gate_proj", "up_proj", "down_proj")


class ExpertBank:
    def __init__(self, experts: nn.ModuleList):
        self.stacks: dict[str, tuple[torch.Tensor, torch.Tensor, int]] = {}
        for kind in KINDS:
            modules: list[QuantLinear] = [_packed_base(getattr(e, kind)) for e in experts]
            packed = torch.stack([m.weight_packed for m in modules])
            scale = torch.stack([m.weight_scale for m in modules])
            for i, module in enumerate(modules):  # views into the stack: the originals are freed
                module.weight_packed, module.weight_scale = packed[i], scale[i]
            self.stacks[kind] = (packed, scale, modules[0].in_features)

    def dequantize_kind(self, ids: torch.Tensor, dtype: torch.dtype, kind: str) -> torch.Tensor:
        """``kind`` weights ``[len(ids), out, in]`` of experts ``ids``, one kernel call."""
        packed, scale, in_features = self.stacks[kind]
        rows = packed.index_select(0, ids).flatten(0, 1)
        weight = int4_dequant(rows, scale.index_select(0, ids).flatten(0, 1), in_features, dtype)
        return weight.view(len(ids), packed.shape[1], in_features)


def attach_expert_banks(model: nn.Module) -> int:
    """Stack the int4 experts of every MoE layer (``layer.expert_bank``); returns the layers stacked."""
    stacked = 0
    for module in model.modules():
        experts = getattr(module, "experts", None)
        if not isinstance(experts, nn.ModuleList) or not len(experts):
            continue
        linears = [_packed_base(getattr(e, kind, None)) for e in experts for kind in KINDS]
        if all(isinstance(m, QuantLinear) and m.fmt_name == "int4" for m in linears):
            module.expert_bank = ExpertBank(experts)
            stacked += 1
    return stacked


def _packed_base(module):
    """The packed linear itself, or the one an adapter wraps."""
    return getattr(module, "base", module)
