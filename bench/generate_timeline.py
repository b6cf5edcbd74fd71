"""Where a whole generate's time goes on the GPU's timeline, at batch 1 by default.

The Qwen3-1.7B shape, 128-token prompts, ``--new`` sampled tokens, after the warm-ups that
``bench.decode_throughput`` runs. Per base and adapter: the wall time of a generate (median of 5,
no profiler), then one generate traced (CPU and CUDA activity) and cut into parts (``timeline``):
the host's work before the first kernel, the prefill (its first kernel to the end of its lm_head),
the decode after it (its span, the union of its kernels, the GPU's idle time inside it and the
largest gaps with the kernels around them), and the host's work after the last kernel. The
profiler slows the host, so those parts are upper bounds; the wall time is the figure that counts.
``--host`` also prints cProfile's top functions for one untraced generate.
    python -m bench.generate_timeline [--bases int4 bf16] [--adapters lora] [--batch 1] [--new 128] [--host]
"""

from __future__ import annotations

import argparse
import cProfile
import gc
import json
import pstats
import statistics
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.decode_throughput import build_model
from bench.rollout_throughput import SHAPES, NoEosTokenizer, timed
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams

MARK = "orbit_generate"
LM_HEAD = ("384x8", "_dense_gemv_kernel")  # the lm_head: cuBLAS's few-row kernel at this shape, or orbit's


def union_us(spans: list[tuple[float, float]]) -> float:
    """The length of the union of ``(start, end)`` spans: the time a stream of kernels kept the GPU busy."""
    busy, hi = 0.0, float("-inf")
    for lo, end in sorted(spans):
        if end > hi:
            busy += end - max(lo, hi)
            hi = end
    return busy


def gpu_events(events: list[dict]) -> list[dict]:
    """A Chrome trace's kernels, copies and fills, in start order."""
    return sorted((e for e in events if e.get("ph") == "X" and e.get("cat") in ("kernel", "gpu_memcpy", "gpu_memset")),
                  key=lambda e: e["ts"])


def is_lm_head(name: str) -> bool:
    return any(head in name for head in LM_HEAD)


def _marked(trace_path: str) -> tuple[dict, list[dict]]:
    """The ``MARK`` annotation (the generate) and the GPU events that start inside it."""
    events = json.load(open(trace_path))["traceEvents"]
    mark = next(e for e in events if e.get("ph") == "X" and e.get("name") == MARK and e.get("cat") != "gpu_user_annotation")
    return mark, [e for e in gpu_events(events) if mark["ts"] <= e["ts"] <= mark["ts"] + mark["dur"]]


def timeline(trace_path: str, top_gaps: int = 5) -> dict:
    """The generate's parts in ms, from a Chrome trace holding the ``MARK`` annotation."""
    mark, gpu = _marked(trace_path)
    start, stop = mark["ts"], mark["ts"] + mark["dur"]
    heads = [i for i, e in enumerate(gpu) if is_lm_head(e["name"])]
    prefill, decode = gpu[:heads[0] + 1], gpu[heads[0] + 1:]
    end = lambda e: e["ts"] + e["dur"]
    gaps, hi, before = [], float("-inf"), None
    for e in decode:  # idle time: a kernel's start after every earlier kernel's end
        if before is not None and e["ts"] > hi:
            gaps.append((e["ts"] - hi, before["name"][:40], e["name"][:40]))
        if end(e) > hi:
            hi, before = end(e), e
    span = (end(decode[-1]) - decode[0]["ts"]) if decode else 0.0
    busy = union_us([(e["ts"], end(e)) for e in decode])
    last = max(end(e) for e in gpu)
    steps = len(heads) - 1
    return {
        "wall_traced_ms": round(mark["dur"] / 1e3, 3),
        "host_before_ms": round((gpu[0]["ts"] - start) / 1e3, 3),
        "prefill_ms": round((end(prefill[-1]) - prefill[0]["ts"]) / 1e3, 3),
        "prefill_kernels": len(prefill),
        "to_first_step_ms": round((decode[0]["ts"] - end(prefill[-1])) / 1e3, 3) if decode else None,
        "decode_ms": round(span / 1e3, 3), "decode_steps": steps,
        "decode_busy_ms": round(busy / 1e3, 3), "decode_idle_ms": round((span - busy) / 1e3, 3),
        "ms_per_step": round(span / 1e3 / steps, 4) if steps else None,
        "host_after_ms": round((stop - last) / 1e3, 3),
        "largest_gaps_us": [(round(g, 1), a, b) for g, a, b in sorted(gaps, reverse=True)[:top_gaps]],
    }


def prefill_kernels(trace_path: str, top: int = 25) -> list[tuple[float, int, str]]:
    """The prefill's kernels (up to its lm_head) grouped by name: total us, count, name; the largest first."""
    _, gpu = _marked(trace_path)
    first_head = next(i for i, e in enumerate(gpu) if is_lm_head(e["name"]))
    groups: dict[str, list[float]] = {}
    for e in gpu[:first_head + 1]:
        groups.setdefault(e["name"], []).append(e["dur"])
    rows = [(round(sum(d), 1), len(d), name[:90]) for name, d in groups.items()]
    return sorted(rows, reverse=True)[:top]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--bases", nargs="*", default=["int4", "bf16"], choices=["int4", "bf16"])
    parser.add_argument("--adapters", nargs="*", default=["lora"], choices=["lora", "none"])
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--new", type=int, default=128)
    parser.add_argument("--host", action="store_true", help="cProfile's top functions of one generate")
    parser.add_argument("--kernels", action="store_true", help="the prefill's kernels grouped by name")
    parser.add_argument("--out", default=tempfile.mkdtemp(), help="folder for the Chrome traces")
    args = parser.parse_args()
    shape = SHAPES["qwen3-1.7b"]
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    if "int4" in args.bases:
        quantize_checkpoint(str(root / "bf16"), str(root / "int4"), "int4", group_size=128, device="cuda")
    prompts = torch.randint(10, shape["vocab_size"], (args.batch, 128), generator=torch.Generator().manual_seed(1)).tolist()
    params = SamplingParams(max_new_tokens=args.new, temperature=1.0)
    for base in args.bases:
        for adapter in args.adapters:
            model = build_model(str(root / base), adapter)
            engine = BuiltinEngine(model, NoEosTokenizer(), max_running=args.batch, seed=0)
            for _ in range(2):  # graphs captured, the prefill's the second time its shape comes
                engine.generate(prompts, params)
            wall = statistics.median(timed(lambda: engine.generate(prompts, params)) for _ in range(5))
            acts = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
            with torch.profiler.profile(activities=acts) as prof:
                with torch.profiler.record_function(MARK):
                    engine.generate(prompts, params)
                    torch.cuda.synchronize()
            path = str(Path(args.out) / f"generate_{base}_{adapter}_{args.batch}.json")
            prof.export_chrome_trace(path)
            row = {"bench": "generate_timeline", "base": base, "adapter": adapter, "batch": args.batch,
                   "new_tokens": args.new, "wall_ms": round(1e3 * wall, 3), **timeline(path),
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            print(json.dumps(row), flush=True)
            if args.kernels:
                for us, calls, name in prefill_kernels(path):
                    print(f"{us:9.1f} us {calls:4d}x  {name}")
            if args.host:
                profiler = cProfile.Profile()
                profiler.runcall(engine.generate, prompts, params)
                torch.cuda.synchronize()
                pstats.Stats(profiler).sort_stats("tottime").print_stats(20)
            engine = model = None
            gc.collect()
            torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
