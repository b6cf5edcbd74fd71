"""Policy-gradient losses on per-token tensors ``[batch, seq]`` with a response mask."""

from __future__ import annotations

import torch


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean") -> torch.Tensor:
    """token-mean: every response token in the batch weighs the same (DAPO's token-level loss)."""
    if mode == "token-mean":
        return masked_mean(loss, mask)
    raise ValueError(f"unknown loss aggregation {mode!r}")


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    loss_agg: str = "token-mean",
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric clip (DAPO's clip-higher).

    ``loss = -min(ratio * A, clip(ratio, 1 - eps_clip, 1 + eps_clip_high) * A)``.
    advantages: [batch, seq] (or [batch], broadcast over tokens). Returns (loss, clip_fraction).
    """
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    ratio = torch.exp(logprobs - old_logprobs)
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_clip, 1.0 + eps_high) * advantages
    per_token = -torch.minimum(unclipped, clipped)
    clip_fraction = masked_mean((clipped < unclipped).float(), mask)
    return aggregate(per_token, mask, loss_agg), clip_fraction.detach()
