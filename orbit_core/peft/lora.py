"""LoRA on a frozen base: ``y = W x + (alpha / r) * B A dropout(x)`` (Hu et al. 2021)."""

from __future__ import annotations

import contextlib
import fnmatch
import math
from typing import Iterator

import torch
from torch import nn

from orbit_core.errors import OrbitError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class LoRALinear(nn.Module):
    """Wraps a frozen ``nn.Linear``; only ``lora_A`` / ``lora_B`` train."""

    def __init__(self, base: nn.Linear, rank: int, alpha: float, dropout: float):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.rank, self.alpha = rank, alpha
        self.scaling = alpha / rank
        device = base.weight.device
        # Adapter weights live in fp32 even on a low-precision base, so updates are not lost to rounding.
        self.lora_A = nn.Parameter(torch.empty(rank, base.in_features, device=device, dtype=torch.float32))
        self.lora_B = nn.Parameter(torch.zeros(base.out_features, rank, device=device, dtype=torch.float32))
        nn.init.kaiming_uniform_(self.lora_A, a=math.sqrt(5))
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.enabled = True

    @property
    def weight(self) -> torch.Tensor:
        return self.base.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.base(x)
        if not self.enabled:
            return out
        delta = (self.dropout(x).to(self.lora_A.dtype) @ self.lora_A.t()) @ self.lora_B.t()
        return out + (delta * self.scaling).to(out.dtype)

    def delta_weight(self) -> torch.Tensor:
        """``[out, in]`` update this adapter adds to the base weight."""
        return (self.lora_B @ self.lora_A) * self.scaling


def _matches(name: str, patterns: list[str]) -> bool:
    leaf = name.rsplit(".", 1)[-1]
    for pattern in patterns:
        if pattern == "all-linear":
            if leaf in LINEAR_NAMES:
                return True
        elif fnmatch.fnmatch(name, pattern) or leaf == pattern:
            return True
    return False


def apply_lora(model: nn.Module, rank: int, alpha: float, dropout: float, target_modules: list[str]) -> list[str]:
    """Freeze every base parameter and wrap the targeted linears. Returns the wrapped names.

    ``target_modules``: leaf names (``q_proj``), glob patterns over full names, or ``all-linear``
    (every projection in the decoder layers; ``lm_head`` stays untouched).
    """
    model.requires_grad_(False)
    targets = [
        name for name, module in model.named_modules()
        if isinstance(module, nn.Linear) and name != "lm_head" and _matches(name, target_modules)
    ]
    if not targets:
        raise OrbitError(
            f"peft.target_modules={target_modules} matched no linear layer",
            f"use all-linear or names among {', '.join(LINEAR_NAMES)}",
        )
    for name in targets:
        parent_name, _, leaf = name.rpartition(".")
        parent = model.get_submodule(parent_name)
        setattr(parent, leaf, LoRALinear(getattr(parent, leaf), rank, alpha, dropout))
    return targets


def lora_modules(model: nn.Module) -> Iterator[tuple[str, LoRALinear]]:
    for name, module in model.named_modules():
        if isinstance(module, LoRALinear):
            yield name, module


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Adapter tensors only, named ``<module>.lora_A.weight`` / ``<module>.lora_B.weight``."""
    state = {}
    for name, module in lora_modules(model):
        state[f"{name}.lora_A.weight"] = module.lora_A.detach()
        state[f"{name}.lora_B.weight"] = module.lora_B.detach()
    return state


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    expected = adapter_state_dict(model)
    missing = sorted(set(expected) - set(state))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise OrbitError(f"{source} does not fit this model ({what})", "use the base model and peft settings the adapter was trained with")
    with torch.no_grad():
        for name, module in lora_modules(model):
            for part in ("lora_A", "lora_B"):
                tensor = state[f"{name}.{part}.weight"]
                param = getattr(module, part)
                if tensor.shape != param.shape:
                    raise OrbitError(f"{source}: {name}.{part} has shape {tuple(tensor.shape)}, model expects {tuple(param.shape)}", "peft.rank must match the adapter")
                param.copy_(tensor)


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run the frozen base alone (the KL reference) without a second copy of the weights."""
    modules = [m for _, m in lora_modules(model)]
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def merge_lora(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place and unwrap it (for export / serving)."""
    for name, module in list(lora_modules(model)):
        with torch.no_grad():
            base = module.base
            base.weight.copy_((base.weight.float() + module.delta_weight()).to(base.weight.dtype))
        parent_name, _, leaf = name.rpartition(".")
        setattr(model.get_submodule(parent_name), leaf, base)
    return model


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]
