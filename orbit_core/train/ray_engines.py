"""Rollout engines as Ray actors: least-loaded dispatch, adapters through the object store, and
replacement of engines that die.

Each adapter version is ``ray.put`` once; every engine's ``load_adapter`` call takes that one
object reference, so each engine pulls the tensors from the object store (over the network only
when it runs on another node). An engine that dies is replaced by a new actor built on the newest
adapter, and the prompts it held are submitted again. The new samples come from a version at
least as new as the ones they replace, so the staleness bound still holds.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable

import torch

from orbit_core.errors import OrbitError
from orbit_core.rollout.ray_engine import PROBE
from orbit_core.rollout.types import Completion, SamplingParams


def require_ray():
    try:
        import ray
    except ImportError:
        raise OrbitError("train.orchestrator=ray needs Ray, which is not installed",
                         "pip install 'orbit-rl[ray]' (or pip install ray), or use train.orchestrator=local") from None
    return ray


@dataclass
class Engine:
    index: int
    actor: Any
    restarts: int = 0
    in_flight: int = 0
    """Samples submitted and not yet gathered: the load that dispatch balances."""
    tokens: int = 0
    busy_s: float = 0.0
    sync_ms: float = 0.0
    version: int = 0
    last_error: str = ""


@dataclass
class Share:
    engine: int
    actor: Any
    prompts: list[int]
    """Indices into the submitted prompt list."""
    ref: Any
    samples: int


@dataclass
class Submission:
    prompts: list[list[int]]
    params: SamplingParams
    shares: list[Share] = field(default_factory=list)


ActorFactory = Callable[[int, int, Any, int], Any]
"""(engine index, restart count, adapter object ref, version) -> a started actor handle."""


class RayEnginePool:
    """A ``RolloutBackend`` over ``count`` engine actors."""

    name = "Ray engine actors"

    def __init__(self, factory: ActorFactory, count: int, initial: dict[str, torch.Tensor], version: int,
                 max_restarts: int, timeout_s: float, start_timeout_s: float, log: Callable[[str], None]):
        self.ray = require_ray()
        self.factory, self.max_restarts, self.timeout_s, self.log = factory, max_restarts, timeout_s, log
        self.start_timeout_s = start_timeout_s
        self.adapter_ref, self.version = self.ray.put(_cpu(initial)), version
        self.engines = [Engine(i, factory(i, 0, self.adapter_ref, version), version=version) for i in range(count)]
        self.pending_loads: list[tuple[int, Any, Any]] = []
        self.restarted = 0
        infos = self._get([e.actor.info.remote() for e in self.engines], start_timeout_s, "starting the rollout engines")
        for engine, info in zip(self.engines, infos):
            log(f"rollout engine {engine.index}: Ray actor pid {info['pid']} on {info['host']} ({info['device']}, "
                f"{info['threads']} threads)")

    def _get(self, refs, timeout_s: float, what: str):
        try:
            return self.ray.get(refs, timeout=timeout_s)
        except self.ray.exceptions.GetTimeoutError:
            raise OrbitError(f"Ray actors did not answer within {timeout_s:.0f} s while {what}",
                             "check `ray status` for free CPUs/GPUs, or raise ray.start_timeout_s") from None
        except self.ray.exceptions.RayTaskError as err:
            raise _task_error(err, what) from None
        except self.ray.exceptions.RayActorError as err:
            raise OrbitError(f"a rollout engine actor died while {what}: {_reason(err)}",
                             "check the actor's log (ray logs) for the cause") from None

    # -- dispatch --------------------------------------------------------------------------
    def submit(self, prompts: list[list[int]], params: SamplingParams) -> Submission:
        """Each prompt (all its samples) goes to the engine with the fewest samples in flight."""
        assignment: dict[int, list[int]] = {}
        for p in range(len(prompts)):
            engine = min(self.engines, key=lambda e: (e.in_flight, e.index))
            engine.in_flight += params.n
            assignment.setdefault(engine.index, []).append(p)
        sub = Submission(prompts, params)
        for index, members in assignment.items():
            sub.shares.append(self._send(index, members, prompts, params))
        return sub

    def _send(self, index: int, members: list[int], prompts: list[list[int]], params: SamplingParams) -> Share:
        engine = self.engines[index]
        ref = engine.actor.generate.remote([prompts[p] for p in members], params)
        return Share(index, engine.actor, members, ref, len(members) * params.n)

    def gather(self, sub: Submission) -> list[Completion]:
        """Every completion of ``sub``, ordered by (prompt, sample); lost shares are resubmitted."""
        out: list[Completion] = []
        queue = list(sub.shares)
        while queue:
            share = queue.pop(0)
            engine = self.engines[share.engine]
            try:
                completions, stats = self._result(share)
            except self.ray.exceptions.GetTimeoutError:
                engine.in_flight -= share.samples
                self._replace(engine, share.actor, f"no progress within rollout.engine_timeout_s={self.timeout_s:g} s")
                queue.append(self._resend(share, sub))
                continue
            except self.ray.exceptions.RayTaskError as err:
                engine.in_flight -= share.samples
                raise _task_error(err, f"generating on rollout engine {engine.index}") from None
            except self.ray.exceptions.RayActorError as err:
                engine.in_flight -= share.samples
                self._replace(engine, share.actor, _reason(err))
                queue.append(self._resend(share, sub))
                continue
            engine.in_flight -= share.samples
            engine.tokens += stats["tokens"]
            engine.busy_s += stats["busy_s"]
            for c in completions:
                c.prompt_index = share.prompts[c.prompt_index]
            out.extend(completions)
        return sorted(out, key=lambda c: (c.prompt_index, c.sample_index))

    def _result(self, share: Share):
        """The share's answer. The limit is on silence, not on the whole call: while the share is out,
        the actor's ``progress`` (its ``PROBE`` group) is read every few seconds, and the wait gives
        up (GetTimeoutError) once it has not moved for ``timeout_s``, so a generation longer than the
        limit goes on and a stalled or frozen engine is replaced."""
        poll = min(5.0, self.timeout_s / 4)
        moved, seen = time.monotonic(), None
        while True:
            if self.ray.wait([share.ref], timeout=poll)[0]:
                return self.ray.get(share.ref)
            left = self.timeout_s - (time.monotonic() - moved)
            try:
                progress = self.ray.get(share.actor.progress.options(concurrency_group=PROBE).remote(),
                                        timeout=max(0.1, left))
            except self.ray.exceptions.GetTimeoutError:  # a frozen actor answers nothing
                progress = seen
            if progress != seen:
                moved, seen = time.monotonic(), progress
            elif time.monotonic() - moved > self.timeout_s:
                raise self.ray.exceptions.GetTimeoutError(f"no progress for {self.timeout_s:g} s")

    def _resend(self, share: Share, sub: Submission) -> Share:
        engine = min(self.engines, key=lambda e: (e.in_flight, e.index))
        engine.in_flight += share.samples
        return self._send(engine.index, share.prompts, sub.prompts, sub.params)

    def _replace(self, engine: Engine, dead_actor, error: str) -> None:
        """Start a new actor for ``engine`` on the newest adapter (once per death: shares of later
        batches that held the same dead actor are only resubmitted)."""
        if engine.actor is not dead_actor:
            return
        engine.last_error = error
        engine.restarts += 1
        if engine.restarts > self.max_restarts:
            raise OrbitError(f"rollout engine {engine.index} died {engine.restarts} times (ray.max_engine_restarts="
                             f"{self.max_restarts}); last error: {error}",
                             "the run stops after saving its last step; fix the cause and rerun to resume")
        self.log(f"rollout engine {engine.index} died ({error}); starting a replacement on adapter v{self.version} "
                 f"(restart {engine.restarts} of {self.max_restarts})")
        try:
            self.ray.kill(dead_actor, no_restart=True)
        except Exception:  # already gone: nothing to kill
            pass
        engine.actor = self.factory(engine.index, engine.restarts, self.adapter_ref, self.version)
        engine.version = self.version
        self._get(engine.actor.info.remote(), self.start_timeout_s, f"restarting rollout engine {engine.index}")
        self.restarted += 1

    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        """The ``RolloutBackend`` protocol, synchronously (preflight, dynamic-sampling refills)."""
        return self.gather(self.submit(prompts, params))

    # -- adapters --------------------------------------------------------------------------
    def push(self, version: int, state: dict[str, torch.Tensor]) -> int:
        """Put ``state`` in the object store once and queue its load on every engine, behind the
        generate calls already submitted and ahead of every later one. Returns the bytes put."""
        tensors = _cpu(state)
        self.adapter_ref, self.version = self.ray.put(tensors), version
        for engine in self.engines:
            self.pending_loads.append((engine.index, engine.actor, engine.actor.load_adapter.remote(version, self.adapter_ref)))
        return sum(t.numel() * t.element_size() for t in tensors.values())

    def settle_loads(self, wait: bool) -> None:
        """Take the results of queued adapter loads: all of them (``wait``), or those finished. A load
        that raised is a failed sync (the run stops); a dead engine is replaced at its next gather."""
        loads, self.pending_loads = self.pending_loads, []
        for index, actor, ref in loads:
            engine = self.engines[index]
            if not wait and not self.ray.wait([ref], timeout=0)[0]:
                self.pending_loads.append((index, actor, ref))
                continue
            try:
                stats = self.ray.get(ref, timeout=self.timeout_s)
            except self.ray.exceptions.RayTaskError as err:
                raise _task_error(err, f"loading the adapter on rollout engine {index}") from None
            except (self.ray.exceptions.RayActorError, self.ray.exceptions.GetTimeoutError) as err:
                if engine.actor is actor:
                    engine.last_error = _reason(err)
                continue
            if engine.actor is actor:
                engine.sync_ms, engine.version = stats["sync_ms"], stats["version"]

    def metrics(self) -> dict[str, float]:
        out: dict[str, float] = {"rollout/engine_restarts": self.restarted}
        for e in self.engines:
            out.update({f"engine{e.index}/tokens_per_s": e.tokens / e.busy_s if e.busy_s else 0.0,
                        f"engine{e.index}/queue_depth": e.in_flight, f"engine{e.index}/adapter_version": e.version,
                        f"engine{e.index}/sync_ms": e.sync_ms, f"engine{e.index}/restarts": e.restarts})
        return out

    def close(self) -> None:
        for engine in self.engines:
            try:
                self.ray.kill(engine.actor, no_restart=True)
            except Exception:  # already gone
                pass


def _cpu(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {name: t.detach().to("cpu").contiguous() for name, t in state.items()}


def _reason(err: BaseException) -> str:
    text = str(err).strip().splitlines()
    useful = [line.strip() for line in text if line.strip() and not line.startswith("\t")]
    return " ".join(useful)[:400] or type(err).__name__


def _task_error(err, what: str) -> OrbitError:
    cause = getattr(err, "cause", None)
    if isinstance(cause, OrbitError):
        return cause
    return OrbitError(f"{what} failed: {type(cause).__name__ if cause else 'error'}: {cause or _reason(err)}",
                      "the run stops after saving its last step; the actor's traceback is in its Ray log")
