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
    routing: torch.Tensor | None = None  # [batch, seq-1, moe_layers, k], the engine's experts (MoE models)

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
            return t[:, :width] if t.dim() >= 2 else t

        return self._map(cut)

    def lengths(self) -> list[int]:
        """Tokens of each row up to its last response token (what a forward pass over it needs)."""
        columns = torch.arange(1, self.response_mask.shape[1] + 1, device=self.response_mask.device)
        return ((self.response_mask > 0) * columns).amax(dim=1).add(1).tolist()

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
    batch = RolloutBatch(ids, mask, logprobs, scores.float())
    if completions and completions[0].routing is not None:
        first = completions[0].routing
        batch.routing = torch.zeros((len(seqs), width - 1, *first.shape[1:]), dtype=first.dtype)
        for i, c in enumerate(completions):
            batch.routing[i, : len(c.routing)] = c.routing
    return batch


def micro_batch_rows(batch: RolloutBatch, max_rows: int, max_tokens: int = 0) -> list[torch.Tensor]:
    """Row indices of each micro-batch: ``max_rows`` rows at a time in order or, with ``max_tokens``,
    rows grouped by length (longest first) so that rows x longest row <= ``max_tokens``: short
    samples share a micro-batch instead of being padded to a long one's width."""
    if max_tokens <= 0:
        return [torch.arange(start, min(start + max_rows, len(batch))) for start in range(0, len(batch), max_rows)]
    lengths = batch.lengths()
    groups: list[list[int]] = []
    for row in sorted(range(len(batch)), key=lambda i: -lengths[i]):
        # rows arrive longest first, so a group's width is its first row's length
        if groups and lengths[groups[-1][0]] * (len(groups[-1]) + 1) <= max_tokens:
            groups[-1].append(row)
        else:
            groups.append([row])
    return [torch.tensor(sorted(group)) for group in groups]
