"""Adapter-only sync vs full-weight sync for a real model shape, one JSON line per measurement.

Writes a random bf16 checkpoint of ``--shape``, loads it with the adapter on the GPU, starts a
real engine process on the same GPU and times a sync end to end: serialize the adapter, pipe
it, validate it, (OFT) solve the rotations, write the slot, until the engine acknowledges.
Baseline, same run and same transport: the full base weights serialized, piped to a receiver
process, decoded and copied onto the GPU (what a full-weight RL system moves every step).
    python -m bench.adapter_sync --shape qwen3-1.7b
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
from orbit_core.rollout.worker import EngineSpec
from orbit_core.policy.build import build_policy

PEFTS = {"lora": PeftSection(method="lora", rank=16, alpha=32), "oft": PeftSection(method="oft", oft_block_size=32)}


def receiver(conn, device: str) -> None:
    while True:
        payload = conn.recv_bytes()
        if not payload:
            return
        tensors = {k: v.to(device, non_blocking=True) for k, v in decode(payload).items()}
        torch.cuda.synchronize()
        del tensors
        conn.send(True)


def full_weight_sync_ms(model, reps: int) -> tuple[int, float]:
    ctx = mp.get_context("spawn")
    parent, child = ctx.Pipe()
    proc = ctx.Process(target=receiver, args=(child, "cuda"), daemon=True)
    proc.start()
    state = {n: p for n, p in model.named_parameters() if not p.requires_grad}
    times, size = [], 0
    for _ in range(reps):
        start = time.perf_counter()
        payload = encode(state)
        parent.send_bytes(payload)
        parent.recv()
        times.append((time.perf_counter() - start) * 1e3)
        size = len(payload)
        del payload
    parent.send_bytes(b"")
    proc.join(timeout=30)
    return size, median(times)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--peft", nargs="+", default=["lora", "oft"], choices=sorted(PEFTS))
    args = parser.parse_args()
    root = Path(tempfile.mkdtemp(prefix="orbit-sync-bench-"))
    try:
        write_random_checkpoint(root / "bf16", SHAPES[args.shape])
        path = str(root / "bf16")
        baseline = None
        for method in args.peft:
            peft = PEFTS[method]
            policy = build_policy(ModelSection(path=path, dtype="bfloat16", device="cuda"), peft, log=lambda m: None)
            if baseline is None:
                baseline = full_weight_sync_ms(policy.model, max(2, args.reps // 2))
            adapter = engine_adapter_state(policy.model)
            for slots in (1, 2):
                spec = EngineSpec(path, "bfloat16", "cuda", peft, slots, 64, 0, 4, encode(adapter), 0)
                engine = EngineProcess(spec)
                times, applies, size = [], [], 0
                try:
                    for version in range(1, args.reps + 1):
                        with torch.no_grad():
                            for p in adapter.values():
                                p.add_(torch.randn_like(p) * 1e-3)
                        start = time.perf_counter()
                        payload = encode(adapter)
                        engine.push(version, payload)
                        engine.wait_version(version)
                        times.append((time.perf_counter() - start) * 1e3)
                        applies.append(engine.synced[version]["apply_ms"])
                        size = len(payload)
                finally:
                    engine.close()
                print(json.dumps({
                    "bench": "adapter_sync", "shape": args.shape, "peft": method, "engine_slots": slots,
                    "adapter_bytes": size, "sync_ms_median": round(median(times), 1),
                    "engine_apply_ms_median": round(median(applies), 1),
                    "baseline": "full-weight sync, same pipe", "full_weight_bytes": baseline[0],
                    "full_weight_sync_ms_median": round(baseline[1], 1),
                    "bytes_ratio": round(size / baseline[0], 4), "time_ratio": round(median(times) / baseline[1], 4),
                    "device": torch.cuda.get_device_name(),
                }), flush=True)
            del policy
            torch.cuda.empty_cache()
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
