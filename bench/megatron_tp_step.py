"""Megatron trainer step time by tensor- or expert-parallel size, one JSON line per size.

Each size runs in its own process (rank 0 creates the process group and starts the other ranks),
on the same random checkpoint and the same synthetic batch: ``--samples`` sequences of
``--prompt-len`` + ``--new`` tokens with random advantages, LoRA r16 on every linear. A step is
``score`` (the old-logprob recompute) plus one ``update``. TP=1 is the baseline, in the same run;
the first step's logprobs (untrained adapter) of every size are compared with the first size's.
    python -m bench.megatron_tp_step --shape tiny --tp 1 2
    python -m bench.megatron_tp_step --shape qwen3-1.7b --tp 1 2 --dtype bfloat16
    python -m bench.megatron_tp_step --shape qwen3-30b-a3b --layers 8 --tp 1 --ep 2 --dtype bfloat16

MoE shapes (``bench/packed_random.py``'s Qwen3-MoE ones) are written as random bf16 checkpoints,
``--layers`` of them; their LoRA is all-linear, which on an MoE means attention only.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch


def _batch(vocab: int, samples: int, prompt_len: int, new: int):
    from orbit_core.rollout.types import Completion
    from orbit_core.train.batch import build_batch

    gen = torch.Generator().manual_seed(0)
    completions = [Completion(i, 0, torch.randint(3, vocab, (prompt_len,), generator=gen).tolist(),
                              torch.randint(3, vocab, (new,), generator=gen).tolist(), [-1.0] * new, "", "length")
                   for i in range(samples)]
    batch = build_batch(completions, torch.randn(samples, generator=gen), 0)
    batch.advantages = torch.randn(samples, generator=gen)[:, None].expand_as(batch.response_mask).contiguous()
    batch.advantages = batch.advantages * batch.response_mask
    return batch


def moe_path(shape: str, layers: int, root: Path) -> str:
    """A random bf16 Qwen3-MoE checkpoint of ``shape`` with ``layers`` layers."""
    from bench.base_memory import write_random_checkpoint
    from bench.packed_random import BIG_SHAPES

    path = root / "moe-bf16"
    write_random_checkpoint(path, {**BIG_SHAPES[shape], **({"num_hidden_layers": layers} if layers else {})},
                            tokenizer=True)
    return str(path)


def worker(args) -> None:
    from orbit_core.config.loader import build_config
    from orbit_core.policy.build import build_policy
    from orbit_core.train.megatron_backend import MegatronTrainer

    device = "cuda" if torch.cuda.is_available() else "cpu"
    raw = {"model": {"path": args.path, "dtype": args.dtype, "device": device, "warmstart_steps": 0},
           "rollout": {"batch_size": args.samples // 2, "n_samples_per_prompt": 2, "max_new_tokens": args.new},
           "peft": {"rank": 16, "alpha": 32, "dropout": 0.0, "target_modules": ["all-linear"]},
           "train": {"backend": "megatron", "tensor_parallel": args.tp, "expert_parallel": args.ep,
                     "global_batch_size": args.samples,
                     "micro_batch_size": args.micro, "output_dir": args.out_dir, "wandb": "false"},
           "eval": {"enabled": False}}
    config = build_config(raw)
    torch.manual_seed(0)  # the same adapter init at every size, so loss and gradient norm can be compared
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    trainer = MegatronTrainer(policy, config)
    batch = _batch(policy.model.config.vocab_size, args.samples, args.prompt_len, args.new)
    try:
        times = []
        for step in range(args.warmup + args.steps):
            if device == "cuda":
                torch.cuda.synchronize()
            start = time.perf_counter()
            batch.old_logprobs = trainer.score(batch)[0]
            if step == 0:  # the untrained adapter's logprobs, compared across sizes by the parent
                Path(args.out_dir).mkdir(parents=True, exist_ok=True)
                torch.save({"logprobs": batch.old_logprobs.float().cpu(), "mask": batch.response_mask.cpu() > 0},
                           Path(args.out_dir) / "score_logprobs.pt")
            stats = trainer.update(batch)
            if device == "cuda":
                torch.cuda.synchronize()
            if step >= args.warmup:
                times.append(time.perf_counter() - start)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else None
        print(json.dumps({"step_s": mean(times), "loss": stats["loss"], "grad_norm": stats["grad_norm"],
                          "rank0_peak_gib": peak}), flush=True)
    finally:
        trainer.close()


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="tiny", choices=["tiny", "qwen3-0.6b", "qwen3-1.7b", "qwen3-30b-a3b"])
    parser.add_argument("--layers", type=int, default=0, help="MoE shapes: this many layers (0: all)")
    parser.add_argument("--tp", nargs="+", type=int, default=[1, 2])
    parser.add_argument("--ep", nargs="*", type=int, default=[], help="expert-parallel sizes, after the --tp ones")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--micro", type=int, default=16)
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--worker", action="store_true")
    parser.add_argument("--path", default="")
    parser.add_argument("--out-dir", default="")
    args = parser.parse_args()
    if args.worker:
        args.tp, args.ep = args.tp[0], args.ep[0]
        return worker(args)
    from bench.ray_engines import model_path

    root = Path(tempfile.mkdtemp(prefix="orbit-tp-bench-"))
    path = moe_path(args.shape, args.layers, root) if args.shape == "qwen3-30b-a3b" else model_path(args.shape)
    baseline = reference = None
    for tp, ep in [(tp, 1) for tp in args.tp] + [(1, ep) for ep in args.ep]:
        name = f"tp{tp}ep{ep}"
        command = [sys.executable, "-m", "bench.megatron_tp_step", "--worker", "--tp", str(tp), "--ep", str(ep), "--path", path,
                   "--out-dir", str(root / name), "--dtype", args.dtype, "--samples", str(args.samples),
                   "--micro", str(args.micro), "--prompt-len", str(args.prompt_len), "--new", str(args.new),
                   "--steps", str(args.steps), "--warmup", str(args.warmup)]
        done = subprocess.run(command, capture_output=True, text=True, timeout=1800)
        if done.returncode != 0:
            raise SystemExit(f"TP={tp} EP={ep} failed:\n{done.stderr[-3000:]}")
        result = json.loads(done.stdout.strip().splitlines()[-1])
        baseline = baseline or result["step_s"]
        scored = torch.load(root / name / "score_logprobs.pt")
        reference = reference if reference is not None else scored["logprobs"]
        diff = (scored["logprobs"] - reference).abs()[scored["mask"]]
        result["max_abs_logprob_diff_vs_first"] = float(diff.max()) if diff.numel() else 0.0
        result["mean_abs_logprob_diff_vs_first"] = float(diff.mean()) if diff.numel() else 0.0
        print(json.dumps({"bench": "megatron_tp_step", "shape": args.shape, "layers": args.layers or None,
                          "dtype": args.dtype, "tensor_parallel": tp, "expert_parallel": ep,
                          "samples": args.samples, "tokens_per_sample": args.prompt_len + args.new,
                          "micro_batch": args.micro, **{k: float(f"{v:.4g}") if isinstance(v, float) else v
                                                        for k, v in result.items()},
                          "baseline": f"the first size (TP={args.tp[0]}, EP=1), same run", "baseline_step_s": round(baseline, 4),
                          "speedup_vs_baseline": round(baseline / result["step_s"], 3),
                          "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "CPU",
                          "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
