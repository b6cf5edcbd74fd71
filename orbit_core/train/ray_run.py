"""``train.orchestrator=ray``: the run as Ray actors in one placement group.

The calling process (the driver) starts or joins Ray, reserves the placement group (bundle 0 for the
trainer, one per engine), and starts the trainer actor, which runs the same ``TrainingRun`` as a
local run and starts the engine actors in the other bundles. The driver only relays the trainer's
progress to the caller's callbacks; every wait on an actor is bounded.
"""

from __future__ import annotations

import math
import os
import threading
from typing import Any

from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.rollout.ray_engine import NO_MULTICAST
from orbit_core.train.ray_engines import require_ray


class TrainerActor:
    """Runs the training loop where Ray placed it; the driver polls ``events`` while ``run`` goes on."""

    def __init__(self, config: RecipeConfig, cwd: str):
        os.environ.update(NO_MULTICAST)
        if os.path.isdir(cwd):  # relative paths in the recipe mean what they meant to the user
            os.chdir(cwd)
        self.config = config
        self.queue: list[tuple[str, tuple]] = []
        self.lock = threading.Lock()

    def _emit(self, kind: str, *args) -> None:
        with self.lock:
            self.queue.append((kind, args))

    def run(self):
        import torch

        from orbit_core.train.loop import Callbacks, run_here

        torch.set_num_threads(max(1, int(self.config.ray.trainer_cpus)))
        callbacks = Callbacks(on_message=lambda m: self._emit("message", m),
                              on_start=lambda start, total: self._emit("start", start, total),
                              on_step=lambda row: self._emit("step", row),
                              on_eval=lambda step, report: self._emit("eval", step, report))
        return run_here(self.config, callbacks)

    def events(self) -> list[tuple[str, tuple]]:
        with self.lock:
            out, self.queue = self.queue, []
        return out


def start_ray(config: RecipeConfig):
    """Join ``ray.address``, or start a Ray instance here sized for the placement group."""
    ray = require_ray()
    if ray.is_initialized():
        return ray, False
    env = {"env_vars": dict(NO_MULTICAST)}
    try:
        if config.ray.address:
            ray.init(address=config.ray.address, runtime_env=env, log_to_driver=True)
        else:
            needed = config.ray.trainer_cpus + config.ray.engine_cpus * max(config.rollout.num_engines,
                                                                             len(config.rollout.sglang_urls))
            ray.init(num_cpus=max(os.cpu_count() or 1, math.ceil(needed)), include_dashboard=False, runtime_env=env,
                     log_to_driver=True)
    except ConnectionError as err:
        raise OrbitError(f"cannot reach the Ray cluster at ray.address={config.ray.address}: {err}",
                         "start it (`ray start --head`), or leave ray.address empty to start Ray on this machine") from None
    return ray, True


def run_on_ray(config: RecipeConfig, callbacks) -> Any:
    from orbit_core.train.ray_rollouts import bundles

    ray, started = start_ray(config)
    from ray.util.placement_group import placement_group, remove_placement_group
    from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

    plan = bundles(config, float(ray.cluster_resources().get("GPU", 0)))
    group = placement_group(plan, strategy="PACK")
    trainer = None
    try:
        if not group.wait(timeout_seconds=config.ray.start_timeout_s):
            raise OrbitError(f"Ray could not reserve {plan} within ray.start_timeout_s={config.ray.start_timeout_s:.0f} s "
                             f"(cluster has {ray.cluster_resources()})",
                             "lower rollout.num_engines or ray.engine_cpus, or add machines to the cluster")
        strategy = PlacementGroupSchedulingStrategy(group, placement_group_bundle_index=0,
                                                    placement_group_capture_child_tasks=False)
        trainer = ray.remote(TrainerActor).options(num_cpus=plan[0]["CPU"], num_gpus=plan[0].get("GPU", 0.0),
                                                   max_concurrency=2, max_restarts=0, scheduling_strategy=strategy
                                                   ).remote(config, os.getcwd())
        return _relay(ray, trainer, trainer.run.remote(), callbacks)
    finally:
        if trainer is not None:
            ray.kill(trainer, no_restart=True)
        remove_placement_group(group)
        if started:
            ray.shutdown()


def _relay(ray, trainer, done, callbacks):
    handlers = {"message": callbacks.on_message, "start": callbacks.on_start, "step": callbacks.on_step,
                "eval": callbacks.on_eval}
    finished = False
    while True:
        finished = bool(ray.wait([done], timeout=0.5)[0])
        try:
            for kind, args in ray.get(trainer.events.remote(), timeout=60):
                handlers[kind](*args)
        except ray.exceptions.GetTimeoutError:
            raise OrbitError("the trainer actor did not answer for 60 s", "check `ray status` and the actor's log") from None
        except ray.exceptions.RayActorError as err:
            if not finished:
                raise OrbitError(f"the trainer actor died: {err}", "check the actor's log (ray logs)") from None
        if finished:
            break
    try:
        return ray.get(done, timeout=60)
    except ray.exceptions.RayTaskError as err:
        cause = getattr(err, "cause", None)
        if isinstance(cause, OrbitError):
            raise cause from None
        raise OrbitError(f"the trainer actor failed: {type(cause).__name__}: {cause}",
                         "the traceback is in the actor's log (ray logs)") from None
    except ray.exceptions.RayActorError as err:
        raise OrbitError(f"the trainer actor died: {err}", "check the actor's log (ray logs)") from None
