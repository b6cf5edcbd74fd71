"""``orbit::dense_gemv`` against cuBLAS (``F.linear``) on the Qwen3-1.7B lm_head, per launch setting.

A 151,936 x 2,048 bf16 weight (622 MB, past L2) at 1, 2 and 4 rows; ten calls a CUDA graph, the
microseconds a call; cuBLAS first, in the same process, then each setting of the kernel (output
rows a program, the widest K step, warps) with its largest error against the fp32 product.
    python -m bench.dense_gemv [--rows 1 2 4]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch
import torch.nn.functional as F

from bench.int4_linear import graph_us
from orbit_kernels import dense_gemv


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="*", type=int, default=[1, 2, 4])
    parser.add_argument("--vocab", type=int, default=151936)
    parser.add_argument("--hidden", type=int, default=2048)
    args = parser.parse_args()
    torch.manual_seed(0)
    w = (torch.randn(args.vocab, args.hidden, device="cuda") * 0.02).to(torch.bfloat16)
    defaults = (dense_gemv.BLOCK_N, dense_gemv.BLOCK_K, dense_gemv.WARPS)
    for rows in args.rows:
        x = torch.randn(rows, args.hidden, device="cuda").to(torch.bfloat16)
        exact = x.float() @ w.float().t()
        common = {"bench": "dense_gemv", "rows": rows, "vocab": args.vocab, "hidden": args.hidden,
                  "device": torch.cuda.get_device_name(), "torch": torch.__version__}
        us = graph_us(lambda: F.linear(x, w), 10)
        print(json.dumps({**common, "kernel": "cublas", "us": round(us, 2),
                          "max_err": (F.linear(x, w).float() - exact).abs().max().item()}), flush=True)
        for block_n, block_k, warps in itertools.product((8, 16, 32), (1024, 2048), (4, 8)):
            dense_gemv.BLOCK_N, dense_gemv.BLOCK_K, dense_gemv.WARPS = block_n, block_k, warps
            us = graph_us(lambda: dense_gemv.launch(x, w), 10)
            err = (dense_gemv.launch(x, w).float() - exact).abs().max().item()
            print(json.dumps({**common, "kernel": "dense_gemv", "block_n": block_n, "block_k": block_k,
                              "warps": warps, "us": round(us, 2), "max_err": err}), flush=True)
        dense_gemv.BLOCK_N, dense_gemv.BLOCK_K, dense_gemv.WARPS = defaults


if __name__ == "__main__":
    main()
