"""The tiled packed GEMM (``orbit_kernels.packed_gemm``) forward and backward, against cuBLAS.

For each linear of the Qwen3-1.7B shape, each row count (decode batches and training token
counts) and each direction (forward ``x W^T``; backward ``dy W``, the input gradient), one JSON
line per implementation:

* ``bf16_cublas`` (the baseline): cuBLAS on a bf16 weight;
* ``<fmt>_dequant_cublas``: the format's Triton dequantization, then cuBLAS (what training ran);
* ``<fmt>_gemm``: the packed GEMM with its default tiles (``packed_gemm.tiles_for``);
* ``int4_linear op`` (forward): what the quantized linear runs at that row count (the few-row GEMV,
  this GEMM, or dequantize + cuBLAS); ``int4_gemm rounding decode``: the GEMM with
  ``packed_gemm.INT4_PAIRS`` off (its tiles and decode before the pairs);
* with ``--sweep``, ``int4_gemm`` with each tile setting in ``CANDIDATES`` as well at each
  reduction split of ``--splits``; with ``--sweep --x-split``, every format's GEMM with each
  setting in ``X_SPLIT_CANDIDATES`` (those ``--candidates`` names), forward.

Times come from CUDA-graph replays of ``--calls`` back-to-back calls cycling through enough
weight copies to overflow L2 (``bench.int4_linear.graph_us``), so they are GPU time per call.
    python -m bench.packed_gemm --rows 8 32 256 8192 [--sweep]

Results (H200): ``packed_gemm_h200.jsonl`` (every format, the dispatch thresholds
``packed_gemm.MAX_ROWS`` come from it); ``packed_gemm_sweep_h200.jsonl`` and
``packed_gemm_sweep_8rows_h200.jsonl`` (the tile sweeps behind ``packed_gemm.tiles_for``; their
``int4_dequant_cublas`` rows predate ``packed_gemm.dequantize`` and used the one-thread-per-weight
dequantization, 2-2.5x slower); ``packed_gemm_x_split_h200.jsonl`` and
``packed_gemm_x_split_formats_h200.jsonl`` (the forward's one dot per code position,
``packed_gemm.X_SPLIT``: int4 at 16-256 rows, and every format at 8-32; in the second the default
``<fmt>_gemm`` rows already take the x-split tiles); ``packed_gemm_x_split_splits_h200.jsonl`` (the
x-split tiles at 16 and 32 rows, each at reduction splits 2, 4, 16 and the default rule, behind
``packed_gemm.NARROW_TILES``). One H100: ``packed_gemm_int4_pairs_h100.jsonl`` (the pairs decode
with eight x-split tiles at 8-64 rows, behind ``tiles_for``'s pairs rule) and
``packed_gemm_int4_pairs_rows_h100.jsonl`` (that rule at 1-256 rows, against the op and the
decode before).
"""

from __future__ import annotations

import argparse
import json

import torch
from triton.runtime.errors import OutOfResources

from bench.int4_linear import L2_BYTES, graph_us, linear_shapes, nbytes, random_fp, random_packed
from bench.rollout_throughput import SHAPES
from orbit_kernels import packed_gemm
from orbit_kernels.int4 import int4_linear
from orbit_kernels.packed_gemm import Tiles
from orbit_kernels.packed_grad import dense_weight

CANDIDATES = [Tiles(64, 128, 64, 4, 3), Tiles(64, 128, 128, 4, 3), Tiles(128, 256, 64, 8, 3), Tiles(256, 128, 64, 8, 3),
              Tiles(16, 128, 128, 4, 4, True), Tiles(32, 128, 128, 4, 4, True), Tiles(64, 128, 128, 4, 3, True),
              Tiles(128, 128, 64, 4, 3, True), Tiles(128, 128, 64, 8, 3, True), Tiles(256, 128, 64, 8, 3, True),
              Tiles(128, 256, 64, 8, 3, True)]
"""Tile settings ``--sweep`` times besides the default (a first sweep dropped those 2x off the best)."""
X_SPLIT_CANDIDATES = [Tiles(16, 128, 128, 4, 4, True, True), Tiles(32, 128, 128, 4, 4, True, True),
                      Tiles(32, 128, 256, 4, 3, True, True), Tiles(64, 128, 128, 4, 3, True, True),
                      Tiles(64, 128, 256, 8, 3, True, True), Tiles(64, 64, 256, 4, 3, True, True),
                      Tiles(128, 128, 128, 8, 3, True, True), Tiles(64, 256, 128, 8, 3, True, True),
                      Tiles(64, 128, 128, 4, 3, False, True), Tiles(128, 128, 128, 8, 3, False, True),
                      Tiles(16, 64, 128, 4, 4, True, True), Tiles(32, 64, 128, 4, 4, True, True),
                      Tiles(16, 64, 256, 4, 3, True, True), Tiles(16, 128, 128, 4, 5, True, True),
                      Tiles(16, 32, 128, 2, 4, True, True), Tiles(16, 64, 128, 4, 2, False, True),
                      Tiles(16, 128, 128, 4, 2, False, True), Tiles(16, 128, 128, 8, 2, True, True),
                      Tiles(32, 64, 128, 4, 2, False, True), Tiles(32, 128, 128, 4, 2, False, True)]
"""With ``--sweep --x-split``: one dot per code position, the activations dealt out in registers."""


def _without_pairs(gemm, i: int):
    """The GEMM with ``packed_gemm.INT4_PAIRS`` off (read at launch, so inside a capture too)."""
    packed_gemm.INT4_PAIRS = False
    try:
        return gemm(i)
    finally:
        packed_gemm.INT4_PAIRS = True


def _weights(fmt: str, n: int, k: int) -> tuple:
    if fmt == "int4":
        return (*random_packed(n, k, 128), None)
    return random_fp(fmt, n, k)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[8, 32, 64, 256, 2048, 8192])
    parser.add_argument("--formats", nargs="+", default=["int4", "fp8", "nvfp4"])
    parser.add_argument("--linears", nargs="+", default=["q_proj", "k_proj", "gate_proj", "down_proj"])
    parser.add_argument("--sweep", action="store_true")
    parser.add_argument("--x-split", action="store_true",
                        help="sweep X_SPLIT_CANDIDATES instead (forward only), for every format")
    parser.add_argument("--candidates", type=int, nargs="+", default=None,
                        help="sweep only these candidates (indices into the list swept)")
    parser.add_argument("--splits", nargs="+", type=int, default=[0],
                        help="reduction splits to sweep (0: the default rule, packed_gemm._split)")
    parser.add_argument("--directions", nargs="+", default=["forward", "backward"], choices=["forward", "backward"])
    args = parser.parse_args()
    shapes = linear_shapes(args.shape)
    torch.manual_seed(0)
    turn = iter(range(1 << 30))
    for name in args.linears:
        n, k = shapes[name]
        weights = {fmt: [_weights(fmt, n, k) for _ in range(max(2, -(-4 * L2_BYTES // (n * k // 2))))]
                   for fmt in args.formats}
        dense = [torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
                 for _ in range(max(2, -(-4 * L2_BYTES // (n * k * 2))))]
        for rows in args.rows:
            calls = 50 if rows <= 256 else 10
            for forward in (d == "forward" for d in args.directions):
                a = torch.randn(rows, k if forward else n, device="cuda", dtype=torch.bfloat16)

                def cublas(w, a=a, forward=forward):
                    return a @ (w.t() if forward else w)

                impls = {"bf16_cublas": (lambda i: cublas(dense[i % len(dense)]), n * k * 2, None)}
                for fmt, copies in weights.items():
                    def dequant_cublas(i, fmt=fmt, copies=copies):
                        w, sc, gs = copies[i % len(copies)]
                        return cublas(dense_weight(fmt, w, sc, gs, k, a.dtype))

                    def gemm(i, tiles=None, split=None, fmt=fmt, copies=copies, forward=forward, a=a):
                        w, sc, gs = copies[i % len(copies)]
                        return packed_gemm.packed_gemm(fmt, a, w, sc, k, gs, forward=forward, tiles=tiles,
                                                       split=split)

                    weight_bytes = nbytes(*copies[0])
                    impls[f"{fmt}_dequant_cublas"] = (dequant_cublas, weight_bytes, fmt)
                    impls[f"{fmt}_gemm"] = (gemm, weight_bytes, fmt)
                    if fmt == "int4" and forward:  # what the quantized linear runs at this row count
                        impls["int4_linear op"] = (
                            lambda i, copies=copies, a=a: int4_linear(a, *copies[i % len(copies)][:2], k),
                            weight_bytes, fmt)
                    if fmt == "int4" and forward and packed_gemm.INT4_PAIRS:
                        impls["int4_gemm rounding decode"] = (
                            lambda i, gemm=gemm: _without_pairs(gemm, i), weight_bytes, fmt)
                    if args.sweep and (fmt == "int4" or args.x_split):
                        swept = X_SPLIT_CANDIDATES if args.x_split else CANDIDATES
                        for t in (swept if args.candidates is None else [swept[i] for i in args.candidates]):
                            for split in args.splits:
                                impls[f"{fmt}_gemm {tuple(t)}" + (f" split {split}" if split else "")] = (
                                    lambda i, t=t, s=split, gemm=gemm: gemm(i, t, s or None), weight_bytes, fmt)
                for impl, (call, weight_bytes, fmt) in impls.items():
                    err = None
                    try:
                        if fmt is not None:  # against the format's own dequantize-then-cuBLAS
                            ref = impls[f"{fmt}_dequant_cublas"][0](0).float()
                            err = (call(0).float() - ref).abs().max().item() / ref.abs().max().item()
                        us = graph_us(lambda: call(next(turn)), calls)
                    except OutOfResources as e:  # a swept tile too large for shared memory
                        print(json.dumps({"linear": name, "rows": rows, "impl": impl, "error": str(e)}), flush=True)
                        continue
                    print(json.dumps({
                        "bench": "packed_gemm", "shape": args.shape, "linear": name, "out": n, "in": k, "rows": rows,
                        "direction": "forward" if forward else "backward", "impl": impl, "us_per_call": round(us, 2),
                        "tflops": round(2 * rows * n * k / us / 1e6, 1),
                        "weight_gb_s": round(weight_bytes / us / 1e3, 1), "max_rel_err_vs_dequant_cublas": err,
                        "baseline": "bf16_cublas", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                    }), flush=True)


if __name__ == "__main__":
    main()
