"""Per-token KL estimators between the policy and the reference (Schulman, "Approximating KL")."""

from __future__ import annotations

import torch


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate of KL(policy || ref) from samples of the policy; shapes [batch, seq].

    * ``kl`` (k1): ``log p - log q``; unbiased, high variance, can be negative.
    * ``mse`` (k2): ``0.5 (log p - log q)^2``.
    * ``low_var_kl`` (k3): ``q/p - log(q/p) - 1``, >= 0, unbiased; clamped to [-10, 10] for stability.
    """
    log_ratio = logprobs.float() - ref_logprobs.float()
    if kind == "kl":
        return log_ratio
    if kind == "mse":
        return 0.5 * log_ratio.pow(2)
    if kind == "low_var_kl":
        # ratio q/p computed from a clamped log to avoid overflow when the policy drifts far
        log_q_over_p = torch.clamp(-log_ratio, -20.0, 20.0)
        return torch.clamp(torch.exp(log_q_over_p) - log_q_over_p - 1.0, -10.0, 10.0)
    raise ValueError(f"unknown KL estimator {kind!r}; use kl, mse or low_var_kl")
