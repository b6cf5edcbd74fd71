"""The train loop: checkpoints, atomic writes, resume equals an uninterrupted run, bad rewards."""

from __future__ import annotations

import json

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.train import Callbacks, list_checkpoints, load_adapter, run_training
from tests.helpers import small_recipe


def _quiet(**kw):
    return Callbacks(on_message=lambda m: None, **kw)


def test_resume_after_interrupt_equals_uninterrupted_run(tmp_path, tiny_checkpoint):
    straight = small_recipe(tmp_path / "a", tiny_checkpoint)
    run_training(load_recipe(str(straight)), _quiet())
    adapter_straight, _ = load_adapter(list_checkpoints(str(tmp_path / "a" / "run"))[-1][1])

    crashed = small_recipe(tmp_path / "b", tiny_checkpoint)

    def crash(metrics):
        if metrics["step"] == 3:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run_training(load_recipe(str(crashed)), _quiet(on_step=crash))
    steps = [s for s, _ in list_checkpoints(str(tmp_path / "b" / "run"))]
    assert steps == [2]  # the interrupted step left no partial checkpoint
    result = run_training(load_recipe(str(crashed)), _quiet())
    assert result.steps_done == 4
    adapter_resumed, meta = load_adapter(list_checkpoints(str(tmp_path / "b" / "run"))[-1][1])
    assert meta["peft"]["rank"] == 4
    assert adapter_straight.keys() == adapter_resumed.keys()
    for name in adapter_straight:
        torch.testing.assert_close(adapter_resumed[name], adapter_straight[name], atol=1e-6, rtol=0)
    assert any(adapter_straight[n].abs().sum() > 0 for n in adapter_straight if "lora_B" in n)
    rows = [json.loads(line) for line in (tmp_path / "b" / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4]


def test_keep_last_and_stale_temp_dirs(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 6, "save_interval": 1, "keep_last": 2},
                          eval={"enabled": False})
    stale = tmp_path / "run" / "checkpoints" / ".tmp-step_000009-x"
    stale.mkdir(parents=True)
    result = run_training(load_recipe(str(recipe)), _quiet())
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [5, 6]
    assert not stale.exists()
    assert result.eval_after is None


def test_reward_that_raises_or_hangs_scores_zero_and_run_goes_on(tmp_path, tiny_checkpoint):
    reward_file = tmp_path / "my_reward.py"
    reward_file.write_text(
        "import time\n"
        "def score(prompt, response, label):\n"
        "    if prompt.startswith('1'):\n"
        "        raise RuntimeError('boom')\n"
        "    if prompt.startswith('2'):\n"
        "        time.sleep(30)\n"
        "    return 1.0\n"
    )
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward_file}:score", "reward_timeout_s": 0.3},
                          train={"steps": 2}, eval={"enabled": False})
    result = run_training(load_recipe(str(recipe)), _quiet())
    assert result.steps_done == 2
    errors = sum(m["reward/errors"] for m in result.metrics)
    timeouts = sum(m["reward/timeouts"] for m in result.metrics)
    assert errors + timeouts > 0
    assert any("boom" in m.get("reward/last_error", "") for m in result.metrics) or timeouts > 0


def test_the_loop_builds_its_backends_from_the_registries(tmp_path, tiny_checkpoint, monkeypatch):
    from orbit_core.train import backends

    built = []
    for registry in (backends.TRAINER_BACKENDS, backends.ROLLOUT_BACKENDS):
        for name, factory in list(registry.items()):
            def spy(*args, _factory=factory, _name=name, **kwargs):
                built.append(_name)
                return _factory(*args, **kwargs)
            monkeypatch.setitem(registry, name, spy)
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 1}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), _quiet())
    assert built == ["torch", "builtin"]


def test_keeping_the_engine_cache_through_training_changes_no_result(tmp_path, tiny_checkpoint, monkeypatch):
    """``rollout.keep_cache``: the colocated engine keeps its KV cache while the trainer runs (true),
    or gives it back (false; ``auto`` on a CPU). The runs are otherwise the same, step for step."""
    from orbit_core.train import backends
    from orbit_core.train.rollout_driver import room_to_keep

    made = []
    factory = backends.ROLLOUT_BACKENDS["builtin"]
    monkeypatch.setitem(backends.ROLLOUT_BACKENDS, "builtin", lambda *a, **k: made.append(factory(*a, **k)) or made[-1])
    runs = {}
    for keep in ("true", "false", "auto"):
        recipe = small_recipe(tmp_path / keep, tiny_checkpoint, train={"steps": 3}, eval={"enabled": False},
                              rollout={"keep_cache": keep})
        runs[keep] = run_training(load_recipe(str(recipe)), _quiet()).metrics
        kept = made[-1].engine.cache_bytes()
        assert (kept > 0) == (keep == "true"), (keep, kept)
    columns = [k for k in runs["true"][0] if k.startswith(("reward/", "response_len/", "loss", "train/")) and "_s" not in k]
    assert "reward/mean" in columns and len(columns) > 3, columns
    for keep in ("false", "auto"):
        assert [[row[c] for c in columns] for row in runs[keep]] == [[row[c] for c in columns] for row in runs["true"]]
    gib = 2 ** 30
    assert room_to_keep(20 * gib, 80 * gib, 4 * gib) and not room_to_keep(10 * gib, 80 * gib, 4 * gib)
    assert not room_to_keep(80 * gib, 80 * gib, 0)  # nothing was released: nothing to keep
