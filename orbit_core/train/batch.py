"""Pack completions into right-padded training tensors."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from orbit_core.rollout.types import Completion


@dataclass
class RolloutBatch:
    """Rows are samples; column t of the ``[batch, seq-1]`` tensors scores token t+1 of ``input_ids``."""

    input_ids: torch.Tensor  # [batch, seq]
    response_mask: torch.Tensor  # [batch, seq-1], 1 where the target token is a response token
    rollout_logprobs: torch.Tensor  # [batch, seq-1], engine logprobs of the targets
    scores: torch.Tensor  # [batch], outcome rewards
    advantages: torch.Tensor | None = None  # [batch] (sequence level) or [batch, seq-1]
    old_logprobs: torch.Tensor | None = None  # [batch, seq-1], trainer logprobs before the update
    ref_logprobs: torch.Tensor | None = None  # [batch, seq-1], base model (adapter disabled)
    teacher_logprobs: torch.Tensor | None = None  # [batch, seq-1], distillation teacher
    old_values: torch.Tensor | None = None  # [batch, seq-1], value head before the update (ppo)
    returns: torch.Tensor | None = None  # [batch, seq-1], value targets (ppo)
    tis_weights: torch.Tensor | None = None  # [batch, seq-1], truncated importance weights

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def _map(self, fn) -> "RolloutBatch":
        return RolloutBatch(**{f.name: None if getattr(self, f.name) is None else fn(f.name, getattr(self, f.name))
                               for f in dataclasses.fields(self)})

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        return self._map(lambda name, t: t[index])

    def trimmed(self) -> "RolloutBatch":
        """Drop trailing all-padding columns (fewer FLOPs for a micro-batch of short samples)."""
        used = (self.response_mask.sum(0) > 0).nonzero()
        width = int(used.max()) + 1 if used.numel() else 1

        def cut(name: str, t: torch.Tensor) -> torch.Tensor:
            if name == "input_ids":
                return t[:, : width + 1]
            return t[:, :width] if t.dim() == 2 else t

        return self._map(cut)

    def to(self, device: torch.device) -> "RolloutBatch":
        return self._map(lambda name, t: t.to(device))


def build_batch(completions: list[Completion], scores: torch.Tensor, pad_id: int) -> RolloutBatch:
    seqs = [c.prompt_ids + c.token_ids for c in completions]
    width = max(len(s) for s in seqs)
    batch = len(seqs)
    ids = torch.full((batch, width), pad_id, dtype=torch.long)
    mask = torch.zeros((batch, width - 1), dtype=torch.float32)
    logprobs = torch.zeros((batch, width - 1), dtype=torch.float32)
    for i, (c, s) in enumerate(zip(completions, seqs)):
        ids[i, : len(s)] = torch.tensor(s, dtype=torch.long)
        start, end = len(c.prompt_ids) - 1, len(s) - 1
        mask[i, start:end] = 1.0
        logprobs[i, start:end] = torch.tensor(c.logprobs, dtype=torch.float32)
    return RolloutBatch(ids, mask, logprobs, scores.float())
