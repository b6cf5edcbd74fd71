"""One base call's LoRA at decode rows, per call of a Qwen3-1.7B layer (q/k/v, o, gate/up, down; LoRA
r16, one slot), each timed in a CUDA graph of ten back-to-back calls: the cuBLAS GEMM on ``x`` and
``W`` and on the extended ``[x | t]`` and ``[W | sB]`` (``orbit_kernels.lora_concat``), the tile
kernels' shrink and expand together (``lora_tiles``), the extra columns' fill, and the concat shrink
(default launch, and the best of a sweep of row tile, split, inner tile and warps), one JSON line each.
    python -m bench.lora_concat_calls
"""
import itertools
import json

import torch
import torch.nn.functional as F

from orbit_kernels import lora_concat as lc, lora_tiles
from bench.int4_linear import replay_ms


def graph_ms(fn, reps=50):
    """Microseconds a call: ten calls captured in one graph, replayed ``reps`` times."""
    s = torch.cuda.Stream(); s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn(); fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        for _ in range(10): fn()
    for _ in range(3): g.replay()
    return replay_ms(g, reps) / 10 * 1e3  # us per call


DEV = "cuda"
shapes = {"qkv": (2048, [2048, 1024, 1024]), "o": (2048, [2048]), "gate_up": (2048, [6144, 6144]), "down": (6144, [2048])}
for rows in (64, 256):
    for name, (k, widths) in shapes.items():
        g, r, slots = len(widths), 16, 1
        stacked = torch.randn(slots, g * r, k, device=DEV) * 0.05
        as_ = [stacked[:, i * r:(i + 1) * r] for i in range(g)]
        bs = [torch.randn(slots, n, r, device=DEV) * 0.05 for n in widths]
        n = sum(widths)
        x = torch.randn(rows, k, device=DEV, dtype=torch.bfloat16)
        w = torch.randn(n, k, device=DEV, dtype=torch.bfloat16)
        c = lc.extra_columns(k, g, slots, r)
        x_ext = torch.empty(rows, k + c, device=DEV, dtype=torch.bfloat16)
        w_ext = torch.empty(n, k + c, device=DEV, dtype=torch.bfloat16); w_ext[:, :k] = w
        y = torch.empty(rows, n, device=DEV, dtype=torch.bfloat16)
        ys = list(y.split(widths, dim=1))
        row = {"rows": rows, "call": name}
        row["gemm_us"] = graph_ms(lambda: F.linear(x, w))
        row["gemm_ext_us"] = graph_ms(lambda: F.linear(x_ext, w_ext))
        row["gemm_ext_strided_base_us"] = graph_ms(lambda: F.linear(x, w_ext[:, :k]))
        row["tiles_us"] = graph_ms(lambda: lora_tiles.launch_tile_groups(ys, x, as_, bs, None, 2.0))
        row["fill_us"] = graph_ms(lambda: lc.launch_fill(w_ext, k, bs, 2.0))
        best = None
        for bm, split, bk, nw in itertools.product((16, 32, 64), (1, 2, 4, 8, 16), (64, 128), (4, 8)):
            if split * bk > k: continue
            try:
                t = graph_ms(lambda: lc.launch_shrink(x_ext, x, as_, None, split, bm, bk, nw), 20)
            except Exception:  # a configuration Triton cannot build for this shape
                continue
            if best is None or t < best[0]: best = (t, bm, split, bk, nw)
        row["shrink_default_us"] = graph_ms(lambda: lc.launch_shrink(x_ext, x, as_, None))
        row["shrink_best"] = best
        print(json.dumps({k2: (round(v, 2) if isinstance(v, float) else v) for k2, v in row.items()}), flush=True)
