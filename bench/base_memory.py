"""Resident memory of a frozen base in bf16, int4, fp8 and nvfp4 (random weights), one JSON line each.

Builds a HF checkpoint of the given shape, quantizes it with `orbit quantize` (scales computed on
the GPU), loads each through Orbit's loader onto the GPU and reads torch.cuda.memory_allocated().
Baseline: the bf16 load of the same checkpoint, measured in the same run.
    python bench/base_memory.py --shape qwen3-1.7b
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
import time
from pathlib import Path

import torch

from bench.rollout_throughput import SHAPES
from orbit_core.policy import load_base
from orbit_core.quant import quantize_checkpoint

TINY = dict(hidden_size=128, intermediate_size=384, num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
            head_dim=32, vocab_size=18, tie_word_embeddings=True)


def save_char_tokenizer(path: Path) -> None:
    """Orbit's character tokenizer beside a random checkpoint, so the training loop can run on it."""
    from orbit_core.data.arith import ALPHABET
    from orbit_core.models.char_tokenizer import build_char_tokenizer

    build_char_tokenizer(ALPHABET, str(path))


def write_random_checkpoint(path: Path, shape: dict, tokenizer: bool = False) -> None:
    """Random bf16 weights of ``shape``; a shape with ``num_experts`` is Qwen3-MoE."""
    from transformers import Qwen3Config, Qwen3ForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    moe = "num_experts" in shape
    config = (Qwen3MoeConfig if moe else Qwen3Config)(max_position_embeddings=4096, **shape)
    with torch.device("cuda"):
        model = (Qwen3MoeForCausalLM if moe else Qwen3ForCausalLM)(config).to(torch.bfloat16)
    model.save_pretrained(str(path))
    del model
    torch.cuda.empty_cache()
    if tokenizer:
        save_char_tokenizer(path)


def measure(path: str) -> tuple[int, int]:
    torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated()
    model = load_base(path, "bfloat16", "cuda")
    allocated = torch.cuda.memory_allocated() - before
    tensor_bytes = sum(t.numel() * t.element_size() for t in list(model.parameters()) + list(model.buffers()))
    del model
    torch.cuda.empty_cache()
    return allocated, tensor_bytes


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=["tiny", *sorted(SHAPES)])
    parser.add_argument("--group-size", type=int, default=128)
    args = parser.parse_args()
    shape = TINY if args.shape == "tiny" else SHAPES[args.shape]
    root = Path(tempfile.mkdtemp())
    try:
        write_random_checkpoint(root / "bf16", shape)
        results = {"bf16": measure(str(root / "bf16"))}
        for fmt in ("int4", "fp8", "nvfp4"):
            start = time.perf_counter()
            quantize_checkpoint(str(root / "bf16"), str(root / fmt), fmt, group_size=args.group_size, device="cuda")
            quantize_s = time.perf_counter() - start
            results[fmt] = measure(str(root / fmt))
            results[fmt] = (*results[fmt], quantize_s)
        base = results["bf16"][0]
        for fmt, values in results.items():
            print(json.dumps({"bench": "base_memory", "shape": args.shape, "format": fmt, "gpu_allocated_bytes": values[0],
                              "param_buffer_bytes": values[1], "baseline": "bf16", "ratio_vs_baseline": round(values[0] / base, 3),
                              **({"quantize_s": round(values[2], 1)} if len(values) > 2 else {}),
                              "device": torch.cuda.get_device_name()}))
    finally:
        shutil.rmtree(root, ignore_errors=True)


if __name__ == "__main__":
    main()
