"""Engine-side adapter slots: several adapter versions resident at once, chosen per batch row.

The rollout engine keeps its own copy of the adapter in ``num_slots`` slots (two for double
buffering). Every forward is told which slot each row (KV-cache slot) uses, so sequences admitted
under different versions decode together while each one sees only its own version. A slot is
only rewritten when no running sequence uses it; ``prepare`` validates and precomputes a payload
(OFT rotations are solved here, once, not per decode step) without touching any slot, so a bad
payload leaves every slot as it was.
"""

from __future__ import annotations

import weakref
from typing import Callable

import torch
from torch import nn

from orbit_core.errors import OrbitError
from orbit_core.peft.base import AdapterLayer, adapter_modules
from orbit_core.peft.lora import LoRALinear
from orbit_core.peft.oft import OFTLinear, cayley_blocks

ADAPTER_TENSORS = ("lora_A", "lora_B", "oft_skew")


class SlotBank:
    """Which slot each batch row reads, and the adapter version each slot holds."""

    def __init__(self, num_slots: int):
        self.num_slots = num_slots
        self.versions = [0] * num_slots
        self.row_slot: torch.Tensor | None = None
        self.used: tuple[int, ...] = (0,)
        self.targets: dict[tuple, list[torch.Tensor]] = {}
        """``write_slot``'s views into the slot buffers, by (slot, payload layout)."""

    def set_rows(self, row_slot: torch.Tensor | None, used: tuple[int, ...]) -> None:
        """``row_slot`` [rows] names each row's slot; ``used`` lists the slots present (one = no routing)."""
        self.row_slot, self.used = row_slot, tuple(used) or (0,)

    def route(self, compute: Callable[[int], torch.Tensor]) -> torch.Tensor:
        if len(self.used) == 1:
            return compute(self.used[0])
        out = None
        for slot in self.used:
            part = compute(slot)
            if out is None:
                out = part
                continue
            mask = (self.row_slot == slot).view(-1, *[1] * (part.dim() - 1))
            out = torch.where(mask, part, out)
        return out


def engine_adapter_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """The tensors an engine needs (adapter layers only; a PPO value head stays with the trainer)."""
    return {name: p.detach() for name, p in model.named_parameters()
            if p.requires_grad and name.rsplit(".", 1)[-1] in ADAPTER_TENSORS}


def attach_slots(model: nn.Module, num_slots: int) -> SlotBank:
    """Give every adapter layer ``num_slots`` copies of its current adapter; returns the shared bank."""
    bank = SlotBank(num_slots)
    for _, layer in adapter_modules(model):
        if isinstance(layer, LoRALinear):
            layer.register_buffer("slot_A", layer.lora_A.detach().clone().expand(num_slots, -1, -1).contiguous(), persistent=False)
            layer.register_buffer("slot_B", layer.lora_B.detach().clone().expand(num_slots, -1, -1).contiguous(), persistent=False)
        elif isinstance(layer, OFTLinear):
            rotation = layer.rotation().detach()
            layer.register_buffer("slot_rotation", rotation.expand(num_slots, -1, -1, -1).contiguous(), persistent=False)
        else:
            raise OrbitError(f"{type(layer).__name__} has no engine slots", "use peft.method=lora or oft")
        if layer.fake_quant is not None:
            raise OrbitError("quant.fake_qat=true cannot run in a separate engine process",
                             "use rollout.placement=colocated with fake QAT")
        layer.slot_bank = bank
    return bank


_PLANS: "weakref.WeakKeyDictionary[nn.Module, dict]" = weakref.WeakKeyDictionary()
"""Per engine model, the checked plan of each payload signature seen: a sync sends the same names
and shapes every time, so they are checked against the model once, not on every sync."""


def _plan(model: nn.Module, state: dict[str, torch.Tensor]) -> list[tuple[str, bool, int, list]]:
    """(layer name, is OFT, OFT blocks, [(leaf, payload key, device)]) for every adapter layer,
    after checking the payload's names and shapes against the model."""
    signature = tuple((name, tuple(value.shape)) for name, value in state.items())
    plans = _PLANS.setdefault(model, {})
    if signature in plans:
        return plans[signature]
    layers = dict(adapter_modules(model))
    expected = {f"{name}.{leaf}" for name, layer in layers.items() for leaf in ADAPTER_TENSORS if hasattr(layer, leaf)}
    missing, unexpected = sorted(expected - set(state)), sorted(set(state) - expected)
    if missing or unexpected:
        what = f"missing {missing[0]!r}" if missing else f"unexpected {unexpected[0]!r}"
        raise OrbitError(f"adapter payload does not fit the engine ({what})", "trainer and engine must use the same peft settings")
    plan = []
    for name, layer in layers.items():
        leaves = []
        for leaf in ADAPTER_TENSORS:
            if not hasattr(layer, leaf):
                continue
            value, want = state[f"{name}.{leaf}"], getattr(layer, leaf)
            if value.shape != want.shape:
                raise OrbitError(f"adapter payload: {name}.{leaf} has shape {tuple(value.shape)}, engine expects "
                                 f"{tuple(want.shape)}", "trainer and engine must use the same peft settings")
            leaves.append((leaf, f"{name}.{leaf}", want.device))
        is_oft = isinstance(layer, OFTLinear)
        plan.append((name, is_oft, layer.num_blocks if is_oft else 0, leaves))
    plans[signature] = plan
    return plan


def prepare(model: nn.Module, state: dict[str, torch.Tensor]) -> dict[str, dict[str, torch.Tensor]]:
    """Check a payload against the engine's adapter layers and compute what each slot stores.

    Raises OrbitError naming the first problem (missing / unexpected tensor, wrong shape, NaN/inf).
    """
    plan = _plan(model, state)
    _check_finite(state)
    out: dict[str, dict[str, torch.Tensor]] = {}
    for name, is_oft, num_blocks, leaves in plan:
        tensors = {}
        for leaf, key, device in leaves:
            value = state[key]
            if value.device != device or value.dtype != torch.float32:
                value = value.to(device, torch.float32)
            tensors[leaf] = value
        if is_oft:
            tensors = {"slot_rotation": cayley_blocks(tensors["oft_skew"], num_blocks)}
        else:
            tensors = {"slot_A": tensors["lora_A"], "slot_B": tensors["lora_B"]}
        out[name] = tensors
    return out


def _check_finite(state: dict[str, torch.Tensor]) -> None:
    # one host sync and a few multi-tensor kernels for the whole payload: a max-abs norm is NaN or
    # inf exactly when its tensor holds one (a per-tensor check was hundreds of launches a sync)
    groups: dict[tuple, list[tuple[str, torch.Tensor]]] = {}
    for name, value in state.items():
        if value.numel():
            groups.setdefault((value.device, value.dtype), []).append((name, value))
    for pairs in groups.values():
        norms = torch._foreach_norm([value for _, value in pairs], float("inf"))
        ok = torch.isfinite(torch.stack(norms)).cpu()
        if not bool(ok.all()):
            bad = next(name for (name, _), good in zip(pairs, ok.tolist()) if not good)
            raise OrbitError(f"adapter payload: {bad} holds NaN or inf", "the update diverged; lower train.lr")


@torch.no_grad()
def write_slot(model: nn.Module, bank: SlotBank, slot: int, prepared: dict[str, dict[str, torch.Tensor]], version: int) -> None:
    keys = tuple((name, buffer) for name, tensors in prepared.items() for buffer in tensors)
    targets = bank.targets.get((slot, keys))
    if targets is None:  # views into the slot buffers, made once per slot and payload layout
        layers: dict[str, AdapterLayer] = dict(adapter_modules(model))
        targets = bank.targets[(slot, keys)] = [getattr(layers[name], buffer)[slot] for name, buffer in keys]
    values = [value for tensors in prepared.values() for value in tensors.values()]
    torch._foreach_copy_(targets, values)  # one multi-tensor copy instead of a launch per tensor
    bank.versions[slot] = version
