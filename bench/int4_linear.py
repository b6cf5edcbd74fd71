"""Packed-weight linear kernels against bf16 cuBLAS at decode shapes, one JSON line per (shape, rows, impl).

int4 (W4A16 g128) through each of its kernels (the split-K and tiled kernels of earlier results
were replaced by the packed GEMM, ``bench/packed_gemm.py``); fp8 (128x128 blocks) and nvfp4 through the few-row
packed GEMV, with their torch dequantize-then-cuBLAS references beside them.

Each implementation is captured in a CUDA graph of ``--calls`` back-to-back calls and replayed, so
the figure is GPU time per call without Python launch overhead (what a graphed decode step pays).
The calls cycle through enough copies of the weight to overflow the L2 cache, as a decode step's
28 layers do.
Baselines in the same process: ``F.linear`` on the bf16 weight (cuBLAS) and the dequantize-then-
cuBLAS path. Bandwidth counts the weight bytes each call reads (codes + scales).
    python -m bench.int4_linear --shape qwen3-1.7b --rows 1 16 64 256
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.rollout_throughput import SHAPES
from orbit_kernels import fp_formats
from orbit_kernels import int4 as int4_kernels
from orbit_kernels import packed_gemm, packed_gemv


def random_packed(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``pack-quantized`` int4 weights: int32 words of eight nibbles, bf16 group scales."""
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    return packed, (torch.rand(n, k // group, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)


def random_fp(fmt: str, n: int, k: int) -> tuple:
    """Random fp8 block (e4m3 codes, no NaN; fp32 block scales) or nvfp4 (e2m1 pairs, e4m3 scales, global)."""
    if fmt == "fp8":
        codes = torch.randint(0, 256, (n, k), dtype=torch.uint8, device="cuda")
        codes[(codes & 0x7F) == 0x7F] = 0x38
        return codes.view(torch.float8_e4m3fn), torch.rand(-(-n // 128), -(-k // 128), device="cuda") * 0.01, None
    scale = (torch.rand(n, k // 16, device="cuda") * 4 + 0.5).to(torch.float8_e4m3fn)
    return (torch.randint(0, 256, (n, k // 2), dtype=torch.uint8, device="cuda"), scale,
            torch.tensor([448.0 * 6 / 0.02], device="cuda"))


def nbytes(*tensors) -> int:
    return sum(t.numel() * t.element_size() for t in tensors if t is not None)


def graph_us(fn, calls: int) -> float:
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(calls):
            fn()
    graph.replay()
    torch.cuda.synchronize()
    return replay_ms(graph, 5) * 1e3 / calls


def replay_ms(graph: torch.cuda.CUDAGraph, replays: int) -> float:
    """Milliseconds one replay of ``graph`` takes: CUDA events around ``replays`` replays."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(replays):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / replays


L2_BYTES = 50 << 20


def linear_shapes(shape: str) -> dict[str, tuple[int, int]]:
    """(out, in) of each linear of a decoder layer of ``shape``."""
    s = SHAPES[shape]
    h, inter, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["head_dim"]
    q = s["num_attention_heads"] * s["head_dim"]
    return {"q_proj": (q, h), "k_proj": (kv, h), "o_proj": (h, q), "gate_proj": (inter, h), "down_proj": (h, inter)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--calls", type=int, default=50)
    parser.add_argument("--formats", nargs="+", default=["int4", "fp8", "nvfp4"])
    args = parser.parse_args()
    shapes = linear_shapes(args.shape)
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        packs = [random_packed(n, k, 128) for _ in range(copies)]
        dense = [int4_kernels.dequant_int4(w, sc, (n, k), torch.bfloat16) for w, sc in packs]
        fp = {fmt: [random_fp(fmt, n, k) for _ in range(max(2, -(-4 * L2_BYTES // (n * k))))]
              for fmt in args.formats if fmt != "int4"}
        int4_bytes = nbytes(*packs[0])
        turn = iter(range(1 << 30))
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            int4_ref = F.linear(x, dense[0])
            impls = {"bf16_cublas": (lambda i: F.linear(x, dense[i % copies]), n * k * 2, int4_ref)}
            if "int4" in args.formats:  # each call(i) multiplies by copy i of the weight
                impls["int4_dequant_cublas"] = (
                    lambda i: F.linear(x, int4_kernels.int4_dequant(*packs[i % copies], k, x.dtype)), int4_bytes, int4_ref)
                impls["int4_packed_gemm"] = (
                    lambda i: packed_gemm.packed_gemm("int4", x, *packs[i % copies], k), int4_bytes, int4_ref)
                if rows <= packed_gemv.MAX_ROWS:
                    impls["int4_packed_gemv"] = (
                        lambda i: packed_gemv.packed_gemv("int4", x, *packs[i % copies], k), int4_bytes, int4_ref)
            for fmt, copies_fp in fp.items():
                ref = F.linear(x, fp_formats.dequant(fmt, *copies_fp[0], x.dtype))
                impls[f"{fmt}_dequant_cublas"] = (
                    lambda i, c=copies_fp, f=fmt: F.linear(x, fp_formats.dequant(f, *c[i % len(c)], x.dtype)),
                    nbytes(*copies_fp[0]), ref)
                if rows <= packed_gemv.MAX_ROWS:
                    impls[f"{fmt}_packed_gemv"] = (
                        lambda i, c=copies_fp, f=fmt: packed_gemv.packed_gemv(f, x, *c[i % len(c)][:2], k, c[i % len(c)][2]),
                        nbytes(*copies_fp[0]), ref)
            for impl, (call, weight_bytes, ref) in impls.items():
                err = (call(0).float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                us = graph_us(lambda: call(next(turn)), args.calls)
                print(json.dumps({
                    "bench": "int4_linear", "shape": args.shape, "linear": name, "out": n, "in": k, "rows": rows,
                    "impl": impl, "us_per_call": round(us, 2), "weight_gb_s": round(weight_bytes / us / 1e3, 1),
                    "max_rel_err_vs_format_reference": err, "baseline": "bf16_cublas",
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                }), flush=True)


if __name__ == "__main__":
    main()
