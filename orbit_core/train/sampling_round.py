"""One step's rollouts: generate, score, and (optionally) refill groups that carry no signal."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

from orbit_core.data.jsonl import PromptRecord
from orbit_core.rl.rewards import RewardRunner, require_a_score, summarize
from orbit_core.rollout.types import Completion, RolloutBackend, SamplingParams


@dataclass
class Group:
    record: PromptRecord
    completions: list[Completion]
    scores: list[float]

    @property
    def has_signal(self) -> bool:
        return len(set(self.scores)) > 1


@dataclass
class StepRollouts:
    groups: list[Group]
    rounds: int = 0
    groups_filtered: int = 0
    reward_errors: int = 0
    reward_timeouts: int = 0
    last_error: str = ""
    reward_s: float = 0.0
    generate_s: float = 0.0
    """Time spent generating inside this call (refills; all of it for an in-process engine)."""
    extra: dict[str, Any] = field(default_factory=dict)


def collect_groups(
    engine: RolloutBackend,
    rewards: RewardRunner,
    take_prompts: Callable[[int], list[PromptRecord]],
    encode: Callable[[PromptRecord], list[int]],
    params: SamplingParams,
    num_groups: int,
    filter_zero_signal: bool,
    max_rounds: int,
    first_round: tuple[list[PromptRecord], list[Completion]] | None = None,
    first_scored: bool = False,
) -> StepRollouts:
    """Sample ``num_groups`` prompt groups. With ``filter_zero_signal`` (DAPO dynamic sampling),
    groups whose rewards are all equal are set aside and more prompts are drawn, for at most
    ``max_rounds`` rounds; any shortfall is then filled from the set-aside groups so the batch
    keeps its size (those carry zero advantage under group baselines). ``first_round`` holds prompts
    already generated elsewhere (an async engine) as round one; ``first_scored``: the engine
    already scored them (``extra["reward"]``)."""
    out = StepRollouts(groups=[])
    reserve: list[Group] = []
    while len(out.groups) < num_groups and out.rounds < max_rounds:
        scored = False
        if first_round is not None:
            (records, completions), first_round, scored = first_round, None, first_scored
        else:
            records = take_prompts(num_groups - len(out.groups))
            start = time.perf_counter()
            completions = engine.generate([encode(r) for r in records], params)
            out.generate_s += time.perf_counter() - start
        start = time.perf_counter()
        if scored:
            scores = [c.extra["reward"] for c in completions]
            stats = summarize([c.extra.get("reward_error", "ok") for c in completions])
        else:
            scores, stats = rewards.score([str(records[c.prompt_index].prompt) for c in completions],
                                          [c.text for c in completions], [records[c.prompt_index].label for c in completions])
        out.reward_s += time.perf_counter() - start
        require_a_score(stats, len(completions))
        out.rounds += 1
        out.reward_errors += stats.errors
        out.reward_timeouts += stats.timeouts
        out.last_error = stats.last_error or out.last_error
        for index, record in enumerate(records):
            members = [i for i, c in enumerate(completions) if c.prompt_index == index]
            group = Group(record, [completions[i] for i in members], [scores[i] for i in members])
            if filter_zero_signal and not group.has_signal:
                reserve.append(group)
                out.groups_filtered += 1
            else:
                out.groups.append(group)
        if not filter_zero_signal:
            break
    out.groups.extend(reserve[: num_groups - len(out.groups)])
    return out
