"""A scalar value head on the final hidden state, trained with the adapter (PPO's critic)."""

from __future__ import annotations

import torch
from torch import nn


def attach_value_head(model: nn.Module, hidden_size: int) -> nn.Linear:
    """Adds ``model.value_head``: fp32, zero-initialized (V = 0 at start), trainable."""
    device = next(model.parameters()).device
    head = nn.Linear(hidden_size, 1, device=device, dtype=torch.float32)
    nn.init.zeros_(head.weight)
    nn.init.zeros_(head.bias)
    model.value_head = head
    return head


def values_from_hidden(model: nn.Module, hidden: torch.Tensor) -> torch.Tensor:
    """hidden: [batch, seq, hidden] -> values [batch, seq]."""
    return model.value_head(hidden.float())[..., 0]
