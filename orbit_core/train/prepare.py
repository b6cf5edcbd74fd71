"""Everything a rollout batch needs before the updates: logprobs, advantages, importance weights.

Two sets of logprobs, as in decoupled PPO (Hilton et al. 2021, "Batch size-invariance for policy
optimization"; used for async RL by AReaL, Fu et al. 2025):
  * behaviour ``pi_b`` (``rollout_logprobs``): the engine's, recorded when the token was sampled;
  * proximal ``pi_prox`` (``old_logprobs``): the trainer's recompute with the current adapter,
    before this step's updates.
The clipped surrogate's ratio is ``pi_theta / pi_prox``; the truncated importance weight
``min(pi_prox / pi_b, rl.tis_cap)`` corrects what lies between sampling and training: the
staleness of an async sample and the engine-vs-trainer numerics (Yao et al. 2025).
"""

from __future__ import annotations

import torch

from orbit_core.config.schema import RLSection
from orbit_core.rl.estimators import compute_advantages, needs_reference
from orbit_core.rl.losses import truncated_importance_weights
from orbit_core.train.backends import TrainerBackend
from orbit_core.train.batch import RolloutBatch


def prepare_batch(batch: RolloutBatch, trainer: TrainerBackend, rl: RLSection, group_size: int,
                  with_teacher: bool) -> dict[str, float]:
    batch.old_logprobs, batch.old_values = trainer.score(batch)
    mismatch = trainer.routing_mismatch()
    gap = (batch.old_logprobs - batch.rollout_logprobs).abs() * batch.response_mask
    stats = {"rollout/behaviour_proximal_logprob_abs_diff_max": float(gap.max()),
             "rollout/behaviour_proximal_logprob_abs_diff_mean": float(gap.sum() / batch.response_mask.sum().clamp(min=1))}
    if mismatch is not None:
        stats["moe/routing_mismatch_fraction"] = mismatch
    if needs_reference(rl):
        batch.ref_logprobs = trainer.reference_logprobs(batch)
    if with_teacher:
        batch.teacher_logprobs = trainer.teacher_logprobs(batch)
    batch.advantages, batch.returns = compute_advantages(
        rl, batch.scores, batch.response_mask, group_size, batch.old_logprobs, batch.ref_logprobs,
        batch.old_values, batch.teacher_logprobs)
    if rl.tis_cap > 0:
        batch.tis_weights, truncated = truncated_importance_weights(
            batch.old_logprobs, batch.rollout_logprobs, batch.response_mask, rl.tis_cap)
        stats["rollout/tis_truncated_fraction"] = float(truncated)
        stats["rollout/tis_weight_mean"] = float((batch.tis_weights.sum() / batch.response_mask.sum().clamp(min=1)))
    return stats


def split_updates(batch_size: int, global_batch_size: int, order: list[int]) -> list[torch.Tensor]:
    """Row indices of each optimizer step's global batch, in the shuffled ``order``."""
    return [torch.tensor(order[u * global_batch_size:(u + 1) * global_batch_size])
            for u in range(batch_size // global_batch_size)]
