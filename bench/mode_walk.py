"""What ``BuiltinEngine.generate`` spends on setting the modules' training flags, on the CPU.

A Qwen3-shaped model of 28 layers (small widths: the walk depends on the module count, not the
sizes) with LoRA r16 on every linear, 790 modules. Per call, median of 200 after a warm-up: finding
the modules in training mode (``engine.training_modules``) and setting their flags off and back on
(``engine.set_training``), with ``engine.QUICK_MODES`` on against off (``Module.modules()`` and
``setattr``, the baseline), in one process; the model in training mode (as the RL loop's is) and in
eval mode (as a served or benchmarked one is).
    python -m bench.mode_walk
"""

from __future__ import annotations

import json
import platform
import statistics
import time

import torch

from orbit_core.models.config import DecoderConfig
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.lora import apply_lora
from orbit_core.rollout import engine


def per_call_ms(fn, calls: int = 200) -> float:
    fn()
    times = []
    for _ in range(calls):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return 1e3 * statistics.median(times)


def main() -> None:
    model = DecoderLM(DecoderConfig("qwen3", 1000, 64, 128, 28, 4, 2, 16, qk_norm=True))
    apply_lora(model, 16, 32, 0.0, ["all-linear"])
    modules = sum(1 for _ in model.modules())
    for mode in ("train", "eval"):
        model.train(mode == "train")
        for quick in (False, True):
            engine.QUICK_MODES = quick
            found = engine.training_modules(model)
            row = {"bench": "mode_walk", "model_mode": mode, "quick_modes": quick, "modules": modules,
                   "training_modules": len(found),
                   "find_ms": round(per_call_ms(lambda: engine.training_modules(model)), 4),
                   "set_off_and_on_ms": round(per_call_ms(lambda: (engine.set_training(found, False),
                                                                   engine.set_training(found, True))), 4),
                   "baseline": "quick_modes false (Module.modules() and setattr)",
                   "cpu": platform.processor() or platform.machine(), "torch": torch.__version__}
            print(json.dumps(row), flush=True)
    engine.QUICK_MODES = True


if __name__ == "__main__":
    main()
