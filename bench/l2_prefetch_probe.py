"""Does ``orbit::l2_prefetch`` put a weight in L2, and how much faster is the one-row GEMV then?

One JSON line per (linear, case): microseconds of one int4 GEMV at one row (``orbit::int4_linear``,
the library's plan), each from CUDA-graph replays of 20 rounds, less the same rounds without the
GEMV. Every round first writes a 128 MB buffer, which leaves none of the weight in L2. Cases, all
in one process:
- ``cold``: the GEMV after a spin of ``--spin-us`` (what it meets in a decode step);
- ``prefetched``: the prefetch of its weight and scales, then the spin, then the GEMV, for each
  way of asking (``--ways``: bulk-copy requests, one 128-byte line a thread or plain loads, and request size);
- ``hot``: the GEMV run once, then timed again (its weight is in L2: the bound for a prefetch).
    python -m bench.l2_prefetch_probe [--spin-us 30] [--ways bulk:262144 lines:262144]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.int4_linear import random_packed, replay_ms
from orbit_kernels import l2_prefetch
from orbit_kernels.int4 import int4_linear

SHAPES = {"gate_up": (12288, 2048), "down": (2048, 6144), "qkv": (4096, 2048), "o": (2048, 2048)}
ROUNDS = 20


def round_us(steps) -> float:
    """Microseconds one round of ``steps`` takes, from a graph of ``ROUNDS`` rounds."""
    for step in steps:
        step()
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for _ in range(ROUNDS):
            for step in steps:
                step()
    graph.replay()
    return min(replay_ms(graph, 3) for _ in range(5)) * 1e3 / ROUNDS


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--spin-us", type=float, default=30.0)
    parser.add_argument("--ways", nargs="+", default=["bulk:4096", "bulk:16384", "bulk:65536", "bulk:262144",
                                                      "lines:16384", "lines:262144", "loads:262144", "loads:1048560"],
                        help="bulk|lines|loads:REQUEST_BYTES")
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    flush_buffer = torch.zeros(32 << 20, device="cuda")  # 128 MB, over twice the L2

    def flush():
        flush_buffer.add_(1.0)

    cycles = int(args.spin_us * 1e-6 * torch.cuda.get_device_properties(0).clock_rate * 1e3)

    def spin():
        torch.cuda._sleep(cycles)

    for name, (n, k) in SHAPES.items():
        torch.manual_seed(0)
        packed, scale = random_packed(n, k, 128)
        x = torch.randn(1, k, device="cuda", dtype=torch.bfloat16)

        def gemv():
            int4_linear(x, packed, scale, k)

        cases = {"cold": (None, [flush, spin, gemv], [flush, spin]), "hot": (None, [flush, gemv, gemv], [flush, gemv])}
        for way in args.ways:
            mode, chunk = way.split(":")
            ranges = l2_prefetch.ranges_tensor([packed, scale], x.device, int(chunk))

            def prefetch(ranges=ranges, mode=mode):
                l2_prefetch.MODE = mode
                l2_prefetch.launch(ranges)

            cases[f"prefetched {way}"] = ({"mode": mode, "request_bytes": int(chunk)},
                                          [flush, prefetch, spin, gemv], [flush, prefetch, spin])
        for case, (way, with_gemv, without) in cases.items():
            us = round_us(with_gemv) - round_us(without)
            print(json.dumps({"bench": "l2_prefetch_probe", "linear": name, "n": n, "k": k,
                              "case": case.split()[0], **({"prefetch": way} if way else {}), "spin_us": args.spin_us,
                              "weight_mb": round((packed.numel() * 4 + scale.numel() * 2) / 1e6, 2),
                              "gemv_us": round(us, 2), "device": device}), flush=True)
        l2_prefetch.MODE = "bulk"


if __name__ == "__main__":
    main()
