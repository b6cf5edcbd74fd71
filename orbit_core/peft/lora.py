"""LoRA on a frozen base: ``y = W x + (alpha / r) * B A dropout(x)`` (Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn

from orbit_core.peft.base import AdapterLayer, base_device, base_weight, replace_module, target_linears


class LoRALinear(AdapterLayer):
    """Only ``lora_A`` / ``lora_B`` train; B starts at zero so the model starts unchanged."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__(base)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base_device(base)
        # Adapter weights live in fp32 even on a low-precision base, so updates are not lost to rounding.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.enabled and self.fake_quant is not None:
            return self.fake_quant_forward(x)
        out = self.base(x)
        if not self.enabled:
            return out
        if self.slot_bank is not None:
            delta = self.slot_bank.route(lambda s: self.low_rank(x, self.slot_A[s], self.slot_B[s]))
            return out + delta.to(out.dtype)
        return out + self.low_rank(self.dropout(x), self.lora_A, self.lora_B).to(out.dtype)

    def low_rank(self, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
        # computed in the activation dtype (bf16 on a GPU base); A and B stay fp32 master weights
        return ((x @ a.to(x.dtype).t()) @ b.to(x.dtype).t()) * self.scaling

    def delta_weight(self) -> torch.Tensor:
        """``[out, in]`` update this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling

    def merged_weight(self) -> torch.Tensor:
        return base_weight(self.base) + self.delta_weight()


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze every base parameter and wrap the targeted linears. Returns the wrapped names."""
    model.requires_grad_(False)
    targets = target_linears(model, target_modules)
    for name in targets:
        replace_module(model, name, LoRALinear(model.get_submodule(name), rank, alpha, dropout))
    return targets
