"""Supervised warm-start: next-token cross-entropy on response tokens only."""

from __future__ import annotations

import random
from typing import Callable

import torch
import torch.nn.functional as F

from orbit_core.models.transformer import DecoderLM


def sft_batch(tokenizer, rows: list[dict], render: Callable[[str], str]) -> tuple[torch.Tensor, torch.Tensor]:
    """-> (ids [batch, seq], loss_mask [batch, seq]); the mask marks response tokens (and EOS).

    A row's ``target`` (when present) is what the model imitates; ``label`` is the true answer.
    """
    seqs, masks = [], []
    for row in rows:
        prompt = tokenizer(row["prompt"], add_special_tokens=False)["input_ids"]
        answer = tokenizer(render(row.get("target", row["label"])), add_special_tokens=False)["input_ids"] + [tokenizer.eos_token_id]
        seqs.append(prompt + answer)
        masks.append([0] * len(prompt) + [1] * len(answer))
    width = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), width), tokenizer.pad_token_id, dtype=torch.long)
    mask = torch.zeros((len(seqs), width), dtype=torch.float32)
    for i, (s, m) in enumerate(zip(seqs, masks)):
        ids[i, : len(s)] = torch.tensor(s)
        mask[i, : len(m)] = torch.tensor(m, dtype=torch.float32)
    return ids, mask


def supervised_warmstart(
    model: DecoderLM,
    tokenizer,
    rows: list[dict],
    render: Callable[[str], str],
    steps: int,
    batch_size: int = 64,
    lr: float = 3e-3,
    seed: int = 0,
    on_step: Callable[[int, float], None] | None = None,
) -> float:
    """Train every parameter of ``model`` for ``steps``; returns the last loss."""
    rng = random.Random(seed)
    model.requires_grad_(True)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0, betas=(0.9, 0.98))
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / 50) * max(0.05, 1 - s / max(steps, 1)))
    loss_value = float("nan")
    for step in range(steps):
        ids, mask = sft_batch(tokenizer, rng.sample(rows, batch_size), render)
        logits = model(ids[:, :-1])
        token_loss = F.cross_entropy(logits.flatten(0, 1).float(), ids[:, 1:].flatten(), reduction="none")
        loss = (token_loss * mask[:, 1:].flatten()).sum() / mask[:, 1:].sum()
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        schedule.step()
        loss_value = loss.item()
        if on_step is not None:
            on_step(step, loss_value)
    model.requires_grad_(False)
    model.eval()
    return loss_value
