"""Token logprobs and entropies from logits."""

from __future__ import annotations

import torch


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits: [batch, seq, vocab], targets: [batch, seq] -> log softmax(logits / T)[target]: [batch, seq]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, targets[..., None])[..., 0]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: [batch, seq]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(scaled, -1)
    return -(logp.exp() * logp).sum(-1)
