"""Adapter-only sync vs full-weight sync for a real model shape, one JSON line per measurement.

Writes a random bf16 checkpoint of ``--shape``, loads it with the adapter on the GPU, starts a
real engine process on the same GPU and times a sync end to end: serialize the adapter, pipe
it, validate it, (OFT) solve the rotations, write the slot, until the engine acknowledges.
Baseline, same run and same transport: the full base weights sent to a receiver process and
copied onto its GPU (what a full-weight RL system moves every step).

Transports (``rollout.adapter_transport``): ``pipe`` serializes to safetensors bytes and pipes
them; ``shared`` packs into a buffer on the trainer's GPU that the other process opens through
CUDA IPC and copies out of (``orbit_core.rollout.shared_adapter``).
    python -m bench.adapter_sync --shape qwen3-1.7b --transport pipe shared --engine-device cuda:1
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import shutil
import tempfile
import time
from pathlib import Path
from statistics import median

import torch

from bench.base_memory import write_random_checkpoint
from bench.rollout_throughput import SHAPES
from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.peft.slots import engine_adapter_state
from orbit_core.rollout.adapter_payload import decode, encode
from orbit_core.rollout.remote import EngineProcess
from orbit_core.rollout.shared_adapter import SharedAdapterReceiver, SharedAdapterSender
from orbit_core.rollout.worker import EngineSpec
from orbit_core.policy.build import build_policy

PEFTS = {"lora": PeftSection(method="lora", rank=16, alpha=32), "oft": PeftSection(method="oft", oft_block_size=32)}


def receiver(conn, device: str) -> None:
    shared = SharedAdapterReceiver(torch.device(device))
    while True:
        message = conn.recv()
        if message is None:
            return
        if message[0] == "bytes":
            tensors = {k: v.to(device, non_blocking=True) for k, v in decode(message[1]).items()}
            torch.cuda.synchronize(device)
        else:
            _, _, index, buffer, layout, _ = message
            tensors, _ = shared.take(index, buffer, layout)
        del tensors
        conn.send(True)


def full_weight_sync_ms(model, reps: int, transport: str, device: str) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, device), daemon=True)
    proc.start()
    state = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    sender = SharedAdapterSender(next(model.parameters()).device, buffers=1)
    times, size = [], 0
    for version in range(reps):
        start = time.perf_counter()
        if transport == "shared":
            message, size = sender.message(version, state, lambda v: None)  # the receiver acked the last one
            parent.send(message)
        else:
            payload = encode(state)
            parent.send(("bytes", payload))
            size = len(payload)
            del payload
        parent.recv()
        times.append((time.perf_counter() - start) * 1e3)
    parent.send(None)
    proc.join(timeout=30)
    return size, median(times)


def apply_parts_ms(model, adapter: dict[str, torch.Tensor], reps: int) -> dict[str, float]:
    """The engine's apply in isolation, current path against the per-tensor one it replaced (same
    process): the NaN/inf check and the slot write, each timed to a device synchronize."""
    from orbit_core.peft.base import adapter_modules
    from orbit_core.peft.slots import _check_finite, attach_slots, prepare, write_slot

    bank = attach_slots(model, 2)
    prepared = prepare(model, adapter)
    layers = dict(adapter_modules(model))

    def per_tensor_check():
        torch.stack([torch.isfinite(v).all() for v in adapter.values()]).cpu()

    def per_tensor_write():
        for name, tensors in prepared.items():
            for buffer, value in tensors.items():
                getattr(layers[name], buffer)[1].copy_(value)

    parts = {"check_foreach": lambda: _check_finite(adapter), "check_per_tensor": per_tensor_check,
             "write_foreach": lambda: write_slot(model, bank, 1, prepared, 1), "write_per_tensor": per_tensor_write}
    out = {}
    for name, fn in parts.items():
        fn()
        torch.cuda.synchronize()
        samples = []
        for _ in range(reps):
            start = time.perf_counter()
            fn()
            torch.cuda.synchronize()
            samples.append((time.perf_counter() - start) * 1e3)
        out[name] = round(median(samples), 3)
    return out


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peft", nargs="+", default=["lora", "oft"], choices=sorted(PEFTS))
    parser.add_argument("--transport", nargs="+", default=["pipe", "shared"], choices=["pipe", "shared"])
    parser.add_argument("--engine-device", default="cuda")
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="orbit-sync-bench-"))
    try:
        write_random_checkpoint(root / "bf16", SHAPES[args.shape], tokenizer=True)  # the engine process loads one
        path = str(root / "bf16")
        baselines = {}
        for method in args.peft:
            peft = PEFTS[method]
            policy = build_policy(ModelSection(path=path, dtype="bfloat16", device="cuda"), peft, log=lambda m: None)
            for transport in args.transport:
                if transport not in baselines:
                    baselines[transport] = full_weight_sync_ms(policy.model, max(2, args.reps // 2), transport,
                                                               args.engine_device)
            adapter = engine_adapter_state(policy.model)
            for transport, slots in [(t, s) for t in args.transport for s in (1, 2)]:
                baseline = baselines[transport]
                spec = EngineSpec(path, "bfloat16", args.engine_device, peft, slots, 64, 0, 4, encode(adapter), 0)
                engine = EngineProcess(spec)
                sender = SharedAdapterSender(policy.device, buffers=2)
                times, applies, size = [], [], 0
                try:
                    for version in range(1, args.reps + 1):
                        with torch.no_grad():
                            for p in adapter.values():
                                p.add_(torch.randn_like(p) * 1e-3)
                        start = time.perf_counter()
                        if transport == "shared":
                            size = engine.push_shared(version, adapter, sender)
                        else:
                            payload = encode(adapter)
                            engine.push(version, payload)
                            size = len(payload)
                        engine.wait_version(version)
                        times.append((time.perf_counter() - start) * 1e3)
                        applies.append(engine.synced[version]["apply_ms"])
                    assert not engine.failed, engine.failed
                finally:
                    engine.close()
                print(json.dumps({
                    "bench": "adapter_sync", "shape": args.shape, "peft": method, "engine_slots": slots,
                    "transport": transport, "trainer_device": str(policy.device), "engine_device": args.engine_device,
                    "adapter_bytes": size, "sync_ms_median": round(median(times), 2),
                    "engine_apply_ms_median": round(median(applies), 2),
                    "baseline": f"full-weight sync, same transport ({transport})", "full_weight_bytes": baseline[0],
                    "full_weight_sync_ms_median": round(baseline[1], 2),
                    "bytes_ratio": round(size / baseline[0], 4), "time_ratio": round(median(times) / baseline[1], 4),
                    "device": torch.cuda.get_device_name(),
                }), flush=True)
            print(json.dumps({"bench": "adapter_apply", "shape": args.shape, "peft": method, "tensors": len(adapter),
                              "adapter_bytes": sum(t.numel() * t.element_size() for t in adapter.values()),
                              **{f"{k}_ms": v for k, v in apply_parts_ms(policy.model, adapter, args.reps).items()},
                              "baseline": "per-tensor check and write (the previous engine apply), same process",
                              "device": torch.cuda.get_device_name()}), flush=True)
            del policy
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
