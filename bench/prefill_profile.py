"""Where a prefill's time goes: a 1-token generate (the prefill and its one sampled token) of the
builtin engine, profiled twice: Python functions by cProfile (host cost), then ops and kernels by
the torch profiler (host and GPU). Random weights in the Qwen3-1.7B shape, 128-token prompts.
Wall times first: 3 timed generates after 2 warm-ups.
    python -m bench.prefill_profile int4:lora:1 bf16:lora:256   (BASE:ADAPTER:BATCH ...)
"""

from __future__ import annotations

import cProfile
import gc
import io
import pstats
import sys
import tempfile
from pathlib import Path

import torch

from bench.base_memory import write_random_checkpoint
from bench.decode_throughput import build_model
from bench.rollout_throughput import SHAPES, NoEosTokenizer, timed
from orbit_core.quant import quantize_checkpoint
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams


def main() -> None:
    shape = SHAPES["qwen3-1.7b"]
    root = Path(tempfile.mkdtemp())
    write_random_checkpoint(root / "bf16", shape)
    paths = {"bf16": str(root / "bf16"), "int4": str(root / "int4")}
    quantize_checkpoint(paths["bf16"], paths["int4"], "int4", group_size=128, device="cuda")
    gen = torch.Generator().manual_seed(1)
    prompts = torch.randint(10, shape["vocab_size"], (256, 128), generator=gen).tolist()
    one = SamplingParams(max_new_tokens=1, temperature=1.0)
    for spec in sys.argv[1:]:
        base, adapter, batch = spec.split(":")
        batch = int(batch)
        model = build_model(paths[base], adapter)
        engine = BuiltinEngine(model, NoEosTokenizer(), max_running=batch, seed=0)
        run = lambda: engine.generate(prompts[:batch], one)  # noqa: E731
        for _ in range(2):
            run()
        walls = [timed(run) for _ in range(3)]
        print(f"== {spec}: 1-token generate {[round(1e3 * w, 1) for w in walls]} ms", flush=True)
        profiler = cProfile.Profile()
        profiler.enable()
        run()
        torch.cuda.synchronize()
        profiler.disable()
        text = io.StringIO()
        pstats.Stats(profiler, stream=text).sort_stats("tottime").print_stats(25)
        print(text.getvalue()[-6000:])
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            run()
            torch.cuda.synchronize()
        print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
        print(prof.key_averages().table(sort_by="self_cuda_time_total", row_limit=15, max_name_column_width=60))
        engine = model = run = None  # free them before the next spec
        gc.collect()
        torch.cuda.empty_cache()


if __name__ == "__main__":
    main()
