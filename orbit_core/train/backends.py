"""What the loop sees of a trainer and of a rollout source, and the registries that build them.

The loop calls only these protocol methods; ``train.backend`` and ``rollout.backend`` pick the
class from the registries below, so a new backend is one entry here and no edit to the loop.
"""

from __future__ import annotations

from typing import Any, Callable, Protocol

import torch

from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.models.transformer import DecoderLM
from orbit_core.policy.build import PolicyModel
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import RolloutBackend
from orbit_core.train.batch import RolloutBatch
from orbit_core.train.sampling_round import StepRollouts


class TrainerBackend(Protocol):
    has_value_head: bool
    parity_model: torch.nn.Module
    """Called as ``parity_model(ids)`` -> logits by the runtime preflight (the trainer's side of
    parity); its ``implementation`` names it in the report."""

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        """No-grad logprobs ``[batch, seq-1]`` of the current policy (and values with a value head)."""
        ...

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        """Logprobs of the frozen base (adapter disabled)."""
        ...

    def teacher_logprobs(self, batch: RolloutBatch) -> torch.Tensor: ...

    def routing_mismatch(self) -> float | None:
        """MoE: the fraction of positions the last ``score`` routed differently from the engine."""
        ...

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One optimizer step on one global batch; ``update_skipped`` is 1 when it was not applied."""
        ...

    def adapter_state(self) -> dict[str, torch.Tensor]: ...

    def engine_adapter_state(self) -> dict[str, torch.Tensor]:
        """The tensors a rollout engine needs (no value head)."""
        ...

    def load_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None: ...

    def state_dict(self) -> dict[str, Any]: ...

    def load_state_dict(self, state: dict[str, Any]) -> None: ...

    def close(self) -> None:
        """Release what the trainer started (tensor-parallel ranks)."""
        ...


class RolloutSource(Protocol):
    """Where a step's samples come from and how a new adapter reaches the engine."""

    parity_engine: RolloutBackend
    """The engine that generates the training samples (the runtime preflight checks it)."""

    def begin(self, start_step: int) -> None: ...

    def collect(self, step: int) -> StepRollouts: ...

    def publish(self, version: int, adapter_state: dict[str, torch.Tensor]) -> dict[str, float]: ...

    def data_state(self, step: int) -> dict: ...

    def engine_counters(self) -> Any: ...

    def engine_info(self) -> dict[str, Any]:
        """pid, device and threads of an engine process (empty for an in-process engine)."""
        ...

    def close(self) -> None: ...


def _torch_trainer(config: RecipeConfig, policy: PolicyModel, teacher: DecoderLM | None) -> TrainerBackend:
    from orbit_core.train.torch_backend import TorchTrainer

    return TorchTrainer(policy.model, config, teacher)


def _builtin_rollouts(config: RecipeConfig, policy: PolicyModel, engine: BuiltinEngine, spec, start_step: int,
                      log: Callable[[str], None]) -> RolloutSource:
    from orbit_core.train.remote_setup import start_remote_rollouts
    from orbit_core.train.rollout_driver import ColocatedRollouts

    if config.rollout.placement == "non-colocated":
        return start_remote_rollouts(config, policy, spec, start_step, log)
    return ColocatedRollouts(engine, spec, config.rollout.keep_cache)


def _sglang_rollouts(config: RecipeConfig, policy: PolicyModel, engine: BuiltinEngine, spec, start_step: int,
                     log: Callable[[str], None]) -> RolloutSource:
    from orbit_core.config.loader import to_dict
    from orbit_core.peft.slots import engine_adapter_state
    from orbit_core.train.sglang_rollouts import SGLangRollouts

    r = config.rollout
    log(f"rollout: {len(r.sglang_urls)} SGLang-API server(s): {', '.join(r.sglang_urls)}")
    return SGLangRollouts(list(r.sglang_urls), spec, to_dict(config)["peft"], policy.adapter_targets, policy.base_path,
                          r.engine_timeout_s, engine_adapter_state(policy.model), start_step)


def _megatron_trainer(config: RecipeConfig, policy: PolicyModel, teacher: DecoderLM | None) -> TrainerBackend:
    from orbit_core.models.megatron_gpt import require_megatron

    require_megatron()
    from orbit_core.train.megatron_backend import MegatronTrainer

    return MegatronTrainer(policy, config, teacher)


TRAINER_BACKENDS: dict[str, Callable[..., TrainerBackend]] = {"torch": _torch_trainer, "megatron": _megatron_trainer}
ROLLOUT_BACKENDS: dict[str, Callable[..., RolloutSource]] = {"builtin": _builtin_rollouts, "sglang": _sglang_rollouts}


def _pick(registry: dict[str, Callable], field: str, name: str) -> Callable:
    if name not in registry:
        raise OrbitError(f"{field}={name} has no implementation in this install", f"use one of {', '.join(registry)}")
    return registry[name]


def build_trainer(config: RecipeConfig, policy: PolicyModel, teacher: DecoderLM | None) -> TrainerBackend:
    return _pick(TRAINER_BACKENDS, "train.backend", config.train.backend)(config, policy, teacher)


def build_rollouts(config: RecipeConfig, policy: PolicyModel, engine: BuiltinEngine, spec, start_step: int,
                   log: Callable[[str], None]) -> RolloutSource:
    if config.train.orchestrator == "ray":  # engines of either backend, as Ray actors
        from orbit_core.train.ray_rollouts import start_ray_rollouts

        _pick(ROLLOUT_BACKENDS, "rollout.backend", config.rollout.backend)
        return start_ray_rollouts(config, policy, spec, start_step, log)
    return _pick(ROLLOUT_BACKENDS, "rollout.backend", config.rollout.backend)(config, policy, engine, spec, start_step, log)
