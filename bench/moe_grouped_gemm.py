"""One MoE layer's expert compute, by grouped-GEMM implementation, in one process.

Qwen3-30B-A3B expert shape (128 experts, top-8, hidden 2048, expert intermediate 768), routing
drawn uniformly at random, active experts run ``--chunk`` at a time as in
``orbit_core.models.moe_experts``. Times the SwiGLU expert MLP forward (``grouped_swiglu``) and
the frozen-expert backward (``grouped_swiglu_backward``) over all chunks of the layer, for:
``triton`` (``orbit::grouped_mm``), ``cutlass`` (torch's ``_grouped_mm``, the baseline) and
``loop`` (one cuBLAS matmul per expert, the reference). Dequantization is excluded: every chunk
reuses one bf16 weight stack, so only the GEMMs differ between rows.
    python -m bench.moe_grouped_gemm --tokens 1 64 3072
"""

from __future__ import annotations

import argparse
import json

import torch

from orbit_core.models import moe_experts
from orbit_core.models.moe_experts import _chunks, grouped_swiglu, grouped_swiglu_backward


def _plan(tokens: int, experts: int, top_k: int, chunk: int, gen: torch.Generator):
    choice = torch.stack([torch.randperm(experts, generator=gen)[:top_k] for _ in range(tokens)])
    counts_all = torch.bincount(choice.flatten(), minlength=experts)
    active = counts_all.nonzero().flatten().tolist()
    return list(_chunks(active, counts_all[active].tolist(), chunk)), tokens * top_k


def _time(fn, repeats: int) -> float:
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(repeats):
        fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end) / repeats


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--tokens", nargs="+", type=int, default=[1, 64, 3072])
    parser.add_argument("--experts", type=int, default=128)
    parser.add_argument("--top-k", type=int, default=8)
    parser.add_argument("--hidden", type=int, default=2048)
    parser.add_argument("--intermediate", type=int, default=768)
    parser.add_argument("--chunk", type=int, default=16)
    parser.add_argument("--impls", nargs="+", default=["loop", "cutlass", "triton"])
    args = parser.parse_args()
    gen = torch.Generator().manual_seed(0)
    h, i, c = args.hidden, args.intermediate, args.chunk
    gate, up = (torch.randn(c, i, h, generator=gen).cuda().bfloat16() * h ** -0.5 for _ in range(2))
    down = torch.randn(c, h, i, generator=gen).cuda().bfloat16() * i ** -0.5
    common = {"bench": "moe_grouped_gemm", "device": torch.cuda.get_device_name(), "torch": torch.__version__,
              "experts": args.experts, "top_k": args.top_k, "hidden": h, "intermediate": i, "chunk": c}
    for tokens in args.tokens:
        chunks, rows = _plan(tokens, args.experts, args.top_k, c, gen)
        x = torch.randn(rows, h, generator=gen).cuda().bfloat16()
        dy = torch.randn(rows, h, generator=gen).cuda().bfloat16()
        outputs = {}
        for impl in args.impls:
            moe_experts.GROUPED_MM["impl"] = impl

            def forward():
                return [grouped_swiglu(x[lo:hi], offsets, gate, up, down) for _, offsets, lo, hi in chunks]

            def backward():
                return [grouped_swiglu_backward(x[lo:hi], dy[lo:hi], offsets, gate, up, down)
                        for _, offsets, lo, hi in chunks]

            repeats = 20 if rows < 4096 else 5
            fwd_ms, bwd_ms = _time(forward, repeats), _time(backward, repeats)
            outputs[impl] = torch.cat(forward()).float()
            flops = 2 * rows * h * i * 3
            print(json.dumps({**common, "impl": impl, "tokens": tokens, "routed_rows": rows,
                              "active_experts": sum(len(ids) for ids, *_ in chunks),
                              "forward_ms": round(fwd_ms, 3), "backward_ms": round(bwd_ms, 3),
                              "forward_tflops": round(flops / fwd_ms / 1e9, 1),
                              "max_abs_diff_vs_loop": round((outputs[impl] - outputs.get("loop", outputs[impl]))
                                                            .abs().max().item(), 5)}), flush=True)


if __name__ == "__main__":
    main()
