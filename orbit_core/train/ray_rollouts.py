"""``train.orchestrator=ray``: the run's rollouts from ``rollout.num_engines`` engine actors.

Sync mode: batch ``t`` is submitted once adapter ``t-1`` is loaded on every engine. Async mode:
batches run ``train.max_staleness`` steps ahead, as with the local engine process: batch
``t+1+S`` is submitted right after adapter ``t`` is queued on every engine, and because an actor
runs its calls in order, each sample of batch ``b`` comes from a version ``>= b-1-S`` (checked).
Rewards are scored here, by the run's reward pool.
"""

from __future__ import annotations

import os
import time
from typing import Any

import torch

from orbit_core.data.jsonl import PromptRecord
from orbit_core.errors import OrbitError
from orbit_core.train.ray_engines import RayEnginePool, Submission
from orbit_core.train.rollout_driver import AheadRollouts, EngineCounters, RoundSpec, staleness_counts
from orbit_core.train.sampling_round import StepRollouts, collect_groups


class RayRollouts(AheadRollouts):
    def __init__(self, pool: RayEnginePool, spec: RoundSpec, mode: str, max_staleness: int, total_steps: int):
        super().__init__(spec, mode, max_staleness, total_steps)
        self.pool = pool
        self.parity_engine = pool
        self.inflight: dict[int, tuple[list[PromptRecord], Submission]] = {}

    def _submit(self, batch: int) -> None:
        s = self.spec
        self.data_before[batch] = s.data_state()
        records = s.take(s.batch_size)
        self.inflight[batch] = (records, self.pool.submit([s.encode(r) for r in records], s.params))

    def collect(self, step: int) -> StepRollouts:
        if step not in self.inflight:
            self._submit(step)
        records, submission = self.inflight.pop(step)
        start = time.perf_counter()
        completions = self.pool.gather(submission)
        waited = time.perf_counter() - start
        self.pool.settle_loads(wait=False)
        s = self.spec
        out = collect_groups(self.pool, s.rewards, s.take, s.encode, s.params, s.batch_size, s.filter_zero_signal,
                             s.max_rounds, first_round=(records, completions))
        counts = staleness_counts(step, [c.adapter_version for g in out.groups for c in g.completions])
        if max(counts) > self.ahead or min(counts) < 0:
            raise OrbitError(f"step {step} got samples {max(counts)} versions old, over train.max_staleness={self.ahead}",
                             "this is a bug in the Ray engines' load ordering; please report it")
        out.extra.update(idle_s=waited + out.generate_s, staleness=counts)
        return out

    def publish(self, version: int, adapter_state: dict[str, torch.Tensor]) -> dict:
        start = time.perf_counter()
        size = self.pool.push(version, adapter_state)
        if self.ahead == 0:
            self.pool.settle_loads(wait=True)  # sync: the next batch starts on this adapter everywhere
        elif version + 1 + self.ahead <= self.total_steps:
            self._submit(version + 1 + self.ahead)
        return {"sync/bytes": size, "sync/ms": (time.perf_counter() - start) * 1e3, **self.pool.metrics()}

    def engine_counters(self) -> EngineCounters:
        """Engines work in parallel: their mean busy time stands for the step's generation time."""
        engines = self.pool.engines
        return EngineCounters(sum(e.busy_s for e in engines) / len(engines), 0.0, sum(e.tokens for e in engines))

    def engine_info(self) -> dict[str, Any]:
        return {}

    def close(self) -> None:
        self.pool.close()


def gpu_shares(config, cluster_gpus: float) -> tuple[float, float]:
    """GPUs the trainer and each engine reserve: none for a CPU model; with ``placement=colocated``
    the engines share the trainer's GPU, with ``non-colocated`` each has its own."""
    r, ray = config.rollout, config.ray
    if config.model.device == "cpu" or cluster_gpus <= 0:
        return 0.0, 0.0
    if r.backend == "sglang":  # the servers own their GPUs; the actors only proxy
        return 1.0, 0.0
    n = r.num_engines
    if ray.gpus_per_engine >= 0:
        engine = ray.gpus_per_engine
    else:
        engine = 1.0 if r.placement == "non-colocated" else 1.0 / (n + 1)
    trainer = 1.0 - n * engine if r.placement == "colocated" and 0 < n * engine < 1 else 1.0
    return trainer, engine


def bundles(config, cluster_gpus: float) -> list[dict[str, float]]:
    """The placement group: bundle 0 is the trainer, bundle ``1 + i`` engine ``i``."""
    trainer_gpus, engine_gpus = gpu_shares(config, cluster_gpus)
    count = len(config.rollout.sglang_urls) if config.rollout.backend == "sglang" else config.rollout.num_engines

    def bundle(cpus: float, gpus: float) -> dict[str, float]:
        return {"CPU": cpus, **({"GPU": gpus} if gpus > 0 else {})}

    return [bundle(config.ray.trainer_cpus, trainer_gpus)] + [bundle(config.ray.engine_cpus, engine_gpus)] * count


def start_ray_rollouts(config, policy, spec: RoundSpec, start_step: int, log) -> RayRollouts:
    """Engine actors in this trainer's placement group (bundles ``1..n``), or unplaced when the
    trainer runs outside one (the library used directly under an existing ``ray.init``)."""
    from orbit_core.config.loader import to_dict
    from orbit_core.config.schema import ModelSection
    from orbit_core.peft.slots import engine_adapter_state
    from orbit_core.rollout.ray_engine import BuiltinEngineActor, SGLangEngineActor, remote_class
    from orbit_core.train.ray_engines import require_ray

    ray = require_ray()
    from ray.util.placement_group import get_current_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    r, t, rc = config.rollout, config.train, config.ray
    group = get_current_placement_group()
    plan = bundles(config, float(ray.cluster_resources().get("GPU", 0)))
    sglang = r.backend == "sglang"
    count = len(r.sglang_urls) if sglang else r.num_engines
    base_path = os.path.abspath(policy.base_path) if os.path.exists(policy.base_path) else policy.base_path

    def factory(index: int, restart: int, adapter_ref, version: int):
        resources = plan[1 + index]
        options: dict[str, Any] = {"num_cpus": resources["CPU"], "num_gpus": resources.get("GPU", 0.0),
                                   "max_restarts": 0, "max_concurrency": 1,
                                   "name": f"orbit-engine-{os.getpid()}-{index}-r{restart}"}
        if group is not None:
            options["scheduling_strategy"] = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=1 + index)
        if sglang:
            return remote_class(ray, SGLangEngineActor).options(**options).remote(
                r.sglang_urls[index], r.engine_timeout_s, to_dict(config)["peft"], policy.adapter_targets,
                policy.base_path, adapter_ref, version)
        model = ModelSection(path=base_path, dtype=config.model.dtype,
                             device="cuda" if resources.get("GPU", 0) > 0 else "cpu", warmstart_steps=0)
        seed = t.seed + 7919 * start_step + 104729 * index + 15485863 * restart  # engines and replacements differ
        return remote_class(ray, BuiltinEngineActor).options(**options).remote(
            model, config.peft, r.max_running, seed, max(1, int(resources["CPU"])), adapter_ref, version, r.cuda_graph,
            config.moe.dequant_chunk_experts, config.moe.grouped_gemm)

    pool = RayEnginePool(factory, count, engine_adapter_state(policy.model), start_step, rc.max_engine_restarts,
                         r.engine_timeout_s, rc.start_timeout_s, log)
    return RayRollouts(pool, spec, t.mode, t.max_staleness, t.steps)
