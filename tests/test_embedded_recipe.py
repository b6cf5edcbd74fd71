"""The README's main command, end to end: the embedded default learns (slow; runs in CI)."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_cli import run


@pytest.mark.slow
def test_tiny_arith_lora_raises_accuracy_by_15_points(tmp_path):
    start = time.monotonic()
    out = run("train", "--recipe", "tiny-arith-lora", f"train.output_dir={tmp_path / 'run'}",
              env_extra={"ORBIT_CACHE": str(tmp_path / "cache")}, timeout=900)
    wall_s = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    before, after = report["before"]["greedy_accuracy"], report["after"]["greedy_accuracy"]
    print(f"tiny-arith-lora: greedy accuracy {before:.3f} -> {after:.3f} in {wall_s:.0f}s")
    assert after - before >= 0.15
    assert wall_s < 600
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    assert (tmp_path / "cache" / "tiny-arith" / "model-w1500" / "model.safetensors").is_file()
    # the cached base is a real HF checkpoint: transformers reads it back
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(tmp_path / "cache" / "tiny-arith" / "model-w1500"))
    assert model.config.model_type == "qwen3"
