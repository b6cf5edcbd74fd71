"""The int4 packed GEMV of one linear, launched a few times on weights cycled past L2, for Nsight
Compute to read the hardware counters of one launch (no timing here):

    ncu --clock-control none -k regex:_packed_gemv --launch-skip 10 --launch-count 1 \\
        --section SpeedOfLight --section WarpStateStats --section SchedulerStats --section LaunchStats \\
        --section Occupancy --section InstructionStats --section MemoryWorkloadAnalysis --section SourceCounters \\
        python -m bench.packed_gemv_once OUT IN ROWS

``bench/results/packed_gemv_ncu_{gate_up,down,qkv}_h100.txt`` are its reports at one row for the
Qwen3-1.7B shape's fused gate/up (12288 2048), down (2048 6144) and fused q/k/v (4096 2048).
"""

from __future__ import annotations

import sys

import torch

from bench.int4_linear import random_packed
from orbit_kernels import packed_gemv


def main() -> None:
    n, k, rows = (int(a) for a in sys.argv[1:4])
    copies = [random_packed(n, k, 128) for _ in range(8)]
    x = torch.randn(rows, k, dtype=torch.bfloat16, device="cuda")
    for i in range(16):
        packed_gemv.packed_gemv("int4", x, *copies[i % len(copies)], k)
    torch.cuda.synchronize()
    print("plan", packed_gemv.plan("int4", rows, -(-n // packed_gemv.BLOCK_N), k // packed_gemv.layout(
        "int4", copies[0][1], k)[0]))


if __name__ == "__main__":
    main()
