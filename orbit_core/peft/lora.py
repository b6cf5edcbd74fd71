"""LoRA on a frozen base: ``y = W x + (alpha / r) * B A dropout(x)`` (Hu et al. 2021)."""

from __future__ import annotations

import math

import torch
from torch import nn

from orbit_core.models.engine_forward import use_engine_kernels
from orbit_core.peft.base import AdapterLayer, base_device, base_weight, replace_module, target_linears
from orbit_kernels.lora import lora_add_


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
        if use_engine_kernels(x) and not self.training:
            served = self._engine_add(x, out)
            if served is not None:
                return served
        if self.slot_bank is not None:
            delta = self.slot_bank.route(lambda s: self.low_rank(x, self.slot_A[s], self.slot_B[s]))
            return out + delta.to(out.dtype)
        return out + self.low_rank(self.dropout(x), self.lora_A, self.lora_B).to(out.dtype)

    def _engine_add(self, x: torch.Tensor, out: torch.Tensor) -> torch.Tensor | None:
        """The rollout engine's path: both LoRA GEMMs in two kernels, each row reading its own slot."""
        if not out.is_contiguous():  # the kernel adds into the output in place, through a flat view
            return None
        flat_x, flat_out = x.reshape(-1, x.shape[-1]), out.view(-1, out.shape[-1])
        if self.slot_bank is None:
            a, b, row_slot = self.lora_A[None], self.lora_B[None], None
        elif len(self.slot_bank.used) == 1:
            slot = self.slot_bank.used[0]
            a, b, row_slot = self.slot_A[slot : slot + 1], self.slot_B[slot : slot + 1], None
        else:
            a, b, row_slot = self.slot_A, self.slot_B, self.slot_bank.row_slot
            if row_slot is None or row_slot.numel() != flat_x.shape[0]:
                return None
        lora_add_(flat_out, flat_x.contiguous(), a, b, row_slot, self.scaling)
        return out

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
