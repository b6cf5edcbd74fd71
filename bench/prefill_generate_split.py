"""Where a batch-1, one-token generate goes: the prefill graph, and the host work around it.

A 128-token prompt on the Qwen3-1.7B shape, ``max_new_tokens=1``, after warm-ups (its prefill
graph captured). Per base and adapter: the wall time (median of 9), and for the int4 + LoRA base
the same with one decode switch off at a time (``--ablate``, as ``bench.decode_throughput`` names
them), all in one process. For the default settings (and ``--traced`` switches) it profiles one
generate, writes its Chrome trace and splits it (``split``): the captured prefill's span, from its
first kernel to the lm_head's end, against the GPU time before it (the admit) and after it (the
first token's sampling and bookkeeping), where the host works and the GPU mostly waits; and the
LoRA expand's mean time beside the dequantize-ahead stream's kernels against alone (``beside``).
    python -m bench.prefill_generate_split [--ablate dequant_ahead pdl ...] [--traced dequant_ahead pdl]
"""

from __future__ import annotations

import argparse
import gc
import json
import statistics
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.decode_throughput import ROUND_KERNELS, build_model
from bench.generate_timeline import gpu_events, is_lm_head, union_us
from bench.rollout_throughput import SHAPES, NoEosTokenizer, timed
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams


def split(trace_path: str) -> dict:
    """The trace's GPU events: the prefill graph's span (an index kernel ``arange`` starts the
    forward, the lm_head's kernel ends it: cuBLAS's ``384x8`` or ``orbit::dense_gemv``), its busy
    time (the union of its kernels), and the GPU time before and after it in the generate."""
    events = gpu_events(json.load(open(trace_path))["traceEvents"])
    names = [e["name"] for e in events]
    first = min(i for i, n in enumerate(names) if "arang" in n)
    last = max(i for i, n in enumerate(names) if is_lm_head(n))
    graph = events[first:last + 1]
    busy = union_us([(e["ts"], e["ts"] + e["dur"]) for e in graph])
    end = graph[-1]["ts"] + graph[-1]["dur"]
    return {"graph_span_ms": round((end - graph[0]["ts"]) / 1e3, 2), "graph_busy_ms": round(busy / 1e3, 2),
            "graph_kernels": len(graph), "before_ms": round((graph[0]["ts"] - events[0]["ts"]) / 1e3, 2),
            "after_ms": round((max(e["ts"] + e["dur"] for e in events) - end) / 1e3, 2)}


def beside(trace_path: str, name: str = "_expand_tiles_kernel", other: str = "_dequant_tiles_kernel") -> dict:
    """Mean duration of the ``name`` kernels that overlap an ``other`` kernel (the dequantize-ahead
    side stream's) against those that do not."""
    events = [e for e in json.load(open(trace_path))["traceEvents"] if e.get("ph") == "X" and e.get("cat") == "kernel"]
    others = [(e["ts"], e["ts"] + e["dur"]) for e in events if e["name"] == other]
    overlapped, alone = [], []
    for e in events:
        if e["name"] == name:
            hit = any(lo < e["ts"] + e["dur"] and e["ts"] < hi for lo, hi in others)
            (overlapped if hit else alone).append(e["dur"])
    mean = lambda xs: round(sum(xs) / len(xs), 2) if xs else None
    return {f"{name}_beside_{other}_us": mean(overlapped), f"{name}_beside_count": len(overlapped),
            f"{name}_alone_us": mean(alone), f"{name}_alone_count": len(alone)}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--ablate", nargs="*", default=["dequant_ahead", "pdl", "lora_tiles", "prefill_graphs"],
                        choices=sorted(ROUND_KERNELS))
    parser.add_argument("--traced", nargs="*", default=["dequant_ahead", "pdl"], choices=sorted(ROUND_KERNELS))
    parser.add_argument("--out", default=tempfile.mkdtemp(), help="folder for the Chrome traces")
    args = parser.parse_args()
    shape = SHAPES["qwen3-1.7b"]
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    quantize_checkpoint(str(root / "bf16"), str(root / "int4"), "int4", group_size=128, device="cuda")
    prompts = torch.randint(10, shape["vocab_size"], (1, 128), generator=torch.Generator().manual_seed(1)).tolist()
    defaults = {n: getattr(m, a) for n, (m, a) in ROUND_KERNELS.items()}
    one = SamplingParams(max_new_tokens=1, temperature=1.0)
    for base, adapter in [("int4", "lora"), ("int4", "none"), ("bf16", "lora")]:
        model = build_model(str(root / base), adapter)
        runs = [None] + (args.ablate + [None] if (base, adapter) == ("int4", "lora") else [])
        for off in runs:
            for name, (module, attr) in ROUND_KERNELS.items():
                setattr(module, attr, (not defaults[name]) if name == off else defaults[name])
            engine = BuiltinEngine(model, NoEosTokenizer(), max_running=1, seed=0)
            for _ in range(3):  # the prefill shape is captured the second time it comes
                engine.generate(prompts, one)
            ms = 1e3 * statistics.median([timed(lambda: engine.generate(prompts, one)) for _ in range(9)])
            row = {"bench": "prefill_generate_split", "base": base, "adapter": adapter, "off": off,
                   "one_token_generate_ms": round(ms, 3), "baseline": "the library's settings (off: null)",
                   "device": torch.cuda.get_device_name(), "torch": torch.__version__}
            if off is None or off in args.traced:
                with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
                    engine.generate(prompts, one)
                    torch.cuda.synchronize()
                path = str(Path(args.out) / f"prefill_{base}_{adapter}_{off or 'default'}.json")
                prof.export_chrome_trace(path)
                row.update(split(path), **beside(path))
            print(json.dumps(row), flush=True)
            engine = None
            gc.collect()
            torch.cuda.empty_cache()
        for name, (module, attr) in ROUND_KERNELS.items():
            setattr(module, attr, defaults[name])
        del model
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
