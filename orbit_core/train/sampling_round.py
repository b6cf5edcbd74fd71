"""One step's rollouts: generate, score, and (optionally) refill groups that carry no signal."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

from orbit_core.data.jsonl import PromptRecord
from orbit_core.rl.rewards import RewardRunner
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
) -> StepRollouts:
    """Sample ``num_groups`` prompt groups. With ``filter_zero_signal`` (DAPO dynamic sampling),
    groups whose rewards are all equal are set aside and more prompts are drawn, for at most
    ``max_rounds`` rounds; any shortfall is then filled from the set-aside groups so the batch
    keeps its size (those carry zero advantage under group baselines)."""
    out = StepRollouts(groups=[])
    reserve: list[Group] = []
    while len(out.groups) < num_groups and out.rounds < max_rounds:
        records = take_prompts(num_groups - len(out.groups))
        completions = engine.generate([encode(r) for r in records], params)
        scores, stats = rewards.score([str(records[c.prompt_index].prompt) for c in completions], [c.text for c in completions],
                                      [records[c.prompt_index].label for c in completions])
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
