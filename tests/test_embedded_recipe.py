"""The README's main command, end to end: the embedded default learns (slow; runs in CI)."""

from __future__ import annotations

import json
import time

import pytest

from tests.test_cli import run


@pytest.fixture(scope="module")
def shared_cache(tmp_path_factory):
    """The warm-started embedded model, built by the first test and reused by the async one."""
    return tmp_path_factory.mktemp("orbit-cache")


def train_recipe(recipe: str, tmp_path, cache, *overrides: str) -> tuple[float, float, float]:
    """Run ``orbit train --recipe`` as a user does -> (greedy accuracy before, after, wall seconds)."""
    start = time.monotonic()
    out = run("train", "--recipe", recipe, f"train.output_dir={tmp_path / 'run'}", *overrides,
              env_extra={"ORBIT_CACHE": str(cache)}, timeout=900)
    wall_s = time.monotonic() - start
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "run" / "eval_report.json").read_text())
    before, after = report["before"]["greedy_accuracy"], report["after"]["greedy_accuracy"]
    print(f"{recipe}: greedy accuracy {before:.3f} -> {after:.3f} in {wall_s:.0f}s")
    return before, after, wall_s


def metric_rows(tmp_path) -> list[dict]:
    return [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
def test_tiny_arith_lora_raises_accuracy_by_15_points(tmp_path, shared_cache):
    before, after, wall_s = train_recipe("tiny-arith-lora", tmp_path, shared_cache)
    assert after - before >= 0.15
    assert wall_s < 600
    assert (tmp_path / "run" / "reward_curve.png").is_file()
    assert (shared_cache / "tiny-arith" / "model-w1500" / "model.safetensors").is_file()
    # the cached base is a real HF checkpoint: transformers reads it back
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(str(shared_cache / "tiny-arith" / "model-w1500"))
    assert model.config.model_type == "qwen3"


@pytest.mark.slow
def test_async_recipe_raises_accuracy_with_bounded_staleness(tmp_path, shared_cache):
    before, after, _ = train_recipe("tiny-arith-lora-async", tmp_path, shared_cache)
    assert after - before >= 0.15
    rows = metric_rows(tmp_path)
    steps = [r for r in rows if "time/step_s" in r]
    assert len(steps) == 60
    assert all(r["staleness/max"] <= 1 for r in steps) and any(r["staleness/max"] == 1 for r in steps)
    assert all(0 < r["sync/bytes"] < r["sync/full_weight_bytes"] / 2 for r in steps)  # rank 16 is large for a tiny model


@pytest.mark.slow
def test_async_recipe_on_ray_with_two_engine_actors_learns(tmp_path, shared_cache):
    before, after, _ = train_recipe("tiny-arith-lora-async", tmp_path, shared_cache, "train.orchestrator=ray",
                                    "rollout.num_engines=2")
    assert after - before >= 0.15
    rows = metric_rows(tmp_path)
    steps = [r for r in rows if "time/step_s" in r]
    assert len(steps) == 60 and all(r["staleness/max"] <= 1 for r in steps)
    assert all(r["engine0/tokens_per_s"] > 0 and r["engine1/tokens_per_s"] > 0 for r in steps)


@pytest.mark.slow
def test_default_recipe_on_the_megatron_backend_learns(tmp_path, shared_cache):
    before, after, _ = train_recipe("tiny-arith-lora", tmp_path, shared_cache, "train.backend=megatron",
                                    "preflight.runtime=true")
    assert after - before >= 0.15
    rows = metric_rows(tmp_path)
    assert rows[0]["preflight/implementations"] == "Orbit builtin engine (in process) vs megatron-core GPTModel"
    assert rows[0]["preflight/max_logprob_abs_diff"] < 1e-3


@pytest.mark.own_model
@pytest.mark.slow
def test_moe_recipe_builds_its_model_and_learns(tmp_path, shared_cache):
    before, after, wall_s = train_recipe("tiny-arith-moe-lora", tmp_path, shared_cache)  # the MoE model is built here
    assert after - before >= 0.15
    assert wall_s < 600
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(str(shared_cache / "tiny-arith" / "model-moe-w1500"))
    assert config.model_type == "qwen3_moe"
