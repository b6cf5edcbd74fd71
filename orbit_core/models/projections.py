"""Linears that read the same input (q/k/v, gate/up), called together so the engine may share work.

In the rollout engine (on a GPU):

* **Fused base weights.** ``fuse_projections`` lays the base weights of each group end to end in
  one buffer, and each linear keeps a view of its own rows (no extra memory once the originals
  are freed). A step then runs one base GEMM (or packed GEMV, or dequantize + GEMM) per group
  and splits its output into column views, instead of one per linear. Formats: bf16/fp16/fp32
  ``nn.Linear`` and packed int4 and fp8 (out_features a multiple of the 128-row blocks); nvfp4
  keeps one global scale per linear, so its linears stay apart.
* **Grouped LoRA.** LoRA linears of one input run their LoRA kernels once for the group
  (``LoRALinear.engine_group_forward``, ``orbit::lora_add_group_``), adding into those views.

Everywhere else (training, the CPU, a module without these paths) each linear is called in turn;
a fused linear reads its own rows of the shared buffer, so what it computes is unchanged.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from orbit_core.models.engine_forward import use_engine_kernels

GROUPED = True
"""Set False to call the linears one by one in the engine too (benchmarks compare the two)."""
FUSED = True
"""Set False to run one base call per linear even where the weights are fused (benchmarks compare)."""
GROUPS = (("q_proj", "k_proj", "v_proj"), ("gate_proj", "up_proj"))
"""Attribute names of the linears that read one input, in the order the model calls them."""


class _Fused(NamedTuple):
    names: tuple[str, ...]
    tensors: tuple[torch.Tensor | None, ...]
    widths: tuple[int, ...]
    forward: Callable[[torch.Tensor], torch.Tensor]


def _tensor_names(base: nn.Module) -> tuple[str, ...] | None:
    """The tensors a base linear is made of, when its kind can be fused."""
    if type(base) is nn.Linear:
        return ("weight", "bias")
    fmt = getattr(base, "fmt_name", None)
    if fmt == "int4" or (fmt == "fp8" and base.out_features % 128 == 0):
        return tuple(base.tensor_names) + ("bias",)
    return None


def _group_forward(first: nn.Module, tensors: tuple) -> Callable[[torch.Tensor], torch.Tensor]:
    if type(first) is nn.Linear:
        return lambda x: F.linear(x, tensors[0], tensors[1])
    return first.linear_with(tensors)  # a packed linear's own call (QuantLinear), with the fused tensors


def fuse(bases: Sequence[nn.Module]) -> bool:
    """Lay ``bases``' tensors end to end (rows), each base keeping a view of its own. False, and
    nothing changed, when they are not linears of one kind, input width and dtype, or train."""
    first = bases[0]
    names = _tensor_names(first)
    if names is None or len(bases) < 2:
        return False
    if _record(bases) is not None:  # fused already (a second engine on the same model)
        return True
    if any(type(b) is not type(first) or _tensor_names(b) != names or b.in_features != first.in_features
           for b in bases):
        return False
    columns = []
    for name in names:
        parts = [getattr(b, name) for b in bases]
        if any(p is None for p in parts):
            if any(p is not None for p in parts):
                return False
            continue
        columns.append((name, parts))
    for _, parts in columns:
        if len({(p.dtype, p.device, p.shape[1:]) for p in parts}) > 1 or any(p.requires_grad for p in parts):
            return False
    fused = dict.fromkeys(names)
    for name, parts in columns:
        whole = torch.cat([p.detach() for p in parts])
        start = 0
        for base, part in zip(bases, parts):
            view = whole[start:start + part.shape[0]]
            start += part.shape[0]
            setattr(base, name, nn.Parameter(view, requires_grad=False) if isinstance(part, nn.Parameter) else view)
        fused[name] = whole
    tensors = tuple(fused[name] for name in names)
    record = _Fused(names, tensors, tuple(b.out_features for b in bases), _group_forward(first, tensors))
    for base in bases:
        base.__dict__["_orbit_fused"] = record
    return True


def fuse_projections(model: nn.Module) -> int:
    """``fuse`` every group of ``GROUPS`` in ``model`` (through adapter wrappers, to their base
    linears). Returns how many groups were fused."""
    count = 0
    for module in list(model.modules()):
        for group in GROUPS:
            if all(hasattr(module, name) for name in group):
                count += fuse([_base(getattr(module, name)) for name in group])
    return count


def _base(linear: nn.Module) -> nn.Module:
    return getattr(linear, "base", linear)


def _record(bases: Sequence[nn.Module]) -> _Fused | None:
    """The group's fused tensors, if ``bases`` are still the views ``fuse`` left (a ``.to()`` or
    an assignment that replaced a tensor ends the fusion)."""
    record = bases[0].__dict__.get("_orbit_fused")
    if record is None or len(bases) != len(record.widths):
        return None
    for name, whole in zip(record.names, record.tensors):
        if whole is None:
            continue
        offset = 0
        for base in bases:
            part = getattr(base, name)
            if part is None or part.data_ptr() != whole.data_ptr() + offset * whole.stride(0) * whole.element_size():
                return None
            offset += part.shape[0]
    return record


def base_outputs(x: torch.Tensor, bases: Sequence[nn.Module]) -> list[torch.Tensor] | None:
    """Each base's output as a column view of one fused call, or None when ``bases`` are not a
    fused group (or ``FUSED`` is off). The engine's path: callers check ``use_engine_kernels``."""
    record = _record(bases) if FUSED else None
    if record is None:
        return None
    return list(record.forward(x).split(record.widths, dim=-1))


def dense_base_weight(bases: Sequence[nn.Module], dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight that one base call of ``bases`` (a fused group, or one linear) multiplies by,
    for a kernel that runs that GEMM itself: a bias-free ``nn.Linear``'s weight in ``dtype``, or a
    bias-free packed weight the engine forward dequantized ahead (``dequant_ahead.dense_for``).
    None otherwise (another kind, a bias, a group no longer fused, or dequantized inline)."""
    first = bases[0]
    if type(first) is nn.Linear:
        if len(bases) == 1:
            weight, bias = first.weight, first.bias
        else:
            record = _record(bases) if FUSED else None
            if record is None:
                return None
            weight, bias = record.tensors[0], record.tensors[-1]
        return weight if bias is None and weight.dtype == dtype else None
    parts = packed_parts(bases)
    if parts is None or parts.bias is not None:
        return None
    from orbit_core.models.dequant_ahead import dense_for  # that module builds on this one

    return dense_for(parts.weight, dtype)


class PackedParts(NamedTuple):
    """What one packed base call of a linear or a fused group runs on, for a kernel that takes the
    format's tensors as stored (``orbit::packed_lora_linear``)."""
    fmt: str
    in_features: int
    weight: torch.Tensor
    scale: torch.Tensor
    global_scale: torch.Tensor | None
    bias: torch.Tensor | None


def packed_parts(bases: Sequence[nn.Module]) -> PackedParts | None:
    """A single packed linear's tensors, or a fused group's (None: not packed, or not fused)."""
    first = bases[0]
    fmt = getattr(first, "fmt_name", None)
    if fmt is None:
        return None
    if len(bases) == 1:
        tensors = tuple(getattr(first, name) for name in first.tensor_names) + (first.bias,)
    else:
        record = _record(bases) if FUSED else None
        if record is None:
            return None
        tensors = record.tensors
    return PackedParts(fmt, first.in_features, tensors[0], tensors[1], tensors[2] if fmt == "nvfp4" else None,
                       tensors[-1])


def packed_calls(module: nn.Module) -> list[PackedParts]:
    """The packed base calls the engine makes inside ``module`` (a decoder layer), each once: one
    per fused group of ``GROUPS``, one per other packed linear (through adapter wrappers). Routed
    MoE experts are left out: a step runs only the experts its tokens pick, through their own path."""
    subs = [sub for name, sub in module.named_modules() if "experts" not in name.split(".")]
    calls, grouped = [], set()
    for sub in subs:
        for group in GROUPS:
            if all(hasattr(sub, name) for name in group):
                linears = [getattr(sub, name) for name in group]
                bases = [_base(m) for m in linears]
                # ``project`` makes one call for the group only for bare bases, or adapters whose
                # group forward adds to one (LoRA); others (OFT) feed each base its own input
                parts = packed_parts(bases) if _one_base_call(linears, bases) else None
                if parts is not None:
                    calls.append(parts)
                    grouped.update(id(b) for b in bases)
    for sub in subs:
        if getattr(sub, "fmt_name", None) is not None and hasattr(sub, "tensor_names") and id(sub) not in grouped:
            calls.append(packed_parts([sub]))
    return calls


def _one_base_call(linears: Sequence[nn.Module], bases: Sequence[nn.Module]) -> bool:
    return all(m is b for m, b in zip(linears, bases)) or all(
        getattr(type(m), "engine_group_forward", None) is not None for m in linears)


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    grouped = getattr(type(linears[0]), "engine_group_forward", None)
    if GROUPED and grouped is not None and len(linears) > 1:
        outs = grouped(x, linears)
        if outs is not None:
            return outs
    if len(linears) > 1 and use_engine_kernels(x):
        outs = base_outputs(x, linears)
        if outs is not None:
            return outs
    return [linear(x) for linear in linears]
