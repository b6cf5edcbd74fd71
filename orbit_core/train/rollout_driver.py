"""Where a step's rollouts come from, and how the new adapter reaches the engine.

``ColocatedRollouts``: sync, in-process. The engine generates with the live model (the sync is
free), then gives its KV cache back so the trainer has the memory, or keeps it (``keep_cache``).
``RemoteRollouts``: an engine process. In sync mode batch ``t`` is submitted after adapter
``t-1`` is active. In async mode batches run ``max_staleness`` steps ahead: batch ``t+1+S`` is
submitted right after adapter ``t`` is pushed, and the engine's push barrier makes every sample
of batch ``b`` come from a version ``>= b-1-S``; each sample carries its version, checked here.
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass
from typing import Callable, NamedTuple

import torch

from orbit_core.data.jsonl import PromptRecord
from orbit_core.errors import OrbitError
from orbit_core.rl.reward_pool import RewardPool
from orbit_core.rl.rewards import RewardRunner
from orbit_core.rollout.adapter_payload import encode as encode_payload
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.remote import EngineProcess
from orbit_core.rollout.shared_adapter import SharedAdapterSender
from orbit_core.rollout.types import SamplingParams
from orbit_core.train.sampling_round import StepRollouts, collect_groups


@dataclass
class RoundSpec:
    rewards: RewardRunner | RewardPool
    take: Callable[[int], list[PromptRecord]]
    encode: Callable[[PromptRecord], list[int]]
    params: SamplingParams
    batch_size: int
    filter_zero_signal: bool
    max_rounds: int
    data_state: Callable[[], dict]


class EngineCounters(NamedTuple):
    """Cumulative since the engine started; a step's share is the difference of two readings."""

    busy_s: float
    reward_s: float
    tokens: int


def staleness_counts(step: int, versions: list[int]) -> Counter:
    """Samples used at ``step`` were produced by ``version``; the trainer is at ``step - 1``."""
    return Counter((step - 1) - v for v in versions)


KEEP_MARGIN = 0.1
"""``keep_cache=auto`` keeps the cache when training left free at least the cache plus this share
of the device's memory."""


def room_to_keep(free: int, total: int, cache: int) -> bool:
    """Whether a cache of ``cache`` bytes fits beside training that left ``free`` of ``total`` bytes."""
    return cache > 0 and free >= cache + KEEP_MARGIN * total


class ColocatedRollouts:
    def __init__(self, engine: BuiltinEngine, spec: RoundSpec, keep_cache: str = "auto"):
        self.engine, self.spec = engine, spec
        self.parity_engine = engine
        self.keep_cache = keep_cache
        self.keep = keep_cache == "true"
        """Keep the cache through the next training phase."""
        self.released_bytes = 0

    def begin(self, start_step: int) -> None:
        self.engine.adapter_version = start_step

    def collect(self, step: int) -> StepRollouts:
        s = self.spec
        out = collect_groups(self.engine, s.rewards, s.take, s.encode, s.params, s.batch_size, s.filter_zero_signal, s.max_rounds)
        if not self.keep:
            self.released_bytes = self.engine.cache_bytes()
            self.engine.release()
        out.extra.update(rollout_s=out.generate_s, idle_s=0.0, staleness=staleness_counts(step, _versions(out)))
        return out

    def publish(self, version: int, adapter_state: dict[str, torch.Tensor]) -> dict:
        self.engine.adapter_version = version  # it generates with the live weights: nothing moves
        if self.keep_cache == "auto" and not self.keep and self.engine.device.type == "cuda":
            # the trainer's high-water mark stays reserved by the caching allocator: what is still
            # free now is what the cache could have had beside it
            free, total = torch.cuda.mem_get_info(self.engine.device)
            self.keep = room_to_keep(free, total, self.released_bytes)
        return {"sync/bytes": 0, "sync/ms": 0.0}

    def data_state(self, step: int) -> dict:
        return self.spec.data_state()

    def engine_counters(self) -> EngineCounters | None:
        return None

    def engine_info(self) -> dict:
        return {}

    def close(self) -> None:
        pass


def _versions(out: StepRollouts) -> list[int]:
    return [c.adapter_version for g in out.groups for c in g.completions]


class AheadRollouts:
    """Batches submitted ``max_staleness`` steps ahead in async mode (none ahead in sync mode);
    subclasses say how a batch is submitted (``_submit``)."""

    def __init__(self, spec: RoundSpec, mode: str, max_staleness: int, total_steps: int):
        self.spec = spec
        self.ahead = max_staleness if mode == "async" else 0
        self.total_steps = total_steps
        self.inflight: dict = {}
        self.data_before: dict[int, dict] = {}

    def _submit(self, batch: int) -> None:
        raise NotImplementedError

    def begin(self, start_step: int) -> None:
        for batch in range(start_step + 1, min(self.total_steps, start_step + 1 + self.ahead) + 1):
            self._submit(batch)

    def data_state(self, step: int) -> dict:
        """Where the prompt stream stood before batch ``step + 1`` was drawn (in-flight batches are redrawn on resume)."""
        return self.data_before.get(step + 1) or self.spec.data_state()


class RemoteRollouts(AheadRollouts):
    def __init__(self, engine: EngineProcess, spec: RoundSpec, mode: str, max_staleness: int, total_steps: int,
                 engine_scores: bool, shared: SharedAdapterSender | None = None):
        super().__init__(spec, mode, max_staleness, total_steps)
        self.engine = engine
        self.shared = shared
        self.parity_engine = engine
        self.engine_scores = engine_scores

    def _submit(self, batch: int) -> None:
        s = self.spec
        self.data_before[batch] = s.data_state()
        records = s.take(s.batch_size)
        self.inflight[batch] = records
        rewards = [(str(r.prompt), r.label) for r in records] if self.engine_scores else None
        self.engine.submit(batch, [s.encode(r) for r in records], s.params, rewards)

    def _check_sync(self) -> None:
        if self.engine.failed:
            version, why = self.engine.failed[0]
            raise OrbitError(f"adapter sync v{version} failed in the engine, which stayed on v{self.engine.version}: {why}",
                             "the run stops after saving; check the adapter for NaN/inf and rerun to resume")

    def collect(self, step: int) -> StepRollouts:
        self._check_sync()
        if step not in self.inflight:
            self._submit(step)
        records = self.inflight.pop(step)
        s = self.spec
        start = time.perf_counter()
        completions = self.engine.collect(step, len(records) * s.params.n)
        waited = time.perf_counter() - start
        out = collect_groups(self.engine, s.rewards, s.take, s.encode, s.params, s.batch_size, s.filter_zero_signal,
                             s.max_rounds, first_round=(records, completions), first_scored=self.engine_scores)
        counts = staleness_counts(step, _versions(out))
        worst = max(counts)
        if worst > self.ahead or min(counts) < 0:
            raise OrbitError(f"step {step} got samples {worst} versions old, over train.max_staleness={self.ahead}",
                             "this is a bug in the engine's push barrier; please report it")
        out.extra.update(idle_s=waited + out.generate_s, staleness=counts)
        self._check_sync()
        return out

    def publish(self, version: int, adapter_state: dict[str, torch.Tensor]) -> dict:
        start = time.perf_counter()
        if self.shared is not None:
            nbytes = self.engine.push_shared(version, adapter_state, self.shared)
        else:
            payload = encode_payload(adapter_state)
            self.engine.push(version, payload)
            nbytes = len(payload)
        if self.ahead == 0:
            self.engine.wait_version(version)  # sync: the next batch starts on this adapter
            self._check_sync()
        elif version + 1 + self.ahead <= self.total_steps:
            self._submit(version + 1 + self.ahead)
        metrics = {"sync/bytes": nbytes, "sync/ms": (time.perf_counter() - start) * 1e3}
        applied = self.engine.synced.get(version) or self.engine.synced.get(max(self.engine.synced, default=-1))
        if applied:
            metrics["sync/engine_apply_ms"] = applied["apply_ms"]
            metrics["sync/push_to_active_ms"] = applied["sent_to_active_ms"]
        return metrics

    def engine_counters(self) -> EngineCounters | None:
        self.engine.pump()
        stats = self.engine.stats
        return EngineCounters(float(stats.get("busy_s", 0.0)), float(stats.get("reward_s", 0.0)), int(stats.get("tokens", 0)))

    def engine_info(self) -> dict:
        return dict(self.engine.info)

    def close(self) -> None:
        self.engine.close()
