"""Advantage estimators as pure functions on tensors.

Shapes: ``scores`` [batch] (one outcome reward per sample, groups contiguous); per-token tensors
[batch, seq] with a 0/1 ``mask`` over response tokens.
"""

from __future__ import annotations

import torch

from orbit_core.rl.losses import masked_mean


def group_baseline(scores: torch.Tensor, group_size: int) -> torch.Tensor:
    """``r - mean(group)`` for contiguous groups of ``group_size``."""
    if scores.numel() % group_size:
        raise ValueError(f"{scores.numel()} rewards do not split into groups of {group_size}")
    grouped = scores.float().view(-1, group_size)
    return (grouped - grouped.mean(dim=1, keepdim=True)).flatten()


def grpo_advantages(rewards: torch.Tensor, group_size: int, std_normalize: bool = True, eps: float = 1e-6) -> torch.Tensor:
    """GRPO (Shao et al. 2024, DeepSeekMath eq. 3 outcome supervision), also GSPO's advantage.

    ``(r - mean(group)) / (std(group) + eps)``; without ``std_normalize`` only the mean is removed
    (Dr. GRPO, Liu et al. 2025). std is the unbiased sample std, as in the reference implementations.
    """
    centered = group_baseline(rewards, group_size)
    if std_normalize and group_size > 1:
        std = rewards.float().view(-1, group_size).std(dim=1, keepdim=True)
        centered = (centered.view(-1, group_size) / (std + eps)).flatten()
    return centered


def token_rewards(scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None = None, kl_coef: float = 0.0) -> torch.Tensor:
    """Per-token rewards: ``-kl_coef * kl_t`` on every response token, the outcome score on the last one."""
    rewards = torch.zeros_like(mask, dtype=torch.float32)
    if kl is not None and kl_coef:
        rewards = rewards - kl_coef * kl.float() * mask
    last = mask.shape[1] - 1 - torch.flip(mask, dims=[1]).argmax(dim=1)
    rewards[torch.arange(mask.shape[0]), last] += scores.float()
    return rewards


def discounted_returns(rewards: torch.Tensor, mask: torch.Tensor, gamma: float = 1.0) -> torch.Tensor:
    """``G_t = r_t + gamma * G_{t+1}`` over response tokens: [batch, seq]."""
    returns = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    for t in reversed(range(rewards.shape[1])):
        running = rewards[:, t] + gamma * running * mask[:, t]
        returns[:, t] = running
    return returns * mask


def whiten(values: torch.Tensor, mask: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """Normalize over every valid token of the batch (mean 0, std 1)."""
    mean = masked_mean(values, mask)
    var = masked_mean((values - mean) ** 2, mask)
    return (values - mean) * torch.rsqrt(var + eps) * mask


def reinforce_plus_plus_advantages(
    scores: torch.Tensor, mask: torch.Tensor, kl: torch.Tensor | None, kl_coef: float, gamma: float = 1.0,
    group_size: int | None = None,
) -> torch.Tensor:
    """REINFORCE++ (Hu 2025): per-token KL penalty in the reward, returns, batch-normalized.

    With ``group_size`` (REINFORCE++-baseline) the group mean is subtracted from each score first.
    """
    if group_size is not None:
        scores = group_baseline(scores, group_size)
    returns = discounted_returns(token_rewards(scores, mask, kl, kl_coef), mask, gamma)
    return whiten(returns, mask)


def gae_advantages(
    rewards: torch.Tensor, values: torch.Tensor, mask: torch.Tensor, gamma: float, lam: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Generalized advantage estimation (Schulman et al. 2016, eq. 16).

    ``delta_t = r_t + gamma V_{t+1} - V_t``; ``A_t = sum_l (gamma lam)^l delta_{t+l}``; the value past
    the last response token is 0. Returns (advantages, returns = A + V), both [batch, seq].
    """
    advantages = torch.zeros_like(rewards)
    running = torch.zeros(rewards.shape[0], dtype=rewards.dtype, device=rewards.device)
    next_value = torch.zeros_like(running)
    for t in reversed(range(rewards.shape[1])):
        m = mask[:, t]
        delta = rewards[:, t] + gamma * next_value - values[:, t]
        running = (delta + gamma * lam * running) * m
        advantages[:, t] = running
        next_value = torch.where(m > 0, values[:, t], next_value)
    return advantages, (advantages + values) * mask


def distillation_advantages(student_logprobs: torch.Tensor, teacher_logprobs: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """On-policy distillation: per-token reward ``log p_teacher - log p_student`` (reverse KL), used as is."""
    return (teacher_logprobs.float() - student_logprobs.float()) * mask
