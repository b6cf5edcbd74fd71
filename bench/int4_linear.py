"""W4A16 linear kernels against bf16 cuBLAS at decode shapes, one JSON line per (shape, rows, impl).

Each implementation is captured in a CUDA graph of ``--calls`` back-to-back calls and replayed, so
the figure is GPU time per call without Python launch overhead (what a graphed decode step pays).
The calls cycle through enough copies of the weight to overflow the L2 cache, as a decode step's
28 layers do.
Baselines in the same process: ``F.linear`` on the bf16 weight (cuBLAS) and the dequantize-then-
cuBLAS path. Bandwidth counts the weight bytes each call reads (packed + scales for int4).
    python -m bench.int4_linear --shape qwen3-1.7b --rows 1 16 64 256
"""

from __future__ import annotations

import argparse
import json

import torch
import torch.nn.functional as F

from bench.rollout_throughput import SHAPES
from orbit_kernels import int4 as int4_kernels


def random_packed(n: int, k: int, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Random ``pack-quantized`` int4 weights: int32 words of eight nibbles, bf16 group scales."""
    packed = torch.randint(-2**31, 2**31 - 1, (n, k // 8), dtype=torch.int32, device="cuda")
    return packed, (torch.rand(n, k // group, device="cuda") * 0.02 + 1e-3).to(torch.bfloat16)


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
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) * 1e3 / (5 * calls)


L2_BYTES = 50 << 20


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shape", default="qwen3-1.7b", choices=sorted(SHAPES))
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 16, 64, 256])
    parser.add_argument("--calls", type=int, default=50)
    args = parser.parse_args()
    s = SHAPES[args.shape]
    h, inter, kv = s["hidden_size"], s["intermediate_size"], s["num_key_value_heads"] * s["head_dim"]
    q = s["num_attention_heads"] * s["head_dim"]
    shapes = {"q_proj": (q, h), "k_proj": (kv, h), "o_proj": (h, q), "gate_proj": (inter, h), "down_proj": (h, inter)}
    torch.manual_seed(0)
    for name, (n, k) in shapes.items():
        copies = max(2, -(-4 * L2_BYTES // (n * k * 2)))
        packs = [random_packed(n, k, 128) for _ in range(copies)]
        dense = [int4_kernels.dequant_int4(w, sc, (n, k), torch.bfloat16) for w, sc in packs]
        packed, scale = packs[0]
        int4_bytes = packed.numel() * 4 + scale.numel() * scale.element_size()
        turn = iter(range(1 << 30))
        for rows in args.rows:
            x = torch.randn(rows, k, device="cuda", dtype=torch.bfloat16)
            ref = F.linear(x, dense[0])
            impls = {  # each call(i) multiplies by copy i of the weight
                "bf16_cublas": (lambda i: F.linear(x, dense[i]), n * k * 2),
                "int4_dequant_cublas": (lambda i: F.linear(x, int4_kernels.int4_dequant(*packs[i], k, x.dtype)),
                                        int4_bytes),
                "int4_tiled": (lambda i: int4_kernels.fused_int4_linear(x, *packs[i], k), int4_bytes),
            }
            if rows <= int4_kernels.GEMV_MAX_ROWS:
                impls["int4_split_k"] = (lambda i: int4_kernels.int4_gemv(x, *packs[i], k), int4_bytes)
            for impl, (call, nbytes) in impls.items():
                err = (call(0).float() - ref.float()).abs().max().item() / ref.float().abs().max().item()
                us = graph_us(lambda: call(next(turn) % copies), args.calls)
                print(json.dumps({
                    "bench": "int4_linear", "shape": args.shape, "linear": name, "out": n, "in": k, "rows": rows,
                    "impl": impl, "us_per_call": round(us, 2), "weight_gb_s": round(nbytes / us / 1e3, 1),
                    "max_rel_err_vs_dequant_cublas": err, "baseline": "bf16_cublas",
                    "device": torch.cuda.get_device_name(), "torch": torch.__version__,
                }), flush=True)


if __name__ == "__main__":
    main()
