"""One adapter training step (forward, token logprobs, backward, AdamW): tokens/s and peak memory.

Orbit's ``TorchTrainer.update`` on bf16, int4, fp8 and nvfp4 bases, with and without activation
checkpointing, against transformers + peft on the same bf16 weights in the same process (the
baseline, with and without gradient checkpointing). LoRA r32 (alpha 64) on every linear layer,
8 sequences x 1024 tokens, one micro-batch, a GRPO-style clipped loss on every token.
    python -m bench.train_step --shape qwen3-1.7b
One JSON line per configuration.
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
import time
from pathlib import Path

import torch
from torch._dynamo.utils import counters

from bench.base_memory import write_random_checkpoint
from bench.rollout_throughput import SHAPES
from orbit_core.config.loader import build_config
from orbit_core.peft.lora import apply_lora
from orbit_core.policy import load_base
from orbit_core.quant import quantize_checkpoint
from orbit_core.train.batch import RolloutBatch
from orbit_core.train.torch_backend import TorchTrainer
from orbit_kernels import int4 as int4_kernels

RANK, ALPHA = 32, 64


def timed(step, warmup: int, repeats: int) -> tuple[float, float, float, dict | None]:
    """(mean seconds per step after warm-up, peak GiB allocated during the measured steps, seconds
    of the first step: compilation and autotuning included, the first step's statistics)."""
    start = time.perf_counter()
    first_stats = step()
    torch.cuda.synchronize()
    first = time.perf_counter() - start
    for _ in range(warmup - 1):
        step()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(repeats):
        step()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / repeats, torch.cuda.max_memory_allocated() / 2**30, first, first_stats


def orbit_step(path: str, ids: torch.Tensor, checkpointing: str, compile_layers: str = "auto"):
    model = load_base(path, "bfloat16", "cuda")
    apply_lora(model, RANK, ALPHA, 0.0, ["all-linear"])
    rows = ids.shape[0]
    config = build_config({"train": {"global_batch_size": rows, "micro_batch_size": rows, "lr": 1e-5,
                                     "activation_checkpointing": checkpointing, "compile": compile_layers},
                           "rollout": {"batch_size": 1, "n_samples_per_prompt": rows, "max_new_tokens": ids.shape[1]}})
    trainer = TorchTrainer(model, config)
    mask = torch.ones(rows, ids.shape[1] - 1)
    batch = RolloutBatch(ids, mask, torch.zeros_like(mask), torch.zeros(rows), advantages=torch.linspace(-1, 1, rows))
    batch.old_logprobs = trainer.score(batch)[0]
    return (lambda: trainer.update(batch)), model


def peft_step(path: str, ids: torch.Tensor, checkpointing: bool):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).cuda()
    if checkpointing:
        hf.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        hf.enable_input_require_grads()
    model = get_peft_model(hf, LoraConfig(r=RANK, lora_alpha=ALPHA, target_modules="all-linear"))
    model.train()  # transformers only recomputes activations in training mode
    params = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(params, lr=1e-5, fused=True)
    inputs, targets = ids[:, :-1].cuda(), ids[:, 1:].cuda()
    advantages = torch.linspace(-1, 1, ids.shape[0], device="cuda")[:, None]

    def step() -> None:
        logits = model(input_ids=inputs).logits
        logprobs = torch.log_softmax(logits.float(), -1).gather(-1, targets[..., None])[..., 0]
        loss = -(torch.exp(logprobs - logprobs.detach()) * advantages).mean()
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    return step, model


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--rows", type=int, default=8)
    parser.add_argument("--tokens", type=int, default=1024)
    parser.add_argument("--bases", nargs="+", default=["bf16", "int4", "fp8", "nvfp4"])
    parser.add_argument("--warmup", type=int, default=5,
                        help="steps before timing; on an H100 two left the first compiled configuration 1.5x slow "
                             "(train_step_int4_warmup2_h100.jsonl against ..._warmup5_h100.jsonl)")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--kernels", choices=["on", "both"], default="on",
                        help="both: also run the int4 base with the Triton kernels off (the torch reference)")
    parser.add_argument("--compile", choices=["on", "both"], default="both",
                        help="both: also run Orbit's layers eagerly (train.compile=off)")
    parser.add_argument("--profile", default="", help="BASE:CHECKPOINTING: print the top CUDA ops of that Orbit step")
    args = parser.parse_args()
    # one process compiles every base and checkpointing mode below; a training run compiles one
    torch._dynamo.config.recompile_limit = 64
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", SHAPES[args.shape])
    paths = {"bf16": str(root / "bf16")}
    for fmt in args.bases:
        if fmt != "bf16":
            quantize_checkpoint(paths["bf16"], str(root / fmt), fmt, group_size=128, device="cuda")
            paths[fmt] = str(root / fmt)
    torch.manual_seed(0)
    ids = torch.randint(0, SHAPES[args.shape]["vocab_size"], (args.rows, args.tokens + 1))
    if args.profile:
        base, ac, compiled = (args.profile.split(":") + ["on"])[:3]
        step, _ = orbit_step(paths[base], ids, ac, compiled)
        timed(step, args.warmup, 1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
            step()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="cuda_time_total", row_limit=15, max_name_column_width=60))
        return
    runs = [("peft", "bf16", ac, True, "-") for ac in ("none", "full")]
    runs += [("orbit", b, ac, kernels, compiled) for b in args.bases for ac in ("none", "full")
             for kernels in ((True, False) if b == "int4" and args.kernels == "both" else (True,))
             for compiled in (("on", "off") if args.compile == "both" else ("on",))]
    baseline: dict[str, float] = {}
    for system, base, ac, kernels, compiled in runs:
        int4_kernels.ENABLED = kernels
        if system == "peft":
            step, model = peft_step(paths["bf16"], ids, ac == "full")
        else:
            step, model = orbit_step(paths[base], ids, ac, compiled)
        graphs_before, breaks_before = counters["stats"]["unique_graphs"], sum(counters["graph_break"].values())
        seconds, peak, first, stats = timed(step, args.warmup, args.repeats)
        tokens_per_s = args.rows * args.tokens / seconds
        if system == "peft":
            baseline[ac] = (tokens_per_s, peak)
        ref_tps, ref_peak = baseline[ac]
        print(json.dumps({
            "bench": "train_step", "shape": args.shape, "system": system, "base": base, "activation_checkpointing": ac,
            "kernels": "triton" if kernels and base == "int4" else "torch reference", "compile": compiled,
            "first_step_s": round(first, 2), "first_step_loss": stats and round(stats["loss"], 6),
            "compiled_graphs": counters["stats"]["unique_graphs"] - graphs_before,
            "graph_breaks": sum(counters["graph_break"].values()) - breaks_before,
            "rows": args.rows, "tokens_per_row": args.tokens, "lora_rank": RANK, "step_s": round(seconds, 4),
            "tokens_per_s": round(tokens_per_s, 1), "peak_gib": round(peak, 2),
            "baseline": f"peft bf16, checkpointing {ac}", "speed_vs_baseline": round(tokens_per_s / ref_tps, 3),
            "memory_vs_baseline": round(peak / ref_peak, 3), "device": torch.cuda.get_device_name(),
            "torch": torch.__version__,
        }), flush=True)
        del step, model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
