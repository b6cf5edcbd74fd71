"""Per-token KL estimators between the policy and the reference (Schulman 2020, "Approximating KL").

With ``r = log q - log p`` for a token sampled from the policy ``p`` (``q`` = the reference):
  * ``kl`` (k1) ``= -r``: an unbiased estimate of KL(p || q), but as a loss its gradient is
    ``E_p[grad log p] = 0`` on-policy: it does nothing to pull the policy back;
  * ``mse`` (k2) ``= r^2 / 2``: a biased estimate of the value, but its gradient
    ``E_p[(log p - log q) grad log p]`` is exactly ``grad KL(p || q)``: the loss to use;
  * ``low_var_kl`` (k3) ``= e^r - r - 1``: unbiased and low-variance as a value, but its gradient
    ``E_p[(1 - q/p) grad log p] = grad KL(q || p)``, the reverse KL.
``auto`` picks k2 as a loss (``rl.use_kl_loss``) and k1 as a reward penalty, where only the value
enters (through the advantages) and k1's is unbiased. Tested on an exact categorical.
"""

from __future__ import annotations

import torch

KL_TYPES = ("auto", "kl", "mse", "low_var_kl")


def resolve_kl_type(kind: str, as_loss: bool) -> str:
    if kind == "auto":
        return "mse" if as_loss else "kl"
    return kind


def kl_estimate(logprobs: torch.Tensor, ref_logprobs: torch.Tensor, kind: str) -> torch.Tensor:
    """Per-token estimate ``[batch, seq]`` from samples of the policy (``kind`` already resolved)."""
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
