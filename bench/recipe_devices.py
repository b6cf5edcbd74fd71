"""An embedded recipe trained on the GPU and on the CPU of one machine, from the same cached base:
does the GPU path learn as the CPU path does? One JSON line per run.

Each run is ``orbit train --recipe R`` as a user types it, in its own process, all runs at once (the
tiny model leaves the GPU idle). The baseline is the CPU run of each base in the same invocation.
``--caches`` names one or more ``ORBIT_CACHE`` folders: a base built elsewhere (another CPU,
another torch) is a different model, so each run records its base's sha256.
    python -m bench.recipe_devices --caches ~/.cache/orbit --seeds 1234 7 --out bench/results/x.jsonl
    python -m bench.recipe_devices --recipes tiny-arith-int4-lora --variants gpu-bf16 cpu ...

The variants on the GPU: the library's settings (compiled training layers, CUDA-graph decode),
``train.compile=off``, both off (eager training forward and eager decode), and bf16 activations
(the recipes' float32 keeps the packed int4 kernels off: they take bf16 or fp16); bf16 with the
worst-token preflight gate at 0.1 (the int4 recipe's 0.01 is set for float32), and bf16 with
``rl.routing_replay`` (an MoE trainer routing as the engine did); the CPU runs the same two
in bf16, so that a GPU kernel's share of an engine-trainer gap shows against bf16 rounding alone.

``recipe_devices_bf16_gaps_h100.jsonl`` is this form's. The two files before it came from earlier
forms, without the routing and mean-gap fields; ``recipe_devices_h200.jsonl`` also before
``--recipes`` and the bf16 variant, so its lines hold ``pass_at_8_after`` where later ones hold
every k.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import torch

VARIANTS = {
    "gpu": [],
    "gpu-no-compile": ["train.compile=off"],
    "gpu-eager": ["train.compile=off", "rollout.cuda_graph=false"],
    "gpu-bf16": ["model.dtype=bfloat16"],
    "gpu-bf16-gate": ["model.dtype=bfloat16", "preflight.max_logprob_abs_diff=0.1"],
    "gpu-bf16-replay": ["model.dtype=bfloat16", "rl.routing_replay=true"],
    "cpu": ["model.device=cpu"],
    "cpu-bf16": ["model.device=cpu", "model.dtype=bfloat16"],
    "cpu-bf16-gate": ["model.device=cpu", "model.dtype=bfloat16", "preflight.max_logprob_abs_diff=0.1"],
    "cpu-bf16-replay": ["model.device=cpu", "model.dtype=bfloat16", "rl.routing_replay=true"],
}


def base_digest(cache: Path, recipe: str) -> str:
    """sha256 of the recipe's cached base, its safetensors in name order (built on first use when
    missing: once, before the runs share it)."""
    resolve = ("import sys; from orbit_core.config import load_recipe; from orbit_core.policy.embedded import "
               "resolve_model_path; m = load_recipe(sys.argv[1]).model; "
               "print(resolve_model_path(m.path, m.warmstart_steps, log=lambda _: None))")
    path = subprocess.run([sys.executable, "-c", resolve, recipe], env={**os.environ, "ORBIT_CACHE": str(cache)},
                          check=True, timeout=900, capture_output=True, text=True).stdout.strip().splitlines()[-1]
    digest = hashlib.sha256()
    for weights in sorted(Path(path).glob("*.safetensors")):
        digest.update(weights.read_bytes())
    return digest.hexdigest()


def summary(run_dir: Path) -> dict:
    report = json.loads((run_dir / "eval_report.json").read_text())
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    steps = [r for r in rows if "reward/mean" in r]
    rewards = [r["reward/mean"] for r in steps]
    return {
        "greedy_before": report["before"]["greedy_accuracy"],
        "greedy_after": report["after"]["greedy_accuracy"],
        "greedy_at_evals": [r["eval/greedy_accuracy"] for r in rows if "eval/greedy_accuracy" in r],
        "pass_at_k_after": report["after"]["pass_at_k"],
        "reward_mean_first5": sum(rewards[:5]) / 5,
        "reward_mean_last10": sum(rewards[-10:]) / 10,
        "engine_vs_trainer_logprob_abs_diff_max": max(r.get("rollout/behaviour_proximal_logprob_abs_diff_max", 0.0)
                                                      for r in steps),
        "engine_vs_trainer_logprob_abs_diff_mean_max": max(
            r.get("rollout/behaviour_proximal_logprob_abs_diff_mean", 0.0) for r in steps),
        "steps": len(steps),
        "routing_mismatch_fraction_max": max((r["moe/routing_mismatch_fraction"] for r in steps
                                              if "moe/routing_mismatch_fraction" in r), default=None),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--caches", nargs="+", required=True, help="ORBIT_CACHE folders, one base each")
    parser.add_argument("--recipes", nargs="+", default=["tiny-arith-lora"])
    parser.add_argument("--seeds", nargs="+", type=int, default=[1234, 7])
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument("--threads", type=int, default=3, help="OMP threads of a CPU run (GPU runs take 2)")
    parser.add_argument("--timeout", type=int, default=900)
    parser.add_argument("--out", required=True)
    args = parser.parse_args()
    variants = [v for v in args.variants if v.startswith("cpu") or torch.cuda.is_available()]
    device = torch.cuda.get_device_name() if torch.cuda.is_available() else None
    root = Path(tempfile.mkdtemp(prefix="recipe-devices-"))
    runs = []
    for cache, recipe in ((Path(c), r) for c in args.caches for r in args.recipes):
        digest = base_digest(cache, recipe)
        for variant in variants:
            for seed in args.seeds:
                name = f"{cache.name}-{recipe}-{variant}-{seed}"
                cmd = [sys.executable, "-m", "orbit_cli.main", "train", "--recipe", recipe,
                       f"train.output_dir={root / name}", f"train.seed={seed}", *VARIANTS[variant]]
                env = {**os.environ, "ORBIT_CACHE": str(cache),
                       "OMP_NUM_THREADS": str(args.threads if variant.startswith("cpu") else 2)}
                with open(root / f"{name}.log", "w") as log:  # the child keeps its own descriptor
                    proc = subprocess.Popen(cmd, env=env, stdout=log, stderr=subprocess.STDOUT)
                runs.append((dict(recipe=recipe, cache=str(cache), base_sha256=digest[:16], variant=variant, seed=seed), name,
                             proc, time.monotonic()))
    with open(args.out, "a") as out:
        for meta, name, proc, start in runs:
            try:
                rc = proc.wait(timeout=max(1, args.timeout - (time.monotonic() - start)))
            except subprocess.TimeoutExpired:
                proc.kill()
                rc = "timeout"
            row = {"bench": "recipe_devices", **meta, "rc": rc,
                   "wall_s_concurrent": round(time.monotonic() - start, 1),
                   "device": f"CPU, {args.threads} threads" if meta["variant"].startswith("cpu") else device,
                   "torch": torch.__version__}
            if rc == 0:
                row.update(summary(root / name))
            else:
                row["log_tail"] = (root / f"{name}.log").read_text()[-1500:]
            print(json.dumps(row), flush=True)
            out.write(json.dumps(row) + "\n")


if __name__ == "__main__":
    main()
