"""What every adapter layer shares: a frozen base linear, an on/off switch, a merge rule."""

from __future__ import annotations

import contextlib
import fnmatch
from typing import Iterator

import torch
from torch import nn

from orbit_core.errors import OrbitError

LINEAR_NAMES = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


def is_linear(module: nn.Module) -> bool:
    """A dense ``nn.Linear`` or a packed quantized linear (anything with in/out features and a forward)."""
    from orbit_core.quant.linear import QuantLinear

    return isinstance(module, (nn.Linear, QuantLinear))


def base_device(base: nn.Module) -> torch.device:
    return next(iter(list(base.parameters()) + list(base.buffers()))).device


def base_weight(base: nn.Module) -> torch.Tensor:
    """The base weight ``[out, in]`` (dequantized in fp32 for a packed base)."""
    return base.dequantized(torch.float32) if hasattr(base, "dequantized") else base.weight.float()


class AdapterLayer(nn.Module):
    """Wraps a frozen linear (dense or packed); subclasses own the trainable tensors.

    With ``fake_quant`` set (QAT), forward runs on ``fake_quant(merged_weight())`` so the adapter
    learns what survives quantizing the merged weight, gradients passing straight through.
    """

    def __init__(self, base: nn.Module):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.enabled = True
        self.fake_quant = None
        self.slot_bank = None  # set on an engine copy: per-row adapter versions (see peft/slots.py)

    def fake_quant_forward(self, x: torch.Tensor) -> torch.Tensor:
        weight = self.fake_quant(self.merged_weight())
        bias = getattr(self.base, "bias", None)
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    def merged_weight(self) -> torch.Tensor:
        """The base weight with this adapter folded in, ``[out, in]`` in fp32."""
        raise NotImplementedError


def target_linears(model: nn.Module, patterns: list[str]) -> list[str]:
    """Names of the linears matched by leaf names, globs over full names, or ``all-linear`` (not lm_head)."""

    def matches(name: str) -> bool:
        leaf = name.rsplit(".", 1)[-1]
        for pattern in patterns:
            # all-linear leaves an MoE's experts alone: adapting every expert is opted into by glob
            if pattern == "all-linear" and leaf in LINEAR_NAMES and ".experts." not in name:
                return True
            if pattern != "all-linear" and (fnmatch.fnmatch(name, pattern) or leaf == pattern):
                return True
        return False

    names = [n for n, m in model.named_modules() if is_linear(m) and n != "lm_head" and matches(n)]
    if not names:
        raise OrbitError(f"peft.target_modules={patterns} matched no linear layer",
                         f"use all-linear or names among {', '.join(LINEAR_NAMES)}")
    return names


def replace_module(model: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, leaf = name.rpartition(".")
    setattr(model.get_submodule(parent_name), leaf, module)


def adapter_modules(model: nn.Module) -> Iterator[tuple[str, AdapterLayer]]:
    for name, module in model.named_modules():
        if isinstance(module, AdapterLayer):
            yield name, module


def adapter_parameters(model: nn.Module) -> list[nn.Parameter]:
    return [p for p in model.parameters() if p.requires_grad]


def adapter_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor (adapter layers, and a PPO value head when present), by full name."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def load_adapter_state_dict(model: nn.Module, state: dict[str, torch.Tensor], source: str = "adapter") -> None:
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(params) - set(state)), sorted(set(state) - set(params))
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise OrbitError(f"{source} does not fit this model ({what})", "use the base model and peft settings the adapter was trained with")
    with torch.no_grad():
        for name, param in params.items():
            if state[name].shape != param.shape:
                raise OrbitError(f"{source}: {name} has shape {tuple(state[name].shape)}, model expects {tuple(param.shape)}",
                                 "the peft settings (rank, block size) must match the adapter")
            param.copy_(state[name])


@contextlib.contextmanager
def adapter_disabled(model: nn.Module):
    """Run the frozen base alone (the KL reference) without a second copy of the weights."""
    modules = [m for _, m in adapter_modules(model)]
    previous = [m.enabled for m in modules]
    for m in modules:
        m.enabled = False
    try:
        yield
    finally:
        for m, state in zip(modules, previous):
            m.enabled = state


def merge_adapters(model: nn.Module) -> nn.Module:
    """Fold every adapter into its base weight in place and unwrap it (for export / serving)."""
    for name, module in list(adapter_modules(model)):
        with torch.no_grad():
            base = module.base
            merged = module.merged_weight()
            if hasattr(base, "dequantized"):  # a packed base merges into a dense linear
                dense = nn.Linear(base.in_features, base.out_features, bias=base.bias is not None, device=merged.device)
                dense.weight.copy_(merged)
                if base.bias is not None:
                    dense.bias.copy_(base.bias.float())
                base = dense.requires_grad_(False)
            else:
                base.weight.copy_(merged.to(base.weight.dtype))
        replace_module(model, name, base)
    return model
