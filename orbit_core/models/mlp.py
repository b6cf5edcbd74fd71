"""The dense SwiGLU MLP: one per dense layer, one per MoE expert, and Qwen2-MoE's shared expert."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from orbit_core.models.config import DecoderConfig
from orbit_core.models.engine_forward import use_engine_kernels
from orbit_core.models.projections import project
from orbit_core.models.shrink_fusion import silu_mul_for


class MLP(nn.Module):
    def __init__(self, config: DecoderConfig, intermediate_size: int | None = None):
        super().__init__()
        bias, width = config.mlp_bias, intermediate_size or config.intermediate_size
        self.gate_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.up_proj = nn.Linear(config.hidden_size, width, bias=bias)
        self.down_proj = nn.Linear(width, config.hidden_size, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        gate, up = project(x, self.gate_proj, self.up_proj)
        if use_engine_kernels(x):  # one kernel, reading gate and up in place (column slices when fused)
            y, shrunk = silu_mul_for(gate, up, self.down_proj)  # at a few rows with down's shrink too
            with shrunk:
                return self.down_proj(y)
        return self.down_proj(F.silu(gate) * up)
