"""One step's metrics row: rewards, the update's averages, the time split, staleness and sync."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from orbit_core.train.sampling_round import StepRollouts


@dataclass
class StepTimes:
    start: float
    train_start: float
    sync_start: float
    end: float


def average_updates(update_stats: list[dict[str, float]]) -> dict[str, float]:
    """Mean of each update's numbers; skipped updates are counted, not averaged."""
    keys = [k for k in update_stats[0] if k != "update_skipped"]
    applied = [s for s in update_stats if not s.get("update_skipped")] or update_stats
    row = {k: sum(s.get(k, 0.0) for s in applied) / len(applied) for k in keys}
    row["train/skipped_updates"] = int(sum(s.get("update_skipped", 0.0) for s in update_stats))
    return row


def step_row(step: int, rollouts: StepRollouts, train_stats: dict[str, Any], sync_stats: dict[str, float],
             times: StepTimes, counters_before, counters_now, full_weight_bytes: int) -> dict[str, Any]:
    reward_s = rollouts.reward_s
    response_tokens = train_stats.pop("response_tokens")
    if counters_now is None:
        rollout_s, generated = rollouts.extra["rollout_s"], response_tokens
    else:  # the engine works ahead: count what it did during this step, not the batch it handed over
        rollout_s = counters_now.busy_s - counters_before.busy_s
        reward_s += counters_now.reward_s - counters_before.reward_s
        generated = counters_now.tokens - counters_before.tokens
    step_s = times.end - times.start
    idle_s = rollouts.extra["idle_s"]
    staleness = rollouts.extra["staleness"]
    samples = sum(staleness.values())
    row: dict[str, Any] = {
        "step": step,
        **train_stats,
        **sync_stats,
        "reward/errors": rollouts.reward_errors,
        "reward/timeouts": rollouts.reward_timeouts,
        "rollout/sampling_rounds": rollouts.rounds,
        "rollout/groups_filtered": rollouts.groups_filtered,
        "time/step_s": step_s,
        "time/rollout_s": rollout_s,
        "time/reward_s": reward_s,
        "time/train_s": times.sync_start - times.train_start,
        "time/sync_s": times.end - times.sync_start,
        "time/idle_s": idle_s,
        "time/bubble_fraction": idle_s / step_s,
        "sync/full_weight_bytes": full_weight_bytes,
        "staleness/mean": sum(k * n for k, n in staleness.items()) / max(samples, 1),
        "staleness/max": max(staleness),
        **{f"staleness/count_{k}": staleness.get(k, 0) for k in range(max(staleness) + 1)},
    }
    if rollout_s > 0:  # an async engine with nothing left to generate has no throughput to report
        row["tokens_per_s"] = generated / rollout_s
    if counters_now is not None:
        row["time/engine_idle_fraction"] = max(0.0, 1.0 - rollout_s / step_s)
    if rollouts.last_error:
        row["reward/last_error"] = rollouts.last_error
    return row
