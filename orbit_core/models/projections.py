"""Linears that read the same input (q/k/v, gate/up), called together so an adapter may share work.

In the rollout engine, LoRA linears of one input run their LoRA kernels once for the group
(``LoRALinear.engine_group_forward``, ``orbit::lora_add_group_``): a decode step launches two
LoRA kernels per group instead of two per linear. Everywhere else, and for any other module, this
is each linear called in turn.
"""

from __future__ import annotations

import torch
from torch import nn


GROUPED = True
"""Set False to call the linears one by one in the engine too (benchmarks compare the two)."""


def project(x: torch.Tensor, *linears: nn.Module) -> list[torch.Tensor]:
    grouped = getattr(type(linears[0]), "engine_group_forward", None)
    if GROUPED and grouped is not None and len(linears) > 1:
        outs = grouped(x, linears)
        if outs is not None:
            return outs
    return [linear(x) for linear in linears]
