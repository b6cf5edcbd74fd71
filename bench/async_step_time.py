"""Step time of async vs sync adapter RL on the same recipe, one JSON line per configuration.

Baseline: ``sync-colocated`` (the default placement) with the first ``--reward-workers`` value,
measured in the same run on the same machine. ``--reward-workers 0 -1`` compares scoring on threads
in the scoring process (0, how Orbit scored before the reward pool) with one worker process per
core (-1, the default). Every configuration runs the same recipe for ``--steps`` steps with eval off; the first
``--warmup`` steps (engine start, allocator warm-up) are left out of the means.
    python -m bench.async_step_time --steps 14
    python -m bench.async_step_time --shape qwen3-1.7b --peft lora --configs sync-colocated async --steps 6 --warmup 2

``--shape`` swaps the embedded model for random weights of that shape (bf16, GPU) at the work of
``bench/grpo_step.py``: 16 prompts x 8 samples, 64 + 128 tokens, LoRA r16 on every linear, random
rewards (so every group carries signal and every update moves the adapter).

LoRA runs the embedded default recipe; OFT runs the GRPO+OFT recipe at the async OFT recipe's
learning rate (5e-4), so sync and async train the same adapter at the same settings.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import tempfile
from pathlib import Path
from statistics import mean

import torch

from orbit_core.config import load_recipe
from orbit_core.train import Callbacks, run_training

CONFIGS = {
    "sync-colocated": [],
    "sync-non-colocated": ["rollout.placement=non-colocated"],
    "async": ["train.mode=async", "rollout.placement=non-colocated"],
    "async-double-buffer": ["train.mode=async", "rollout.placement=non-colocated", "rollout.adapter_double_buffer=true"],
}
PEFT = {
    "lora": ("tiny-arith-lora", []),
    "oft": ("tiny-arith-grpo-oft", ["train.lr=5e-4", "train.min_lr=1e-4"]),
}


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"{platform.processor() or platform.machine()} x{os.cpu_count()} cores (CPU)"


def shape_work(shape: str, root: Path) -> list[str]:
    from bench.base_memory import write_random_checkpoint
    from bench.grpo_step import MICRO, NEW, PROMPT_LEN, PROMPTS, SAMPLES, write_prompts
    from bench.rollout_throughput import SHAPES

    write_random_checkpoint(root / shape, SHAPES[shape], tokenizer=True)
    data = write_prompts(root / "prompts.jsonl", PROMPTS * 64)
    return [f"model.path={root / shape}", "model.dtype=bfloat16", "model.warmstart_steps=0",
            f"data.train_path={data}", f"data.max_prompt_len={PROMPT_LEN}", "data.apply_chat_template=false",
            "rl.reward=bench.grpo_step:random_reward", f"rollout.batch_size={PROMPTS}",
            f"rollout.n_samples_per_prompt={SAMPLES}", f"rollout.max_new_tokens={NEW}", "rollout.max_running=256",
            f"train.global_batch_size={PROMPTS * SAMPLES}", f"train.micro_batch_size={MICRO}", "train.lr=1e-5",
            "train.min_lr=1e-6"]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--recipe", default=None, help="one recipe for every --peft (default: per method, see PEFT)")
    parser.add_argument("--steps", type=int, default=14)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--peft", nargs="+", default=["lora", "oft"], choices=sorted(PEFT))
    parser.add_argument("--configs", nargs="+", default=list(CONFIGS), choices=list(CONFIGS))
    parser.add_argument("--reward-workers", nargs="+", type=int, default=[-1],
                        help="rl.reward_workers values to compare (0 = threads, -1 = a process per core)")
    parser.add_argument("--shape", default=None, help="random weights of this shape (bench/rollout_throughput.py)")
    parser.add_argument("overrides", nargs="*", help="extra section.field=value overrides for every run")
    args = parser.parse_args()
    root = tempfile.mkdtemp(prefix="orbit-async-bench-")
    shape_overrides = shape_work(args.shape, Path(root)) if args.shape else []
    for method in args.peft:
        recipe, peft_overrides = PEFT[method]
        recipe = args.recipe or recipe
        baseline = None
        for workers, name in [(w, n) for w in args.reward_workers for n in args.configs]:
            overrides = [f"train.steps={args.steps}", "eval.enabled=false", "train.resume=never", "train.save_interval=0",
                         "train.wandb=false", f"train.output_dir={root}/{method}-{name}-w{workers}", *peft_overrides,
                         *CONFIGS[name], f"rl.reward_workers={workers}", *shape_overrides, *args.overrides]
            config = load_recipe(recipe, overrides)
            result = run_training(config, Callbacks(on_message=lambda m: None))
            rows = result.metrics[args.warmup:]

            def avg(key: str) -> float:
                return mean(r.get(key, 0.0) for r in rows)

            step_s = avg("time/step_s")
            baseline = baseline or step_s
            print(json.dumps({
                "bench": "async_step_time", "recipe": recipe, "shape": args.shape or "embedded", "peft": method, "config": name, "reward_workers": workers,
                "step_s": round(step_s, 4), "baseline": f"sync-colocated, reward_workers={args.reward_workers[0]}",
                "baseline_step_s": round(baseline, 4),
                "speedup_vs_baseline": round(baseline / step_s, 3),
                "rollout_s": round(avg("time/rollout_s"), 4), "train_s": round(avg("time/train_s"), 4),
                "reward_s": round(avg("time/reward_s"), 4), "sync_s": round(avg("time/sync_s"), 4),
                "idle_s": round(avg("time/idle_s"), 4), "bubble_fraction": round(avg("time/bubble_fraction"), 3),
                "sync_bytes": int(avg("sync/bytes")), "full_weight_bytes": int(avg("sync/full_weight_bytes")),
                "sync_ms": round(avg("sync/ms"), 2), "engine_apply_ms": round(avg("sync/engine_apply_ms"), 2),
                "staleness_max": max(r["staleness/max"] for r in rows), "staleness_mean": round(avg("staleness/mean"), 3),
                "reward_last_steps": round(avg("reward/mean"), 3), "reward_errors": int(sum(r["reward/errors"] for r in rows)),
                "steps_measured": len(rows),
                "device": device_name(), "torch": torch.__version__,
            }), flush=True)


if __name__ == "__main__":
    main()
