"""Learning-rate schedules: linear warmup, then constant / linear / cosine decay to min_lr."""

from __future__ import annotations

import math


def lr_at(step: int, total_steps: int, peak_lr: float, schedule: str, warmup_steps: int = 0, min_lr: float = 0.0) -> float:
    """LR for optimizer step ``step`` (0-based) of ``total_steps``."""
    if warmup_steps > 0 and step < warmup_steps:
        return peak_lr * (step + 1) / warmup_steps
    if schedule == "constant":
        return peak_lr
    decay_steps = max(total_steps - warmup_steps, 1)
    progress = min(max(step - warmup_steps, 0) / decay_steps, 1.0)
    if schedule == "linear":
        return min_lr + (peak_lr - min_lr) * (1.0 - progress)
    if schedule == "cosine":
        return min_lr + 0.5 * (peak_lr - min_lr) * (1.0 + math.cos(math.pi * progress))
    raise ValueError(f"unknown lr schedule {schedule!r}")
