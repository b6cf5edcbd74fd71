"""What a rollout backend takes and returns, and the protocol every backend implements."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 64
    temperature: float = 1.0
    """0 = greedy. Returned logprobs are of softmax(logits / temperature) (1 when greedy)."""
    top_p: float = 1.0
    top_k: int = 0
    stop: tuple[str, ...] = ()
    n: int = 1
    """Samples per prompt."""
    topk_ids: int = 0
    """Also record the top-k token ids at every generated position (``Completion.extra["topk_ids"]``)."""


@dataclass
class Completion:
    prompt_index: int
    sample_index: int
    prompt_ids: list[int]
    token_ids: list[int]
    logprobs: list[float]
    """Logprob of each sampled token, aligned with ``token_ids``."""
    text: str
    finish_reason: str
    """``eos``, ``stop`` (a stop string) or ``length``."""
    adapter_version: int = 0
    extra: dict = field(default_factory=dict)
    routing: Any = None
    """MoE models: int16 tensor [len(prompt_ids) + len(token_ids) - 1, moe_layers, k], the experts the
    engine routed each fed position to (what ``rl.routing_replay`` makes the trainer use)."""


class RolloutBackend(Protocol):
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """Completions ordered by (prompt_index, sample_index)."""
        ...
