"""Runtime parity: the rollout engine and the trainer see the same model, token by token."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from orbit_core.models.transformer import DecoderLM
from orbit_core.rl.logprobs import token_logprobs
from orbit_core.rollout.types import Completion, RolloutBackend, SamplingParams


@dataclass
class TokenRow:
    prompt_index: int
    position: int
    token: str
    engine_logprob: float
    trainer_logprob: float

    @property
    def diff(self) -> float:
        return abs(self.engine_logprob - self.trainer_logprob)


@dataclass
class RuntimeReport:
    tokens: int
    max_abs_diff: float
    mean_abs_diff: float
    topk_agreement: float
    passed: bool
    worst: list[TokenRow] = field(default_factory=list)
    engine: str = ""
    trainer: str = ""
    """The two implementations compared."""


@torch.no_grad()
def runtime_parity(engine: RolloutBackend, trainer_model: DecoderLM, tokenizer, prompts: list[list[int]],
                   max_new_tokens: int, topk: int, max_abs_diff: float, min_agreement: float,
                   temperature: float = 1.0, max_mean_diff: float = float("inf")) -> RuntimeReport:
    """The engine samples responses; both sides score every sampled token (``softmax(logits / T)``).

    Agreement: mean over tokens of ``|top-k(engine) & top-k(trainer)| / k``.
    """
    completions: list[Completion] = engine.generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, n=1, topk_ids=topk))
    diffs, agreements, rows = [], [], []
    device = next(trainer_model.parameters()).device
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.token_ids], device=device)
        logits = trainer_model(ids[:, :-1])
        start = len(c.prompt_ids) - 1
        trainer = token_logprobs(logits, ids[:, 1:], temperature)[0, start:].float().cpu()
        engine_lp = torch.tensor(c.logprobs)
        trainer_topk = logits[0, start:].float().topk(topk, dim=-1).indices.cpu()
        engine_topk = torch.tensor(c.extra["topk_ids"])
        for t in range(len(c.token_ids)):
            overlap = len(set(trainer_topk[t].tolist()) & set(engine_topk[t].tolist())) / topk
            agreements.append(overlap)
            rows.append(TokenRow(c.prompt_index, t, tokenizer.decode([c.token_ids[t]]), float(engine_lp[t]), float(trainer[t])))
        diffs.append((engine_lp - trainer).abs())
    all_diffs = torch.cat(diffs) if diffs else torch.zeros(0)
    max_diff = float(all_diffs.max()) if all_diffs.numel() else 0.0
    mean_diff = float(all_diffs.mean()) if all_diffs.numel() else 0.0
    agreement = sum(agreements) / max(len(agreements), 1)
    worst = sorted(rows, key=lambda r: r.diff, reverse=True)[:10]
    passed = max_diff <= max_abs_diff and mean_diff <= max_mean_diff and agreement >= min_agreement
    return RuntimeReport(len(rows), max_diff, mean_diff, agreement, passed, worst,
                         getattr(engine, "name", type(engine).__name__), getattr(trainer_model, "implementation", ""))
