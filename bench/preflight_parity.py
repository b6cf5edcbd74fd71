"""The runtime preflight on the GPU: the graphed builtin engine against the torch trainer's forward.

Two code paths score the same sampled tokens: the engine decodes with its KV cache, CUDA graphs
and decode kernels (int4 split-K GEMV, fused RMSNorm, in-graph sampling); the trainer runs the
whole sequence at once without a cache (int4 through dequantize + cuBLAS). One JSON line per base
with max / mean |logprob diff| and top-k agreement, and one per base with the engine's rope theta
set wrong, which the gate's defaults must fail.
    python -m bench.preflight_parity --shape qwen3-1.7b --bases bf16 int4
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.decode_throughput import build_model
from bench.rollout_throughput import SHAPES, NoEosTokenizer
from orbit_core.config.schema import PreflightSection
from orbit_core.preflight.runtime import runtime_parity
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout.engine import BuiltinEngine


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--bases", nargs="+", default=["bf16", "int4"])
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--new", type=int, default=64)
    args = parser.parse_args()
    shape, gate = SHAPES[args.shape], PreflightSection()
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    paths = {"bf16": str(root / "bf16")}
    gen = torch.Generator().manual_seed(2)
    prompts = torch.randint(10, shape["vocab_size"], (args.prompts, 32), generator=gen).tolist()
    for base in args.bases:
        if base != "bf16":
            quantize_checkpoint(paths["bf16"], str(root / base), base, group_size=128, device="cuda")
            paths[base] = str(root / base)
        torch.manual_seed(0)
        trainer = build_model(paths[base], "lora")
        for wrong_rope in (False, True):
            torch.manual_seed(0)  # the same LoRA weights on the engine's copy
            engine_model = build_model(paths[base], "lora")
            if wrong_rope:
                engine_model.config = dataclasses.replace(engine_model.config, rope_theta=31.0)
            engine = BuiltinEngine(engine_model, NoEosTokenizer(), max_running=args.prompts, seed=0)
            report = runtime_parity(engine, trainer, NoEosTokenizer(), prompts, args.new, gate.topk,
                                    gate.max_logprob_abs_diff, gate.min_topk_agreement,
                                    max_mean_diff=gate.max_logprob_mean_abs_diff)
            print(json.dumps({
                "bench": "preflight_parity", "shape": args.shape, "base": base, "adapter": "lora r16 all-linear",
                "engine_rope_theta": 31.0 if wrong_rope else engine_model.config.rope_theta,
                "engine": report.engine, "trainer": report.trainer, "cuda_graphs": engine.loop.use_graphs,
                "tokens": report.tokens, "max_abs_logprob_diff": round(report.max_abs_diff, 5),
                "mean_abs_logprob_diff": round(report.mean_abs_diff, 6), f"top{gate.topk}_agreement":
                round(report.topk_agreement, 4), "gate_max_abs_diff": gate.max_logprob_abs_diff,
                "gate_max_mean_abs_diff": gate.max_logprob_mean_abs_diff,
                "gate_min_agreement": gate.min_topk_agreement, "passed": report.passed,
                "device": torch.cuda.get_device_name(), "torch": torch.__version__,
            }), flush=True)
            del engine, engine_model
        del trainer
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
