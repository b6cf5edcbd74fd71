"""The sampling kernel's time by vocabulary spans per row, one JSON line per (rows, spans).

``orbit_kernels.sampling.launch`` (the counted form a decode step runs) on random bf16 logits of a
152k vocabulary, 20 calls captured in a CUDA graph (``bench.int4_linear.graph_us``): microseconds a
call. (``sample_race_splits_h100.jsonl`` was made by the same graph replayed 10 times, not 5.) The
baseline in the same process is the rule before (``rule_before``: at most 4 blocks of 1,024 tokens
a span and 512 programs), beside the library's ``splits_for`` and a few fixed counts.
    python -m bench.sample_race_splits [--rows 1 4 8 32 256]
"""

from __future__ import annotations

import argparse
import json

import torch

from bench.int4_linear import graph_us
from orbit_kernels import sampling
from orbit_kernels._triton import triton

VOCAB, BLOCK_V = 151936, 1024


def rule_before(rows: int) -> int:
    return max(1, min(triton.cdiv(VOCAB, 4 * BLOCK_V), triton.cdiv(512, rows)))


def us_per_call(logits: torch.Tensor, state: torch.Tensor, splits: int) -> float:
    return graph_us(lambda: sampling.launch(logits, 1.0, state, block_v=BLOCK_V, splits=splits, counted=True), 20)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--rows", nargs="+", type=int, default=[1, 4, 8, 32, 256])
    args = parser.parse_args()
    for rows in args.rows:
        logits = torch.randn(rows, VOCAB, device="cuda").to(torch.bfloat16)
        state = torch.tensor([123, 0], device="cuda")
        named = {"rule_before": rule_before(rows), "splits_for": sampling.splits_for(rows, VOCAB, BLOCK_V)}
        for splits in (16, 64, triton.cdiv(VOCAB, 2 * BLOCK_V), triton.cdiv(VOCAB, BLOCK_V)):
            named.setdefault(f"fixed {splits}", splits)
        for name, splits in named.items():
            # spans are whole blocks: the launch rounds the asked count to the spans it makes
            span = triton.cdiv(triton.cdiv(VOCAB, splits), BLOCK_V) * BLOCK_V
            print(json.dumps({"bench": "sample_race_splits", "rows": rows, "vocab": VOCAB, "rule": name,
                              "spans": triton.cdiv(VOCAB, span), "us_per_call": round(us_per_call(logits, state, splits), 2),
                              "baseline": "rule_before", "device": torch.cuda.get_device_name(),
                              "torch": torch.__version__}), flush=True)


if __name__ == "__main__":
    main()
