"""A packed int4 MoE on one GPU: resident bytes, decode tokens/s, and one GRPO step.

Random weights in the Qwen3-30B-A3B shape (48 layers, hidden 2048, 128 experts, top-8, expert
intermediate 768), written directly in packed int4 (g128, ``bench/packed_random.py``). Experts run
through active-expert-chunked dequantization (``moe.dequant_chunk_experts``). The bf16 size of
the same model is reported beside the resident bytes (the baseline a bf16 load would need).
    python -m bench.moe --chunks 8 32
One JSON line per measurement.
"""

from __future__ import annotations

import argparse
import gc
import itertools
import json
import tempfile
import time
from pathlib import Path

import torch

from bench.decode_throughput import decode_seconds
from bench.grpo_step import PROMPTS, SAMPLES, orbit_run, write_prompts
from bench.packed_random import BIG_SHAPES, write_packed_random
from orbit_core.models.moe import set_dequant_chunk
from orbit_core.models.moe_experts import GROUPED_MM
from orbit_core.policy import load_base
from orbit_core.quant import QuantLinear


def bf16_bytes(model) -> int:
    dense = 0
    for module in model.modules():
        if isinstance(module, QuantLinear):
            dense += module.in_features * module.out_features * 2
        else:
            dense += sum(p.numel() * 2 for p in module.parameters(recurse=False))
    return dense


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-30b-a3b", choices=[k for k, v in BIG_SHAPES.items() if "num_experts" in v])
    parser.add_argument("--chunks", nargs="+", type=int, default=[8, 32])
    parser.add_argument("--batches", nargs="*", type=int, default=[1, 64], help="none: skip decoding")
    parser.add_argument("--prompt-len", type=int, default=64)
    parser.add_argument("--new", type=int, default=64)
    parser.add_argument("--grpo-steps", type=int, default=2, help="0 skips the GRPO step")
    parser.add_argument("--impls", nargs="+", default=["triton", "cutlass"],
                        help="grouped GEMMs to decode with (moe_experts.GROUPED_MM); the GRPO step uses the first")
    parser.add_argument("--path", default="", help="write the packed checkpoint here, or reuse the one already there")
    args = parser.parse_args()
    shape = BIG_SHAPES[args.shape]
    common = {"bench": "moe", "shape": args.shape, "base": "int4 g128", "device": torch.cuda.get_device_name(),
              "torch": torch.__version__}
    root = Path(args.path).parent if args.path else Path(tempfile.mkdtemp(prefix="orbit-moe-bench-"))
    path = args.path
    if not path or not Path(path, "config.json").is_file():
        start = time.perf_counter()
        path = str(write_packed_random(Path(path) if path else root / "int4", shape))
        print(json.dumps({**common, "packed_checkpoint_write_s": round(time.perf_counter() - start, 1)}), flush=True)
    if args.batches:
        torch.cuda.empty_cache()
        before = torch.cuda.memory_allocated()
        start = time.perf_counter()
        model = load_base(path, "bfloat16", "cuda").eval()
        print(json.dumps({**common, "load_s": round(time.perf_counter() - start, 1)}), flush=True)
        resident = torch.cuda.memory_allocated() - before
        print(json.dumps({**common, "resident_bytes": resident, "bf16_bytes_same_model": bf16_bytes(model),
                          "resident_vs_bf16": round(resident / bf16_bytes(model), 3)}), flush=True)
        gen = torch.Generator().manual_seed(1)
        prompts = torch.randint(10, shape["vocab_size"], (max(args.batches), args.prompt_len), generator=gen).tolist()
        for chunk, impl, batch in itertools.product(args.chunks, args.impls, args.batches):
            set_dequant_chunk(model, chunk)
            GROUPED_MM["impl"] = impl
            torch.cuda.reset_peak_memory_stats()
            seconds, = decode_seconds(model, prompts, args.new, batch, cuda_graph=False)
            print(json.dumps({**common, "measure": "decode", "grouped_mm": impl, "dequant_chunk_experts": chunk,
                              "batch": batch,
                              "prompt_len": args.prompt_len, "new_tokens": args.new,
                              "tokens_per_s": round(batch * args.new / seconds, 1),
                              "ms_per_step": round(1e3 * seconds / args.new, 1),
                              "peak_gib": round(torch.cuda.max_memory_allocated() / 2**30, 2)}), flush=True)
        del model
        gc.collect()
        torch.cuda.empty_cache()
    if args.grpo_steps:
        GROUPED_MM["impl"] = args.impls[0]
        data = write_prompts(root / "prompts.jsonl", PROMPTS * (args.grpo_steps + 2))
        numbers = orbit_run("moe", path, data, root, args.grpo_steps, 1, {})
        print(json.dumps({**common, "measure": "grpo_step", "grouped_mm": args.impls[0], "prompts": PROMPTS, "samples": SAMPLES,
                          "dequant_chunk_experts": 16, "steps_measured": args.grpo_steps - 1,
                          **{k: round(v, 3) for k, v in numbers.items()}}), flush=True)


if __name__ == "__main__":
    main()
