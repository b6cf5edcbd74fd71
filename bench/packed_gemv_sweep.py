"""Tile settings of the few-row packed GEMV at one row, for int4 and fp8, beside bf16 cuBLAS.

Each setting (output rows and int32 words per program, warps) is timed from CUDA-graph replays with
the weights cycled past the L2 cache (``bench.int4_linear.graph_us``), on q_proj, gate_proj and
down_proj of the Qwen3-1.7B shape. One JSON line per (linear, setting); the last line per linear
is cuBLAS on the bf16 weight, the baseline. ``packed_gemv.BLOCK_N / BLOCK_W / NUM_WARPS`` were
set from this sweep (``bench/results/packed_gemv_sweep_h200.jsonl``, from the script this one
was written from, before the baseline line was added). ``packed_gemv_sweep_3d_h200.jsonl`` is a
one-off run of a variant that unpacked all eight codes of a word as a third tensor dimension, since
removed from the kernel. ``packed_gemv_sweep_fused_h200.jsonl`` adds the engine's fused q/k/v and
gate/up shapes, pipeline stages and program targets.
``--x-split 0 1 --rows 1 4`` compares the two ways of reading the activations
(``packed_gemv.X_SPLIT``; ``packed_gemv_x_split_h200.jsonl``). ``packed_gemv_group_scale_h200.jsonl``
is a run with a ``--group-scale`` switch for a variant since removed (see ``packed_gemv.X_SPLIT``).
``--in-place 1 0`` switches ``packed_gemv.IN_PLACE_NIBBLES``; ``--prefetch 0 1`` loads each K step
one step ahead (``packed_gemv.PREFETCH``) at every setting given, the targets setting the split.
After each linear's settings, four more lines time the library's own choices: ``packed_gemv.plan``
with ``ONE_ROW_TILES``, with ``ONE_STEP``, with ``PREFETCH`` alone, and the rule before them
(``TARGET_PROGRAMS``, ``ONE_ROW_BLOCK_W``), the baseline. ``--specialize-stride 1 0`` runs the kernel built with and
without Triton's divisibility specialization of the weight's row stride
(``packed_gemv.STRIDE_UNSPECIALIZED``; ``packed_gemv_layouts_h200.jsonl``, where ``bw`` 256 at one
row is ``ONE_ROW_BLOCK_W``). Results of this round (H100): ``packed_gemv_in_place_h100.jsonl``,
``packed_gemv_prefetch_h100.jsonl`` (where ``prefetch`` forced it at every setting, and "plan:
prefetch" is the library's plan before ``ONE_STEP``), ``packed_gemv_plans_h100.jsonl``, and the
sweep that set ``ONE_ROW_TILES`` (``packed_gemv_tiles_h100.jsonl``, run before it existed, so its
"plan: one step" is the plan before it).
    python -m bench.packed_gemv_sweep [--shapes qkv gate_up q down] [--stages 1 3] [--targets 528 1056]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bench.int4_linear import L2_BYTES, graph_us, random_fp, random_packed
from orbit_kernels import int4 as int4_kernels
from orbit_kernels import packed_gemv

SHAPES = {"q": (2048, 2048), "gate": (6144, 2048), "down": (2048, 6144), "qkv": (4096, 2048),
          "gate_up": (12288, 2048)}
"""Linears of the Qwen3-1.7B shape; qkv and gate_up are the engine's fused groups (``models.projections``)."""


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["q", "gate", "down"], choices=sorted(SHAPES))
    parser.add_argument("--formats", nargs="+", default=["int4", "fp8"], choices=["int4", "fp8"])
    parser.add_argument("--block-n", nargs="+", type=int, default=[8, 16, 32])
    parser.add_argument("--block-w", nargs="+", type=int, default=[32, 64, 128])
    parser.add_argument("--warps", nargs="+", type=int, default=[4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[packed_gemv.NUM_STAGES])
    parser.add_argument("--targets", nargs="+", type=int, default=[packed_gemv.TARGET_PROGRAMS])
    parser.add_argument("--rows", nargs="+", type=int, default=[1], help="activation rows (1 to packed_gemv.MAX_ROWS)")
    parser.add_argument("--x-split", nargs="+", type=int, default=[int(packed_gemv.X_SPLIT)], choices=[0, 1],
                        help="packed_gemv.X_SPLIT settings: 1 loads a step's activations once and splits them")
    parser.add_argument("--in-place", nargs="+", type=int, default=[int(packed_gemv.IN_PLACE_NIBBLES)], choices=[0, 1],
                        help="packed_gemv.IN_PLACE_NIBBLES settings: 1 decodes int4 nibbles where they lie")
    parser.add_argument("--prefetch", nargs="+", type=int, default=[int(packed_gemv.PREFETCH)], choices=[0, 1],
                        help="packed_gemv.PREFETCH settings: 1 loads each K step one step ahead")
    parser.add_argument("--specialize-stride", nargs="+", type=int, default=[0], choices=[0, 1],
                        help="1: let Triton specialize the weight's row stride on divisibility by 16 (the kernel "
                             "as written does not)")
    args = parser.parse_args()
    default_plan = packed_gemv.plan
    defaults = packed_gemv.BLOCK_N, packed_gemv.BLOCK_W, packed_gemv.NUM_WARPS
    default_stages = packed_gemv.NUM_STAGES, packed_gemv.TARGET_PROGRAMS
    packed_gemv.ONE_ROW_BLOCK_W = False  # each setting's words per step as given
    torch.manual_seed(0)
    for name in args.shapes:
        n, k = SHAPES[name]
        packs = [random_packed(n, k, 128) for _ in range(max(2, -(-4 * L2_BYTES // (n * k // 2))))]
        fp8 = [random_fp("fp8", n, k) for _ in range(max(2, -(-4 * L2_BYTES // (n * k))))] if "fp8" in args.formats else []
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            for bn, bw, warps, stages, target, x_split, specialize, in_place, prefetch in itertools.product(
                    args.block_n, args.block_w, args.warps, args.stages, args.targets, args.x_split,
                    args.specialize_stride, args.in_place, args.prefetch):
                packed_gemv.STRIDE_UNSPECIALIZED = not specialize
                packed_gemv.BLOCK_N, packed_gemv.BLOCK_W, packed_gemv.NUM_WARPS = bn, bw, warps
                packed_gemv.NUM_STAGES, packed_gemv.TARGET_PROGRAMS = stages, target
                packed_gemv.X_SPLIT = bool(x_split)
                packed_gemv.IN_PLACE_NIBBLES = bool(in_place)
                packed_gemv.plan = lambda fmt, rows, tiles, k_words, bw=bw, target=target, prefetch=prefetch, bn=bn, \
                    warps=warps: packed_gemv.Plan(bw, packed_gemv._split(tiles, k_words, bw, target), bool(prefetch), bn,
                                                  warps)
                turn = iter(range(1 << 30))
                row = {"shape": name, "rows": rows, "bn": bn, "bw": bw, "warps": warps, "stages": stages,
                       "target": target, "x_split": bool(x_split), "stride_specialized": bool(specialize),
                       "in_place": bool(in_place), "prefetch": bool(prefetch),
                       "split": packed_gemv._split(-(-n // bn), k // 8, bw, target)}
                row["int4_us"] = round(graph_us(lambda: packed_gemv.packed_gemv(
                    "int4", x, *packs[next(turn) % len(packs)], k), 50), 2)
                if fp8:
                    row["fp8_us"] = round(graph_us(lambda: packed_gemv.packed_gemv(
                        "fp8", x, *fp8[next(turn) % len(fp8)][:2], k), 50), 2)
                print(json.dumps(row), flush=True)
            packed_gemv.STRIDE_UNSPECIALIZED = True
            packed_gemv.X_SPLIT, packed_gemv.IN_PLACE_NIBBLES, packed_gemv.plan = True, True, default_plan
            packed_gemv.BLOCK_N, packed_gemv.BLOCK_W, packed_gemv.NUM_WARPS = defaults
            packed_gemv.NUM_STAGES, packed_gemv.TARGET_PROGRAMS = default_stages
            for impl, tiles, one_step, prefetch in (
                    ("plan: one-row tiles", True, True, True), ("plan: one step", False, True, True),
                    ("plan: prefetch", False, False, True), ("rule before (baseline)", False, False, False)):
                packed_gemv.ONE_STEP, packed_gemv.PREFETCH, packed_gemv.ONE_ROW_BLOCK_W = one_step, prefetch, True
                packed_gemv.ONE_ROW_TILES = tiles  # the library's choices, newest first
                turn = iter(range(1 << 30))
                print(json.dumps({"shape": name, "rows": rows, "impl": impl,
                                  "plan": packed_gemv.plan("int4", rows, -(-n // packed_gemv.BLOCK_N), k // 8),
                                  "int4_us": round(graph_us(lambda: packed_gemv.packed_gemv(
                                      "int4", x, *packs[next(turn) % len(packs)], k), 50), 2)}), flush=True)
            packed_gemv.ONE_STEP = packed_gemv.PREFETCH = packed_gemv.ONE_ROW_TILES = True
            packed_gemv.ONE_ROW_BLOCK_W = False  # the settings' words as given again
            copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
            dense = [int4_kernels.dequant_int4(w, s, (n, k), torch.bfloat16) for w, s in packs[:copies]]
            turn = iter(range(1 << 30))
            print(json.dumps({"shape": name, "rows": rows, "impl": "bf16_cublas (baseline)",
                              "us": round(graph_us(lambda: F.linear(x, dense[next(turn) % len(dense)]), 50), 2),
                              "device": torch.cuda.get_device_name()}), flush=True)

if __name__ == "__main__":
    main()
