"""Start a non-colocated engine process for a run: device, CPU threads, initial adapter."""

from __future__ import annotations

import os
from typing import Callable

import torch

from orbit_core.config.schema import RecipeConfig
from orbit_core.peft.slots import engine_adapter_state
from orbit_core.rollout.adapter_payload import encode
from orbit_core.rollout.remote import EngineProcess
from orbit_core.rollout.shared_adapter import SharedAdapterSender
from orbit_core.rollout.worker import EngineSpec
from orbit_core.train.rollout_driver import RemoteRollouts, RoundSpec
from orbit_core.policy.build import PolicyModel


def engine_device(spec: str, trainer_device: torch.device) -> str:
    if spec != "auto":  # checked before anything loaded (``TrainingRun._load_data``)
        return spec
    if trainer_device.type == "cuda" and torch.cuda.device_count() > 1:
        return "cuda:1"
    return str(trainer_device)


def split_threads(requested: int) -> int:
    """Threads for the engine process; the trainer process keeps the other cores."""
    cores = os.cpu_count() or 1
    engine = requested or max(1, cores // 2)
    torch.set_num_threads(max(1, cores - engine))
    return engine


def start_remote_rollouts(config: RecipeConfig, policy: PolicyModel, spec: RoundSpec, start_step: int,
                          log: Callable[[str], None]) -> RemoteRollouts:
    r, t = config.rollout, config.train
    threads = split_threads(r.engine_threads)
    engine_spec = EngineSpec(
        model_path=policy.base_path, dtype=config.model.dtype, device=engine_device(r.engine_device, policy.device),
        peft=config.peft, num_slots=2 if r.adapter_double_buffer else 1, max_running=r.max_running,
        seed=t.seed + 7919 * start_step, threads=threads, adapter=encode(engine_adapter_state(policy.model)),
        version=start_step, reward=config.rl.reward, reward_timeout_s=config.rl.reward_timeout_s,
        reward_workers=config.rl.reward_workers, moe_chunk=config.moe.dequant_chunk_experts,
        moe_grouped_gemm=config.moe.grouped_gemm, cuda_graph=config.rollout.cuda_graph,
        heartbeat_s=min(10.0, r.engine_timeout_s / 4))
    engine = EngineProcess(engine_spec, timeout_s=r.engine_timeout_s, start_timeout_s=r.engine_start_timeout_s)
    transport = r.adapter_transport if r.adapter_transport != "auto" else "shared" if policy.device.type == "cuda" else "pipe"
    # a buffer is rewritten max_staleness + 2 syncs later, by when the engine has long taken it
    shared = SharedAdapterSender(policy.device, t.max_staleness + 2) if transport == "shared" else None
    log(f"rollout engine: pid {engine.info['pid']} on {engine.info['device']} ({engine.info['threads']} threads), "
        f"{t.mode}, {'two adapter slots' if r.adapter_double_buffer else 'one adapter slot'}, adapter syncs by {transport}")
    return RemoteRollouts(engine, spec, t.mode, t.max_staleness, t.steps, engine_scores=True, shared=shared)
