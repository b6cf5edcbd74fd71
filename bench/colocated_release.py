"""The colocated engine between training phases: release the KV cache (and with it the captured
graphs) or keep both. One JSON line per (base, mode): seconds of each generate of the GRPO bench's
rollout (128 rows: 16 prompts x 8 samples, 64-token prompts, 128 new tokens, EOS off), the GPU
memory the kept cache and graphs hold, and, for ``release``, what the recapture costs. Random
weights in the Qwen3-1.7B shape, LoRA r16 on every linear. The baseline is the same engine in the
same process with ``release`` between generates (the colocated loop's behaviour before this bench).
    python -m bench.colocated_release [--bases bf16 int4] [--repeats 3]
"""

from __future__ import annotations

import argparse
import gc
import json
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.decode_throughput import build_model
from bench.rollout_throughput import SHAPES, NoEosTokenizer, timed
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams

ROWS, PROMPT_LEN, NEW = 128, 64, 128


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bases", nargs="+", default=["bf16", "int4"])
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    shape = SHAPES["qwen3-1.7b"]
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    paths = {"bf16": str(root / "bf16")}
    if "int4" in args.bases:
        quantize_checkpoint(paths["bf16"], str(root / "int4"), "int4", group_size=128, device="cuda")
        paths["int4"] = str(root / "int4")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, shape["vocab_size"], (ROWS, PROMPT_LEN), generator=gen).tolist()
    params = SamplingParams(max_new_tokens=NEW, temperature=1.0)
    for base in args.bases:
        model = build_model(paths[base], "lora")
        engine = BuiltinEngine(model, NoEosTokenizer(), max_running=256, seed=0)
        run = lambda: engine.generate(prompts, params)  # noqa: E731
        run()
        run()
        held = torch.cuda.memory_allocated()
        engine.release()
        freed = held - torch.cuda.memory_allocated()
        released = [timed(lambda: (engine.release(), run())) for _ in range(args.repeats)]
        kept = [timed(run) for _ in range(args.repeats)]
        for mode, times in (("release (baseline)", released), ("keep", kept)):
            print(json.dumps({"bench": "colocated_release", "base": base, "adapter": "lora r16", "mode": mode,
                              "rows": ROWS, "prompt_len": PROMPT_LEN, "new_tokens": NEW,
                              "generate_s": [round(t, 3) for t in times],
                              "median_s": round(sorted(times)[len(times) // 2], 3),
                              "cache_and_graphs_gib": round(freed / 2 ** 30, 2),
                              "device": torch.cuda.get_device_name()}), flush=True)
        engine = model = run = None
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
