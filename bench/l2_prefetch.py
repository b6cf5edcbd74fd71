"""What a weight prefetched into L2 saves the packed GEMV at one row (``orbit::l2_prefetch``).

Each timed iteration of a CUDA graph is a busy-wait kernel (``torch.cuda._sleep``, standing in for
the small kernels between two GEMVs of a decode step), then the int4 packed GEMV of one linear of
the Qwen3-1.7B shape, the weights cycled through enough copies to pass the L2 cache. Modes, one
process: ``cold`` (nothing prefetched, the baseline), ``prefetched`` (the GEMV's codes and scales
asked for before the wait), ``hot`` (one copy only: the weights stay in L2, the ceiling) and
``wait`` (the busy wait alone, subtracted from the others to give the GEMV's own time).
    python -m bench.l2_prefetch [--sleep-cycles 40000]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.int4_linear import L2_BYTES, graph_us, random_packed
from orbit_kernels import l2_prefetch, packed_gemv

SHAPES = {"qkv": (4096, 2048), "o": (2048, 2048), "gate_up": (12288, 2048), "down": (2048, 6144)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sleep-cycles", type=int, default=40000)
    parser.add_argument("--calls", type=int, default=40)
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    wait = graph_us(lambda: torch.cuda._sleep(args.sleep_cycles), args.calls)
    print(json.dumps({"bench": "l2_prefetch", "mode": "wait", "us": round(wait, 2), "device": device}), flush=True)
    for name, (n, k) in SHAPES.items():
        copies = [random_packed(n, k, 128) for _ in range(max(2, -(-4 * L2_BYTES // (n * k // 2))))]
        x = torch.randn(1, k, dtype=torch.bfloat16, device="cuda")
        for mode in ("cold", "prefetched", "hot", "cold"):
            turn = itertools.count()

            def step() -> None:
                words, scale = copies[0 if mode == "hot" else next(turn) % len(copies)]
                if mode == "prefetched":
                    l2_prefetch.l2_prefetch([words, scale])
                torch.cuda._sleep(args.sleep_cycles)
                packed_gemv.packed_gemv("int4", x, words, scale, k)

            us = graph_us(step, args.calls)
            print(json.dumps({"bench": "l2_prefetch", "linear": name, "out": n, "in": k, "mode": mode,
                              "us": round(us, 2), "gemv_us": round(us - wait, 2),
                              "weight_mb": round(n * k / 2 / 1e6, 2), "device": device}), flush=True)


if __name__ == "__main__":
    main()
