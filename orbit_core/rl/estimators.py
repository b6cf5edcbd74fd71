"""Dispatch from ``rl.advantage_estimator`` to the formulas; the loop calls only this."""

from __future__ import annotations

import torch

from orbit_core.config.schema import RLSection
from orbit_core.rl.advantages import (
    distillation_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    token_rewards,
    whiten,
)
from orbit_core.rl.kl import kl_estimate, resolve_kl_type

SEQUENCE_LEVEL = ("grpo", "gspo")


def needs_reference(rl: RLSection) -> bool:
    return rl.use_kl_loss or rl.kl_coef > 0


def kl_in_reward(rl: RLSection) -> bool:
    return rl.kl_coef > 0 and not rl.use_kl_loss


def compute_advantages(rl: RLSection, scores: torch.Tensor, mask: torch.Tensor, group_size: int,
                       old_logprobs: torch.Tensor, ref_logprobs: torch.Tensor | None = None,
                       old_values: torch.Tensor | None = None, teacher_logprobs: torch.Tensor | None = None,
                       ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """-> (advantages: [batch] for grpo/gspo, else [batch, seq]; returns for ppo, else None)."""
    kl = None
    if kl_in_reward(rl) and ref_logprobs is not None:
        kl = kl_estimate(old_logprobs, ref_logprobs, resolve_kl_type(rl.kl_type, as_loss=False)) * mask
    estimator = rl.advantage_estimator
    if estimator in SEQUENCE_LEVEL:
        if kl is not None:  # a sequence-level penalty: the summed per-token KL
            scores = scores - rl.kl_coef * kl.sum(dim=1)
        return grpo_advantages(scores, group_size, rl.std_normalization), None
    if estimator == "reinforce_plus_plus":
        return reinforce_plus_plus_advantages(scores, mask, kl, rl.kl_coef, rl.gamma), None
    if estimator == "reinforce_plus_plus_baseline":
        return reinforce_plus_plus_advantages(scores, mask, kl, rl.kl_coef, rl.gamma, group_size=group_size), None
    if estimator == "ppo":
        rewards = token_rewards(scores, mask, kl, rl.kl_coef)
        advantages, returns = gae_advantages(rewards, old_values * mask, mask, rl.gamma, rl.lambd)
        return whiten(advantages, mask), returns
    if estimator == "on_policy_distillation":
        return distillation_advantages(old_logprobs, teacher_logprobs, mask), None
    raise ValueError(f"unknown advantage estimator {estimator!r}")
