"""Policy and value losses on per-token tensors ``[batch, seq]`` with a response mask."""

from __future__ import annotations

import torch

LOSS_AGGREGATIONS = ("token-mean", "seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def masked_mean(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return (values * mask).sum() / mask.sum().clamp(min=1.0)


def aggregate(loss: torch.Tensor, mask: torch.Tensor, mode: str = "token-mean", norm_length: int | None = None) -> torch.Tensor:
    """Reduce per-token losses [batch, seq] to a scalar.

    * ``token-mean``: every response token weighs the same (DAPO's token-level loss);
    * ``seq-mean-token-sum``: sum over a sequence's tokens, mean over sequences;
    * ``seq-mean-token-mean``: mean within a sequence, then over sequences (the original GRPO);
    * ``seq-mean-token-sum-norm``: token sum over ``batch * norm_length``, a constant (Dr. GRPO),
      so long and short answers are not re-weighted by their own length.
    """
    if mode == "token-mean":
        return masked_mean(loss, mask)
    per_seq_sum = (loss * mask).sum(dim=1)
    if mode == "seq-mean-token-sum":
        return per_seq_sum.mean()
    if mode == "seq-mean-token-mean":
        return (per_seq_sum / mask.sum(dim=1).clamp(min=1.0)).mean()
    if mode == "seq-mean-token-sum-norm":
        if not norm_length:
            raise ValueError("seq-mean-token-sum-norm needs norm_length (the max response length)")
        return per_seq_sum.sum() / (loss.shape[0] * norm_length)
    raise ValueError(f"unknown loss aggregation {mode!r}; use one of {', '.join(LOSS_AGGREGATIONS)}")


def _clipped_surrogate(ratio: torch.Tensor, advantages: torch.Tensor, eps_low: float, eps_high: float
                       ) -> tuple[torch.Tensor, torch.Tensor]:
    """``-min(r A, clip(r, 1 - eps_low, 1 + eps_high) A)`` and where the clipped branch won."""
    unclipped = ratio * advantages
    clipped = torch.clamp(ratio, 1.0 - eps_low, 1.0 + eps_high) * advantages
    return -torch.minimum(unclipped, clipped), (clipped < unclipped).float()


def clipped_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    loss_agg: str = "token-mean",
    token_weights: torch.Tensor | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO clipped surrogate (Schulman et al. 2017, eq. 7) with asymmetric clip (DAPO's clip-higher).

    ``loss_t = -min(ratio_t * A_t, clip(ratio_t, 1 - eps_clip, 1 + eps_clip_high) * A_t)``, times
    ``token_weights`` (truncated importance weights) when given. advantages: [batch, seq] or
    [batch] (broadcast over tokens). Returns (loss, clip_fraction).
    """
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    if advantages.dim() == 1:
        advantages = advantages[:, None]
    per_token, was_clipped = _clipped_surrogate(torch.exp(logprobs - old_logprobs), advantages, eps_clip, eps_high)
    if token_weights is not None:
        per_token = per_token * token_weights
    clip_fraction = masked_mean(was_clipped, mask)
    return aggregate(per_token, mask, loss_agg, norm_length), clip_fraction.detach()


def gspo_policy_loss(
    logprobs: torch.Tensor,
    old_logprobs: torch.Tensor,
    advantages: torch.Tensor,
    mask: torch.Tensor,
    eps_clip: float,
    eps_clip_high: float | None = None,
    loss_agg: str = "seq-mean-token-mean",
    token_weights: torch.Tensor | None = None,
    norm_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """GSPO (Zheng et al. 2025, eq. 5-7): one length-normalized ratio and one clip per sequence.

    ``s_i = exp(mean_t(log pi - log pi_old))``; ``l_i = -min(s_i A_i, clip(s_i, 1-eps, 1+eps_high) A_i)``.
    ``l_i`` is spread over the sequence's tokens, weighted by ``token_weights`` (truncated IS) and
    reduced by ``loss_agg``: ``seq-mean-token-mean`` gives the paper's ``mean_i l_i``,
    ``token-mean`` weighs sequences by their length. advantages: [batch] (sequence level).
    Returns (loss, fraction of sequences clipped).
    """
    eps_high = eps_clip if eps_clip_high is None else eps_clip_high
    lengths = mask.sum(dim=1).clamp(min=1.0)
    seq_ratio = torch.exp(((logprobs - old_logprobs) * mask).sum(dim=1) / lengths)
    per_seq, was_clipped = _clipped_surrogate(seq_ratio, advantages, eps_clip, eps_high)
    per_token = per_seq[:, None].expand_as(mask)
    if token_weights is not None:
        per_token = per_token * token_weights
    return aggregate(per_token, mask, loss_agg, norm_length), was_clipped.mean().detach()


def clipped_value_loss(
    values: torch.Tensor, old_values: torch.Tensor, returns: torch.Tensor, mask: torch.Tensor, value_clip: float,
    loss_agg: str = "token-mean", norm_length: int | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """PPO's clipped value loss: ``0.5 * max((V - R)^2, (clip(V, V_old - c, V_old + c) - R)^2)``.

    Returns (loss, fraction of tokens where the clipped term was larger).
    """
    clipped_values = old_values + torch.clamp(values - old_values, -value_clip, value_clip)
    plain = (values - returns) ** 2
    clipped = (clipped_values - returns) ** 2
    per_token = 0.5 * torch.maximum(plain, clipped)
    return aggregate(per_token, mask, loss_agg, norm_length), masked_mean((clipped > plain).float(), mask).detach()


def truncated_importance_weights(trainer_logprobs: torch.Tensor, rollout_logprobs: torch.Tensor, mask: torch.Tensor,
                                 cap: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Truncated IS (Yao et al. 2025, "Your efficient RL framework secretly brings you off-policy RL
    training"): ``w_t = min(pi_trainer / pi_rollout, cap)`` corrects for engine/trainer mismatch.

    Returns (weights [batch, seq], fraction of response tokens truncated).
    """
    ratio = torch.exp(trainer_logprobs.float() - rollout_logprobs.float())
    return torch.clamp(ratio, max=cap) * mask, masked_mean((ratio > cap).float(), mask)
