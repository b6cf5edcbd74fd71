"""Tile settings of the few-row packed GEMV at one row, for int4 and fp8, beside bf16 cuBLAS.

Each setting (output rows and int32 words per program, warps) is timed from CUDA-graph replays with
the weights cycled past the L2 cache (``bench.int4_linear.graph_us``), on q_proj, gate_proj and
down_proj of the Qwen3-1.7B shape. One JSON line per (linear, setting); the last line per linear
is cuBLAS on the bf16 weight, the baseline. ``packed_gemv.BLOCK_N / BLOCK_W / NUM_WARPS`` were
set from this sweep (``bench/results/packed_gemv_sweep_h200.jsonl``, from the script this one
was written from, before the baseline line was added; this version has not run on a GPU yet). ``packed_gemv_sweep_3d_h200.jsonl`` is a one-off run of a variant that unpacked
all eight codes of a word as a third tensor dimension, since removed from the kernel.
    python -m bench.packed_gemv_sweep
"""

from __future__ import annotations

import itertools
import json

import torch
import torch.nn.functional as F

from bench.int4_linear import L2_BYTES, graph_us, random_fp, random_packed
from orbit_kernels import int4 as int4_kernels
from orbit_kernels import packed_gemv

SHAPES = {"q": (2048, 2048), "gate": (6144, 2048), "down": (2048, 6144)}


def main() -> None:
    torch.manual_seed(0)
    for name, (n, k) in SHAPES.items():
        packs = [random_packed(n, k, 128) for _ in range(max(2, -(-4 * L2_BYTES // (n * k // 2))))]
        fp8 = [random_fp("fp8", n, k) for _ in range(max(2, -(-4 * L2_BYTES // (n * k))))]
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)
        for bn, bw, warps in itertools.product((8, 16, 32), (32, 64, 128), (4, 8)):
            packed_gemv.BLOCK_N, packed_gemv.BLOCK_W, packed_gemv.NUM_WARPS = bn, bw, warps
            turn = iter(range(1 << 30))
            int4_us = graph_us(lambda: packed_gemv.packed_gemv("int4", x, *packs[next(turn) % len(packs)], k), 50)
            fp8_us = graph_us(lambda: packed_gemv.packed_gemv("fp8", x, *fp8[next(turn) % len(fp8)][:2], k), 50)
            print(json.dumps({"shape": name, "rows": 1, "bn": bn, "bw": bw, "warps": warps,
                              "target": packed_gemv.TARGET_PROGRAMS, "int4_us": round(int4_us, 2),
                              "fp8_us": round(fp8_us, 2)}), flush=True)
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        dense = [int4_kernels.dequant_int4(w, s, (n, k), torch.bfloat16) for w, s in packs[:copies]]
        turn = iter(range(1 << 30))
        print(json.dumps({"shape": name, "rows": 1, "impl": "bf16_cublas (baseline)",
                          "us": round(graph_us(lambda: F.linear(x, dense[next(turn) % len(dense)]), 50), 2),
                          "device": torch.cuda.get_device_name()}), flush=True)


if __name__ == "__main__":
    main()
