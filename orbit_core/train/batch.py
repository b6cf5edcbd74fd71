"""Pack completions into right-padded training tensors."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from orbit_core.rollout.types import Completion


@dataclass
class RolloutBatch:
    """Rows are samples; column t of the ``[batch, seq-1]`` tensors scores token t+1 of ``input_ids``."""

    input_ids: torch.Tensor  # [batch, seq]
    response_mask: torch.Tensor  # [batch, seq-1], 1 where the target token is a response token
    rollout_logprobs: torch.Tensor  # [batch, seq-1], engine logprobs of the targets
    advantages: torch.Tensor  # [batch]
    old_logprobs: torch.Tensor | None = None  # [batch, seq-1], trainer logprobs before the update
    ref_logprobs: torch.Tensor | None = None  # [batch, seq-1], base model (adapter disabled)

    def __len__(self) -> int:
        return self.input_ids.shape[0]

    def select(self, index: torch.Tensor) -> "RolloutBatch":
        pick = lambda t: None if t is None else t[index]  # noqa: E731
        return RolloutBatch(pick(self.input_ids), pick(self.response_mask), pick(self.rollout_logprobs),
                            pick(self.advantages), pick(self.old_logprobs), pick(self.ref_logprobs))

    def trimmed(self) -> "RolloutBatch":
        """Drop trailing all-padding columns (fewer FLOPs for a micro-batch of short samples)."""
        lengths = (self.response_mask.sum(0) > 0).nonzero()
        width = int(lengths.max()) + 1 if lengths.numel() else 1
        cut = lambda t: None if t is None else t[:, :width]  # noqa: E731
        return RolloutBatch(self.input_ids[:, : width + 1], cut(self.response_mask), cut(self.rollout_logprobs),
                            self.advantages, cut(self.old_logprobs), cut(self.ref_logprobs))

    def to(self, device: torch.device) -> "RolloutBatch":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return RolloutBatch(move(self.input_ids), move(self.response_mask), move(self.rollout_logprobs),
                            move(self.advantages), move(self.old_logprobs), move(self.ref_logprobs))


def build_batch(completions: list[Completion], advantages: torch.Tensor, pad_id: int) -> RolloutBatch:
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
    return RolloutBatch(ids, mask, logprobs, advantages.float())
