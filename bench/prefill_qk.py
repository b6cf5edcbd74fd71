"""``orbit::prefill_qk_``'s kernel per launch setting, on a prefill of the Qwen3-1.7B heads.

q, k and v as column views of one fused q/k/v output of ``rows`` x ``tokens`` tokens (16 query and
8 KV heads of 128, q/k norms on, the rope rows one per cache row), written into a bf16 cache of
``rows`` x 8 x ``capacity`` x 128. Ten calls a CUDA graph, microseconds a call, for each (tokens a
program, warps); the baseline, in the same process, is a program per (token, head) with one warp
(the launch before ``qk_rope.PREFILL_TILES``). Each setting's outputs are checked equal to the
baseline's.
    python -m bench.prefill_qk [--rows 1 256] [--tokens 128]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.int4_linear import graph_us
from orbit_kernels.qk_rope import launch_prefill


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 256])
    parser.add_argument("--tokens", type=int, default=128)
    parser.add_argument("--capacity", type=int, default=256)
    args = parser.parse_args()
    heads, kv_heads, dim = 16, 8, 128
    for rows in args.rows:
        torch.manual_seed(rows)
        qkv = torch.randn(rows, args.tokens, (heads + 2 * kv_heads) * dim, device="cuda").to(torch.bfloat16)
        q = qkv[..., :heads * dim].view(rows, args.tokens, heads, dim)
        k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(rows, args.tokens, kv_heads, dim)
        v = qkv[..., (heads + kv_heads) * dim:].view(rows, args.tokens, kv_heads, dim)
        weights = [(torch.rand(dim, device="cuda") + 0.5).to(torch.bfloat16) for _ in range(2)]
        cos, sin = torch.randn(rows, args.tokens, dim, device="cuda"), torch.randn(rows, args.tokens, dim, device="cuda")
        cache_k = torch.zeros(rows, kv_heads, args.capacity, dim, device="cuda", dtype=torch.bfloat16)
        cache_v = torch.zeros_like(cache_k)
        common = {"bench": "prefill_qk", "rows": rows, "tokens": args.tokens, "heads": heads, "kv_heads": kv_heads,
                  "head_dim": dim, "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        base = launch_prefill(q, k, v, *weights, 1e-6, cos, sin, cache_k, cache_v, 1, 1)
        base_k = cache_k.clone()
        for block, warps in [(1, 1)] + list(itertools.product((4, 8, 16, 32), (1, 2, 4, 8))):
            if block * 64 < 32 * warps:  # fewer elements a half than threads
                continue
            cache_k.zero_()
            out = launch_prefill(q, k, v, *weights, 1e-6, cos, sin, cache_k, cache_v, block, warps)
            same = torch.equal(out, base) and torch.equal(cache_k, base_k)
            us = graph_us(lambda: launch_prefill(q, k, v, *weights, 1e-6, cos, sin, cache_k, cache_v, block, warps), 10)
            print(json.dumps({**common, "tokens_per_program": block, "warps": warps, "us": round(us, 2),
                              "baseline": "(1, 1): a program per (token, head), one warp", "equal_to_baseline": same}),
                  flush=True)


if __name__ == "__main__":
    main()
