"""Greedy accuracy and unbiased pass@k of a model (+ adapter) on a prompt JSONL."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any

from orbit_core.data.jsonl import PromptRecord
from orbit_core.data.prompts import encode_prompt, refuse_empty
from orbit_core.eval.passk import pass_at_k
from orbit_core.rl.rewards import require_a_score
from orbit_core.rollout.types import RolloutBackend, SamplingParams


@dataclass
class EvalReport:
    num_prompts: int
    greedy_accuracy: float
    pass_at_k: dict[str, float]
    n_samples: int
    mean_response_tokens: float
    reward_errors: int = 0
    reward_timeouts: int = 0
    examples: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, row: dict[str, Any]) -> "EvalReport":
        """Read back what ``to_dict`` wrote (an ``eval_report.json`` entry)."""
        names = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in row.items() if k in names})


def evaluate(
    engine: RolloutBackend,
    tokenizer,
    records: list[PromptRecord],
    rewards,
    *,
    chat: bool,
    max_prompt_len: int,
    max_new_tokens: int,
    n_samples: int,
    ks: list[int],
    temperature: float,
    stop: tuple[str, ...] = (),
) -> EvalReport:
    prompts = [encode_prompt(tokenizer, r.prompt, chat, max_prompt_len) for r in records]
    refuse_empty([r.line for r, p in zip(records, prompts) if not p], len(records), "eval data")
    texts = [r.prompt if isinstance(r.prompt, str) else str(r.prompt) for r in records]
    labels = [r.label for r in records]
    greedy = engine.generate(prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=0.0, stop=stop, n=1))
    greedy_scores, greedy_stats = rewards.score(texts, [c.text for c in greedy], labels)
    require_a_score(greedy_stats, len(greedy))  # else a broken reward would read as 0% accuracy
    sampled = engine.generate(
        prompts, SamplingParams(max_new_tokens=max_new_tokens, temperature=temperature, stop=stop, n=n_samples)
    )
    sample_scores, sample_stats = rewards.score(
        [texts[c.prompt_index] for c in sampled], [c.text for c in sampled], [labels[c.prompt_index] for c in sampled]
    )
    correct = [0] * len(records)
    for c, score in zip(sampled, sample_scores):
        correct[c.prompt_index] += int(score >= 1.0)
    passk = {f"pass@{k}": sum(pass_at_k(n_samples, c, k) for c in correct) / len(records) for k in ks}
    examples = [
        {"prompt": texts[c.prompt_index], "response": c.text, "label": labels[c.prompt_index], "reward": s}
        for c, s in list(zip(greedy, greedy_scores))[:8]
    ]
    return EvalReport(
        num_prompts=len(records),
        greedy_accuracy=sum(s >= 1.0 for s in greedy_scores) / len(records),
        pass_at_k=passk,
        n_samples=n_samples,
        mean_response_tokens=sum(len(c.token_ids) for c in sampled) / max(len(sampled), 1),
        reward_errors=greedy_stats.errors + sample_stats.errors,
        reward_timeouts=greedy_stats.timeouts + sample_stats.timeouts,
        examples=examples,
    )
