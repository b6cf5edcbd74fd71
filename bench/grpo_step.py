"""One whole GRPO step, Orbit against TRL's ``GRPOTrainer`` + peft on the same work, in one process.

Random weights in the given shape (bf16), Orbit's character tokenizer, 16 prompts x 8 samples,
64-token prompts and up to 128 new tokens, LoRA r16 (alpha 32) on every linear layer, micro-batch 16,
one optimizer step per batch, random rewards, no KL term. Orbit runs its real loop
(``run_training``, colocated sync) on the bf16 base and on the int4 base quantized from it; TRL
(the baseline) runs on the bf16 weights with transformers ``generate``. The first ``--warmup`` steps
of each run are left out. Peak memory is ``torch.cuda.max_memory_allocated`` over the whole run.
Orbit runs keep ``rollout.keep_cache=auto`` (the engine keeps its KV cache through training once a
training phase has shown room for it) unless the run name ends in ``-release``.
    python -m bench.grpo_step --steps 4
One JSON line per run.
"""

from __future__ import annotations

import argparse
import gc
import json
import random
import tempfile
import time
from pathlib import Path
from statistics import mean

import torch

from bench.base_memory import save_char_tokenizer, write_random_checkpoint
from bench.packed_random import BIG_SHAPES, write_packed_random
from bench.rollout_throughput import SHAPES

PROMPTS, SAMPLES, PROMPT_LEN, NEW, MICRO = 16, 8, 64, 128, 16


def random_reward(prompt: str, response: str, label: str) -> float:
    return random.random()


def write_prompts(path: Path, count: int) -> Path:
    from orbit_core.data.arith import ALPHABET

    rng = random.Random(0)
    letters = [c for c in ALPHABET if c.isdigit()]
    rows = ["".join(rng.choice(letters) for _ in range(PROMPT_LEN)) for _ in range(count)]
    path.write_text("".join(json.dumps({"prompt": r, "label": "0"}) + "\n" for r in rows))
    return path


def orbit_run(name: str, model_path: str, data: Path, out: Path, steps: int, warmup: int, extra: dict,
              keep_cache: str = "auto") -> dict:
    from orbit_core.config.loader import build_config
    from orbit_core.train import Callbacks, backends, run_training

    raw = {
        "model": {"path": model_path, "dtype": "bfloat16", "device": "cuda"},
        "data": {"train_path": str(data), "max_prompt_len": PROMPT_LEN, "apply_chat_template": "false"},
        "rollout": {"batch_size": PROMPTS, "n_samples_per_prompt": SAMPLES, "max_new_tokens": NEW, "max_running": 256,
                    "keep_cache": keep_cache},
        "rl": {"reward": "bench.grpo_step:random_reward", "reward_workers": 0},
        "peft": {"rank": 16, "alpha": 32, "target_modules": ["all-linear"]},
        "train": {"steps": steps, "global_batch_size": PROMPTS * SAMPLES, "micro_batch_size": MICRO, "lr": 1e-5,
                  "output_dir": str(out / name), "save_interval": 0, "wandb": "false", **extra},
        "eval": {"enabled": False},
    }
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    made = []
    factory = backends.ROLLOUT_BACKENDS["builtin"]
    backends.ROLLOUT_BACKENDS["builtin"] = lambda *a, **k: made.append(factory(*a, **k)) or made[-1]
    start = time.perf_counter()
    try:
        result = run_training(build_config(raw), Callbacks(on_message=lambda m: None))
    finally:
        backends.ROLLOUT_BACKENDS["builtin"] = factory
    wall = time.perf_counter() - start
    rows = [r for r in result.metrics if "time/step_s" in r][warmup:]
    moe = {"experts_dequantized_per_step": mean(r["moe/experts_dequantized"] for r in rows)} \
        if "moe/experts_dequantized" in rows[0] else {}
    return {**moe, "step_s": mean(r["time/step_s"] for r in rows), "rollout_s": mean(r["time/rollout_s"] for r in rows),
            "train_s": mean(r["time/train_s"] for r in rows), "reward_s": mean(r["time/reward_s"] for r in rows),
            "response_len_mean": mean(r["response_len/mean"] for r in rows),
            "peak_gib": torch.cuda.max_memory_allocated() / 2**30, "wall_s": wall,
            "keep_cache": keep_cache, "cache_kept_at_end": made[-1].keep}


def trl_run(model_path: str, data: Path, out: Path, steps: int, warmup: int) -> dict:
    import datasets
    from datasets.fingerprint import Hasher
    from peft import LoraConfig
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import GRPOConfig, GRPOTrainer

    # datasets cannot hash pyarrow 26's types with dill; fingerprints only name cache files
    Hasher.hash = classmethod(lambda cls, value: f"{random.getrandbits(64):016x}")
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    dataset = datasets.Dataset.from_list([{"prompt": r["prompt"]} for r in rows])
    tokenizer = AutoTokenizer.from_pretrained(model_path)
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.bfloat16).cuda()
    args = GRPOConfig(output_dir=str(out / "trl"), per_device_train_batch_size=MICRO,
                      gradient_accumulation_steps=PROMPTS * SAMPLES // MICRO, num_generations=SAMPLES,
                      max_completion_length=NEW, learning_rate=1e-5, beta=0.0, bf16=True, logging_steps=1,
                      max_steps=steps, report_to=[], save_strategy="no", temperature=1.0, top_p=1.0, top_k=0,
                      use_vllm=False, gradient_checkpointing=False, seed=0, dataloader_num_workers=0)
    times: list[float] = []
    lengths: list[float] = []

    class StepTimer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kw):
            torch.cuda.synchronize()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kw):
            torch.cuda.synchronize()
            times.append(time.perf_counter() - self.start)

        def on_log(self, args, state, control, logs=None, **kw):
            if logs and "completions/mean_length" in logs:
                lengths.append(logs["completions/mean_length"])

    trainer = GRPOTrainer(model=model, reward_funcs=[lambda completions, **kw: [random.random() for _ in completions]],
                          args=args, train_dataset=dataset, processing_class=tokenizer,
                          peft_config=LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM"),
                          callbacks=[StepTimer()])
    generate_s: list[float] = []
    inner = trainer._generate

    def timed_generate(*a, **k):
        torch.cuda.synchronize()
        start = time.perf_counter()
        out = inner(*a, **k)
        torch.cuda.synchronize()
        generate_s.append(time.perf_counter() - start)
        return out

    trainer._generate = timed_generate
    start = time.perf_counter()
    trainer.train()
    wall = time.perf_counter() - start
    peak = torch.cuda.max_memory_allocated() / 2**30
    del trainer, model
    return {"step_s": mean(times[warmup:]), "rollout_s": mean(generate_s[warmup:]),
            "response_len_mean": mean(lengths[warmup:]) if lengths else None, "peak_gib": peak, "wall_s": wall}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES) + sorted(BIG_SHAPES),
                        help="a BIG_SHAPES model is written directly in packed int4 (orbit int4 runs only)")
    parser.add_argument("--steps", type=int, default=4)
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--runs", nargs="+", default=["orbit-bf16", "orbit-int4", "orbit-int4-ac", "trl"],
                        help="orbit-BASE[-ac][-release]: -ac checkpoints activations, -release sets "
                             "rollout.keep_cache=false (the engine gives its cache back every step)")
    args = parser.parse_args()
    from orbit_core.quant import quantize_checkpoint

    root = Path(tempfile.mkdtemp(prefix="orbit-grpo-bench-"))
    paths = {}
    if args.shape in BIG_SHAPES:
        if any("int4" not in r for r in args.runs):
            parser.error(f"{args.shape} is written in packed int4 only: use --runs orbit-int4 and/or orbit-int4-ac")
        start = time.perf_counter()
        paths["int4"] = str(write_packed_random(root / "int4", BIG_SHAPES[args.shape]))
        print(json.dumps({"bench": "grpo_step", "shape": args.shape, "packed_checkpoint_write_s":
                          round(time.perf_counter() - start, 1)}), flush=True)
    else:
        write_random_checkpoint(root / "bf16", SHAPES[args.shape], tokenizer=True)
        paths["bf16"] = str(root / "bf16")
    if "int4" not in paths and any("int4" in r for r in args.runs):
        quantize_checkpoint(paths["bf16"], str(root / "int4"), "int4", group_size=128, device="cuda")
        save_char_tokenizer(root / "int4")
        paths["int4"] = str(root / "int4")
    data = write_prompts(root / "prompts.jsonl", PROMPTS * (args.steps + 2))
    for run in args.runs:
        if run == "trl":
            numbers = trl_run(paths["bf16"], data, root, args.steps, args.warmup)
            impl, base, extra = "trl GRPOTrainer + peft (transformers generate)", "bf16", {}
        else:
            base = run.split("-")[1]
            extra = {"activation_checkpointing": "full"} if "-ac" in run else {}
            keep = "false" if run.endswith("-release") else "auto"
            numbers = orbit_run(run, paths[base], data, root, args.steps, args.warmup, extra, keep)
            impl = "orbit (run_training, colocated sync, builtin engine)"
        print(json.dumps({"bench": "grpo_step", "run": run, "impl": impl, "base": base, "shape": args.shape,
                          "prompts": PROMPTS, "samples": SAMPLES, "prompt_len": PROMPT_LEN, "max_new_tokens": NEW,
                          "micro_batch": MICRO, "lora_rank": 16, "steps_measured": args.steps - args.warmup,
                          **{k: (round(v, 3) if isinstance(v, float) else v) for k, v in numbers.items()}, **extra,
                          "device": torch.cuda.get_device_name(), "torch": torch.__version__}), flush=True)
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
