"""Token logprobs and entropies from logits."""

from __future__ import annotations

import torch
import torch.nn.functional as F


def token_logprobs(logits: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """logits: [batch, seq, vocab], targets: [batch, seq] -> log softmax(logits / T)[target]: [batch, seq]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    return torch.log_softmax(scaled, -1).gather(-1, targets[..., None])[..., 0]


def token_entropy(logits: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """Entropy of softmax(logits / T) per position: [batch, seq]."""
    scaled = logits.float() / (temperature if temperature > 0 else 1.0)
    logp = torch.log_softmax(scaled, -1)
    return -(logp.exp() * logp).sum(-1)


class _ChunkedLogprobs(torch.autograd.Function):
    """``log_softmax(hidden @ W^T / T)[target]`` a chunk of rows at a time.

    Only ``hidden`` and each row's log-sum-exp are kept for backward; the ``[rows, vocab]`` logits
    exist one chunk at a time, in forward and again in backward, instead of as one fp32
    ``[batch, seq, vocab]`` tensor. ``W`` (the frozen lm_head) gets no gradient.
    """

    @staticmethod
    def forward(ctx, hidden, weight, targets, temperature: float, chunk: int):
        out = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
        lse = torch.empty_like(out)
        for start in range(0, hidden.shape[0], chunk):
            rows = slice(start, start + chunk)
            logits = F.linear(hidden[rows], weight).float() / temperature
            lse[rows] = torch.logsumexp(logits, -1)
            out[rows] = logits.gather(-1, targets[rows, None])[:, 0] - lse[rows]
        ctx.save_for_backward(hidden, weight, targets, lse)
        ctx.temperature, ctx.chunk = temperature, chunk
        return out

    @staticmethod
    def backward(ctx, grad_out):
        hidden, weight, targets, lse = ctx.saved_tensors
        grad_hidden = torch.empty_like(hidden)
        for start in range(0, hidden.shape[0], ctx.chunk):
            rows = slice(start, start + ctx.chunk)
            probs = torch.exp(F.linear(hidden[rows], weight).float() / ctx.temperature - lse[rows, None])
            grad_logits = -probs * grad_out[rows, None]
            grad_logits.scatter_add_(-1, targets[rows, None], grad_out[rows, None])
            grad_hidden[rows] = (grad_logits / ctx.temperature).to(weight.dtype) @ weight
        return grad_hidden, None, None, None, None


def chunked_token_logprobs(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, temperature: float = 1.0,
                           chunk_rows: int = 1024) -> torch.Tensor:
    """hidden: [batch, seq, hidden] (final normed states), weight: the lm_head [vocab, hidden],
    targets: [batch, seq] -> logprobs [batch, seq], equal to ``token_logprobs(hidden @ W^T, targets)``."""
    if weight.requires_grad:
        raise ValueError("chunked_token_logprobs is for a frozen lm_head")
    batch, seq, width = hidden.shape
    flat = _ChunkedLogprobs.apply(hidden.reshape(batch * seq, width), weight, targets.reshape(-1),
                                  temperature if temperature > 0 else 1.0, chunk_rows)
    return flat.view(batch, seq)


@torch.no_grad()
def chunked_token_entropy(hidden: torch.Tensor, weight: torch.Tensor, temperature: float = 1.0,
                          chunk_rows: int = 1024) -> torch.Tensor:
    """Entropy per position [batch, seq] for the metrics, without a [batch, seq, vocab] tensor."""
    batch, seq, width = hidden.shape
    flat = hidden.reshape(batch * seq, width)
    out = torch.empty(batch * seq, dtype=torch.float32, device=hidden.device)
    for start in range(0, flat.shape[0], chunk_rows):
        logp = torch.log_softmax(F.linear(flat[start:start + chunk_rows], weight).float() / (temperature or 1.0), -1)
        out[start:start + chunk_rows] = -(logp.exp() * logp).sum(-1)
    return out.view(batch, seq)
