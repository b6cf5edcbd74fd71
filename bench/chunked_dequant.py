"""Dequantize + cuBLAS for int4 linears above the packed GEMM's rows, whole or in L2-sized chunks.

Above ``packed_gemm.MAX_ROWS`` rows an int4 linear dequantizes its whole weight to bf16 (written to
HBM) and cuBLAS reads it back: for the Qwen3-1.7B shape about a millisecond a decode step on an
H200 (``decode_graph_replay_profile_prefill_h200.txt``). Here the weight is decoded a chunk of
output rows at a time into one reused scratch buffer small enough to stay in L2, and each chunk's
GEMM writes its columns of the output; whether L2 keeps the chunk, and whether the smaller GEMMs
lose more than that saves, is what this measures. One JSON line per (rows, method): microseconds
per layer (q/k/v fused, o, gate/up fused, down; every layer its own weights) from CUDA-graph
replays. Baselines in the same process: bf16 cuBLAS on dense weights, and the whole-weight path.
    python -m bench.chunked_dequant [--rows 32 256] [--chunk-mb 4 8 16 24]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.int4_linear import graph_us, random_packed
from orbit_kernels import packed_gemm

SHAPES = {"qkv": (4096, 2048), "o": (2048, 2048), "gate_up": (12288, 2048), "down": (2048, 6144)}


def chunked(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, scratch: torch.Tensor, chunk_rows: int,
            out: torch.Tensor) -> None:
    k = x.shape[-1]
    for start in range(0, packed.shape[0], chunk_rows):
        n = min(chunk_rows, packed.shape[0] - start)
        w = scratch[: n * k].view(n, k)
        packed_gemm.dequantize("int4", packed[start:start + n], scale[start:start + n], None, k, x.dtype, out=w)
        torch.mm(x, w.t(), out=out[:, start:start + n])


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="+", type=int, default=[32, 256])
    parser.add_argument("--chunk-mb", nargs="+", type=float, default=[4, 8, 16, 24])
    parser.add_argument("--layers", type=int, default=28)
    args = parser.parse_args()
    torch.manual_seed(0)
    layers = [{name: random_packed(n, k, 128) for name, (n, k) in SHAPES.items()} for _ in range(args.layers)]
    dense = [{name: torch.randn(n, k, device="cuda", dtype=torch.bfloat16) * 0.02 for name, (n, k) in SHAPES.items()}
             for _ in range(args.layers)]
    device = torch.cuda.get_device_name()
    for rows in args.rows:
        xs = {name: torch.randn(rows, k, device="cuda", dtype=torch.bfloat16) for name, (_, k) in SHAPES.items()}
        outs = {name: torch.empty(rows, n, device="cuda", dtype=torch.bfloat16) for name, (n, _) in SHAPES.items()}

        def report(method: str, us: float, **extra) -> None:
            print(json.dumps({"bench": "chunked_dequant", "rows": rows, "method": method, **extra,
                              "us_per_layer": round(us / args.layers, 2), "device": device}), flush=True)

        def bf16() -> None:
            for layer in dense:
                for name, w in layer.items():
                    torch.mm(xs[name], w.t(), out=outs[name])

        def whole() -> None:
            for layer in layers:
                for name, (packed, scale) in layer.items():
                    w = packed_gemm.dequantize("int4", packed, scale, None, SHAPES[name][1], torch.bfloat16)
                    torch.mm(xs[name], w.t(), out=outs[name])

        report("bf16 cuBLAS (baseline)", graph_us(bf16, 1))
        report("dequantize whole, then cuBLAS (the current path)", graph_us(whole, 1))
        want = {name: outs[name].clone() for name in SHAPES}
        for mb in args.chunk_mb:
            scratch = torch.empty(int(mb * (1 << 20)) // 2, device="cuda", dtype=torch.bfloat16)

            def run() -> None:
                for layer in layers:
                    for name, (packed, scale) in layer.items():
                        k = SHAPES[name][1]
                        chunk_rows = max(128, scratch.numel() // k // 128 * 128)
                        chunked(xs[name], packed, scale, scratch, chunk_rows, outs[name])

            us = graph_us(run, 1)
            error = max((outs[name].float() - want[name].float()).abs().max().item() for name in SHAPES)
            report("dequantize in chunks into one scratch, then cuBLAS per chunk", us, chunk_mb=mb,
                   max_abs_vs_whole=error)


if __name__ == "__main__":
    main()
