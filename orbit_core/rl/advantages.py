"""Advantage estimators as pure functions on tensors."""

from __future__ import annotations

import torch


def grpo_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3 outcome supervision).

    rewards: [num_prompts * group_size], grouped contiguously -> advantages, same shape:
    ``(r - mean(group)) / (std(group) + eps)``; without ``std_normalize`` only the mean is removed
    (Dr. GRPO, Liu et al. 2025). std is the unbiased sample std, as in the reference implementations.
    """
    if rewards.numel() % group_size:
        raise ValueError(f"{rewards.numel()} rewards do not split into groups of {group_size}")
    grouped = rewards.float().view(-1, group_size)
    centered = grouped - grouped.mean(dim=1, keepdim=True)
    if std_normalize and group_size > 1:
        centered = centered / (grouped.std(dim=1, keepdim=True) + eps)
    return centered.flatten()
