"""Launch settings of the split-K decode attention, timed a whole step's worth of layers at a time.

One JSON line per (shape, setting). Each timing is a CUDA graph of one launch per layer, each on
its own layer's cache (so, as in a decode step, no layer finds its keys in L2), replayed 20 times;
``us_per_layer`` is the replay over the layers. The cache bytes a row reads are its live keys and
values; ``kv_gb_s`` is those bytes over the time. Baselines in the same process: the launch of the
round before (``Config()``: chunks of 256, 4 warps, one stage) and the reference, masked SDPA over
the whole capacity (what runs without the kernel). The last line per shape is ``launch_config``'s
choice. ``launch_config`` was set from ``bench/results/decode_attention_sweep_h200.jsonl`` (run
before the choice existed, so without that line).
    python -m bench.decode_attention_sweep [--shapes 1:192:288 32:192:288 256:192:288]
"""

from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.int4_linear import replay_ms
from orbit_kernels import decode_attention as attention


def time_step(fn, layers: list[tuple[torch.Tensor, torch.Tensor]]) -> float:
    """Microseconds per layer of ``fn(k, v)`` over every layer's cache, from graph replays."""
    for k, v in layers[:2]:
        fn(k, v)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for k, v in layers:
            fn(k, v)
    graph.replay()
    return 1e3 * replay_ms(graph, 20) / len(layers)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", nargs="+", default=["1:192:288", "32:192:288", "256:192:288", "1:1984:2080",
                                                        "32:1984:2080"],
                        help="ROWS:KEYS:CAPACITY (keys each row reads; the cache's positions)")
    parser.add_argument("--layers", type=int, default=28)
    parser.add_argument("--heads", type=int, default=16)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--chunks", nargs="+", type=int, default=[32, 64, 128, 256])
    parser.add_argument("--block-n", nargs="+", type=int, default=[32, 64])
    parser.add_argument("--warps", nargs="+", type=int, default=[2, 4, 8])
    parser.add_argument("--stages", nargs="+", type=int, default=[1, 2, 3])
    args = parser.parse_args()
    device = torch.cuda.get_device_name()
    for spec in args.shapes:
        rows, keys, capacity = (int(x) for x in spec.split(":"))
        torch.manual_seed(0)
        q = torch.randn(rows, args.heads, args.dim, device="cuda", dtype=torch.bfloat16)
        layers = [(torch.randn(rows, args.kv_heads, capacity, args.dim, device="cuda", dtype=torch.bfloat16),
                   torch.randn(rows, args.kv_heads, capacity, args.dim, device="cuda", dtype=torch.bfloat16))
                  for _ in range(args.layers)]
        lengths = torch.full((rows,), keys - 1, device="cuda")
        kv_bytes = 2 * rows * args.kv_heads * keys * args.dim * 2
        reference = attention.decode_attention_reference(q, *layers[0], lengths)

        def report(setting: dict, us: float) -> None:
            print(json.dumps({"bench": "decode_attention_sweep", "rows": rows, "keys": keys, "capacity": capacity,
                              "heads": args.heads, "kv_heads": args.kv_heads, "dim": args.dim, **setting,
                              "us_per_layer": round(us, 2), "kv_gb_s": round(kv_bytes / us / 1e3, 1),
                              "device": device}), flush=True)

        report({"impl": "reference (masked SDPA over the capacity)"},
               time_step(lambda k, v: attention.decode_attention_reference(q, k, v, lengths), layers))
        settings = [attention.Config()]
        settings += [attention.Config(c, b, w, s) for c, b, w, s in itertools.product(
            args.chunks, args.block_n, args.warps, args.stages) if b <= c and attention.Config(c, b, w, s) != settings[0]]
        settings.append(attention.launch_config(rows, args.kv_heads, capacity))
        for i, config in enumerate(settings):
            out = attention.launch(q, *layers[0], lengths, config)
            error = (out.float() - reference.float()).abs().max().item()
            assert error < 5e-2, (config, error)
            us = time_step(lambda k, v: attention.launch(q, k, v, lengths, config), layers)
            role = "baseline: the launch of the round before" if i == 0 else (
                "launch_config" if i == len(settings) - 1 else "candidate")
            report({"impl": "kernel", "role": role, "chunk": config.chunk, "block_n": config.block_n,
                    "warps": config.warps, "stages": config.stages, "max_abs_error": round(error, 4)}, us)


if __name__ == "__main__":
    main()
