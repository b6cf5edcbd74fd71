"""A user's results are never lost: non-finite values, shared run directories, finished runs,
changed recipes, damaged files, frozen engines."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.errors import OrbitError
from orbit_core.train import Callbacks, list_checkpoints, load_adapter, run_training
from orbit_core.train.checkpoint import NonFiniteState, load_checkpoint, save_checkpoint
from tests.helpers import long_row, small_recipe


def quiet(messages: list | None = None, **kw) -> Callbacks:
    return Callbacks(on_message=(messages.append if messages is not None else lambda m: None), **kw)


def test_nan_and_inf_rewards_count_as_errors_and_never_reach_the_adapter(tmp_path, tiny_checkpoint):
    reward = tmp_path / "poison.py"
    reward.write_text("def score(prompt, response, label):\n"
                      "    return float('nan') if '1' in response else (float('inf') if '2' in response else 1.0)\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward}:score"}, train={"steps": 2},
                          eval={"enabled": False})
    result = run_training(load_recipe(str(recipe)), quiet())
    assert sum(m["reward/errors"] for m in result.metrics) > 0
    assert "expected a finite number" in " ".join(m.get("reward/last_error", "") for m in result.metrics)
    adapter, _ = load_adapter(list_checkpoints(str(tmp_path / "run"))[-1][1])
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_non_finite_loss_skips_the_update(tmp_path, tiny_checkpoint):
    from orbit_core.policy.build import build_policy
    from orbit_core.train.batch import RolloutBatch
    from orbit_core.train.torch_backend import TorchTrainer

    config = load_recipe(str(small_recipe(tmp_path, tiny_checkpoint)))
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    trainer = TorchTrainer(policy.model, config)
    before = {k: v.clone() for k, v in trainer.adapter_state().items()}
    ids = torch.randint(3, policy.model.config.vocab_size, (8, 6))
    batch = RolloutBatch(ids, torch.ones(8, 5), torch.zeros(8, 5), torch.zeros(8), advantages=torch.ones(8),
                         old_logprobs=torch.full((8, 5), float("nan")))
    stats = trainer.update(batch)
    assert stats["update_skipped"] == 1.0
    assert trainer.updates_done == 0 and not trainer.optimizer.state
    for name, value in trainer.adapter_state().items():
        assert torch.equal(value, before[name])
    batch.old_logprobs = torch.zeros(8, 5)
    assert trainer.update(batch)["update_skipped"] == 0.0 and trainer.updates_done == 1


def test_a_non_finite_save_never_replaces_or_prunes_a_good_checkpoint(tmp_path):
    good = {"layer.lora_B": torch.ones(2, 2)}
    args = ({"peft": {}}, {"state": {}}, {}, {"data": {}})
    save_checkpoint(str(tmp_path), 1, good, *args, keep_last=1)
    with pytest.raises(NonFiniteState, match="step 2: the adapter holds NaN/inf"):
        save_checkpoint(str(tmp_path), 2, {"layer.lora_B": torch.tensor([[1.0, float("nan")]])}, *args, keep_last=1)
    with pytest.raises(NonFiniteState, match="optimizer state"):
        save_checkpoint(str(tmp_path), 2, good, {"peft": {}}, {"state": {0: {"exp_avg": torch.tensor([float("inf")])}}},
                        {}, {"data": {}}, keep_last=1)
    assert [s for s, _ in list_checkpoints(str(tmp_path))] == [1]
    assert torch.equal(load_checkpoint(tmp_path / "checkpoints" / "step_000001")["adapter"]["layer.lora_B"], good["layer.lora_B"])


def test_resume_never_refuses_a_used_directory_and_overwrite_moves_it_aside(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 2}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), quiet())
    first = (tmp_path / "run" / "metrics.jsonl").read_text()
    with pytest.raises(OrbitError, match="already holds another run's files .* would mix the two runs"):
        run_training(load_recipe(str(recipe), ["train.resume=never"]), quiet())
    assert (tmp_path / "run" / "metrics.jsonl").read_text() == first
    messages: list[str] = []
    run_training(load_recipe(str(recipe), ["train.resume=never", "train.overwrite=true"]), quiet(messages))
    aside = [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    assert len(aside) == 1 and (aside[0] / "metrics.jsonl").read_text() == first
    assert [s for s, _ in list_checkpoints(str(aside[0]))] == [2]
    assert any(str(aside[0]) in m for m in messages)
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [2]


def test_a_second_run_on_a_directory_in_use_is_refused_and_a_crashed_runs_lock_is_not(tmp_path, tiny_checkpoint):
    import subprocess
    import sys

    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 400, "save_interval": 1}, eval={"enabled": False})
    first = subprocess.Popen([sys.executable, "-m", "orbit_cli.main", "train", "--recipe", str(recipe)],
                             stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while not list_checkpoints(str(tmp_path / "run")):  # the first run is under way and saving
            assert first.poll() is None and time.monotonic() < deadline, first.stderr.read() if first.poll() else ""
            time.sleep(0.1)
        with pytest.raises(OrbitError, match=rf"train.output_dir=\S+/run is in use by a running orbit train "
                                             rf"\(pid {first.pid} on \S+\) -- let it finish or stop it"):
            run_training(load_recipe(str(recipe), ["train.steps=2"]), quiet())
        with pytest.raises(OrbitError, match="is in use by a running orbit train"):  # overwrite moves nothing aside
            run_training(load_recipe(str(recipe), ["train.overwrite=true"]), quiet())
        assert not [p for p in tmp_path.iterdir() if p.name.startswith("run.old-")]
    finally:
        first.kill()  # a crash: no cleanup runs, the lock file stays behind
        first.wait(timeout=60)
    saved = list_checkpoints(str(tmp_path / "run"))[-1][0]
    resumed = run_training(load_recipe(str(recipe), [f"train.steps={saved + 1}"]), quiet())
    assert resumed.steps_done == saved + 1


def test_a_refused_run_leaves_no_directory_behind(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": str(tmp_path / "gone.py") + ":score"})
    with pytest.raises(OrbitError, match="reward file not found"):
        run_training(load_recipe(str(recipe)), quiet())
    assert not (tmp_path / "run").exists()


def test_rerunning_a_finished_run_keeps_and_shows_its_results(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 2})
    first = run_training(load_recipe(str(recipe)), quiet())
    report = (tmp_path / "run" / "eval_report.json").read_text()
    assert json.loads(report)["after"]["greedy_accuracy"] == first.eval_after.greedy_accuracy
    messages: list[str] = []
    again = run_training(load_recipe(str(recipe)), quiet(messages))
    assert again.already_complete and again.steps_done == 2
    assert again.eval_after == first.eval_after and again.eval_before == first.eval_before
    assert again.last_checkpoint == first.last_checkpoint
    assert (tmp_path / "run" / "eval_report.json").read_text() == report
    assert any("already complete" in m for m in messages)


def test_resume_lists_changes_refuses_adapter_changes_and_keeps_config_yaml(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 2}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), quiet())
    saved = (tmp_path / "run" / "config.yaml").read_text()
    with pytest.raises(OrbitError, match=r"peft.rank: 4 -> 8 changes the adapter's tensors"):
        run_training(load_recipe(str(recipe), ["peft.rank=8", "train.steps=3"]), quiet())
    assert (tmp_path / "run" / "config.yaml").read_text() == saved
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe), ["train.steps=3", "train.lr=0.02", "rl.advantage_estimator=gspo"]),
                          quiet(messages))
    assert result.steps_done == 3
    assert "resume: train.lr: 0.01 -> 0.02" in messages
    assert "resume: rl.advantage_estimator: 'grpo' -> 'gspo'" in messages
    assert "lr: 0.02" in (tmp_path / "run" / "config.yaml").read_text()


@pytest.mark.parametrize("damage", ["adapter", "trainer_state", "metrics_line"])
def test_resume_survives_damaged_files(tmp_path, tiny_checkpoint, damage):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 4, "save_interval": 2}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), quiet())
    newest = tmp_path / "run" / "checkpoints" / "step_000004"
    if damage == "adapter":
        weights = newest / "adapter_model.safetensors"
        weights.write_bytes(weights.read_bytes()[:100])
    elif damage == "trainer_state":
        (newest / "trainer_state.json").write_text('{"step": 4, "da')
    else:
        with open(tmp_path / "run" / "metrics.jsonl", "a") as handle:
            handle.write('{"step": 5, "reward/me')
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe), ["train.steps=5"]), quiet(messages))
    assert result.steps_done == 5
    resumed_from = 4 if damage == "metrics_line" else 2
    assert any(m.startswith("resumed from") and f"step_{resumed_from:06d}" in m for m in messages)
    if damage == "metrics_line":
        assert any("dropped 1 unreadable line" in m for m in messages)
    else:
        assert any("step_000004 is unusable" in m and "falling back" in m for m in messages)
    rows = [json.loads(line) for line in (tmp_path / "run" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "reward/mean" in r] == [1, 2, 3, 4, 5]


def test_frozen_engine_times_out_on_send_and_the_run_saves_its_last_step(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"placement": "non-colocated", "engine_timeout_s": 3},
                          train={"steps": 4, "mode": "async", "save_interval": 0}, eval={"enabled": False},
                          peft={"rank": 64, "alpha": 64})  # a payload far larger than a pipe's buffer
    info: dict = {}
    messages: list[str] = []

    def freeze(metrics):
        if metrics["step"] == 1:
            os.kill(info["pid"], signal.SIGSTOP)

    start = time.monotonic()
    # whichever wait meets the frozen engine first gives up after the timeout: the push of step 1's
    # adapter, or, when the engine had read that push before the freeze, the wait for batch 2
    with pytest.raises(OrbitError, match=r"did not take 'push' within 3 s|sent nothing for 3 s"):
        run_training(load_recipe(str(recipe)), quiet(messages, on_step=freeze, on_engine_start=info.update))
    assert time.monotonic() - start < 60
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [1], messages
    result = run_training(load_recipe(str(recipe), ["rollout.engine_timeout_s=600"]), quiet())
    assert result.steps_done == 4


def test_an_engine_that_does_not_load_in_time_is_stopped_with_its_own_limit(tmp_path, tiny_checkpoint):
    """Loading the base is timed by rollout.engine_start_timeout_s, not by the silence limit of a
    running engine (a GPU engine took over 3 s to load the tiny model, which a 3 s
    engine_timeout_s refused before), and an engine that overruns it is stopped."""
    import multiprocessing

    recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"placement": "non-colocated", "engine_timeout_s": 3,
                                                               "engine_start_timeout_s": 0.2},
                          train={"steps": 2, "mode": "async"}, eval={"enabled": False})
    with pytest.raises(OrbitError, match=r"did not finish loading its model within 0.2 s; stopped it") as err:
        run_training(load_recipe(str(recipe)), quiet())
    assert "rollout.engine_start_timeout_s" in err.value.fix
    assert not [p for p in multiprocessing.active_children() if p.name == "orbit-engine"]
    assert list_checkpoints(str(tmp_path / "run")) == []


def test_a_push_to_a_frozen_engine_gives_up_after_the_timeout(tiny_checkpoint):
    """The send path on its own: the engine is frozen before the push, so the push must be what times out."""
    from orbit_core.config.schema import ModelSection, PeftSection
    from orbit_core.policy.build import build_policy
    from orbit_core.peft.slots import engine_adapter_state
    from orbit_core.rollout.adapter_payload import encode
    from orbit_core.rollout.remote import EngineProcess
    from orbit_core.rollout.worker import EngineSpec

    peft = PeftSection(method="lora", rank=4, alpha=8)
    model = build_policy(ModelSection(path=tiny_checkpoint, device="cpu"), peft, log=lambda m: None).model
    spec = EngineSpec(tiny_checkpoint, "float32", "cpu", peft, 1, 4, seed=0, threads=1,
                      adapter=encode(engine_adapter_state(model)), version=0)
    engine = EngineProcess(spec, timeout_s=120)  # returns once the engine is up
    engine.timeout_s = 3
    try:
        os.kill(engine.process.pid, signal.SIGSTOP)
        start = time.monotonic()
        with pytest.raises(OrbitError, match=r"did not take 'push' within 3 s"):
            engine.push(1, b"\0" * (8 << 20))  # far more than a pipe buffers
        assert time.monotonic() - start < 15
    finally:
        if engine.process.is_alive():
            engine.process.kill()


def test_a_generation_longer_than_the_silence_limit_is_waited_for(endless_checkpoint):
    """The engine reports while it decodes, so a batch whose rows all run past
    rollout.engine_timeout_s before any of them finishes is not taken for a stalled engine (only an
    engine that stops sending is: the frozen-engine tests above)."""
    from orbit_core.config.schema import ModelSection, PeftSection
    from orbit_core.peft.slots import engine_adapter_state
    from orbit_core.policy.build import build_policy
    from orbit_core.rollout.adapter_payload import encode
    from orbit_core.rollout.remote import EngineProcess
    from orbit_core.rollout.types import SamplingParams
    from orbit_core.rollout.worker import EngineSpec

    path = endless_checkpoint
    peft = PeftSection(method="lora", rank=4, alpha=8)
    policy = build_policy(ModelSection(path=path, device="cpu"), peft, log=lambda m: None)
    spec = EngineSpec(path, "float32", "cpu", peft, 1, 4, seed=0, threads=1,
                      adapter=encode(engine_adapter_state(policy.model)), version=0, heartbeat_s=0.1)
    engine = EngineProcess(spec, timeout_s=120)
    prompt = policy.tokenizer.encode("12+34=")
    try:
        def generate(tokens: int):
            return engine.generate([prompt], SamplingParams(max_new_tokens=tokens, temperature=0.0))[0]

        done, took, tokens = long_row(generate)
        engine.timeout_s = took / 3  # the one row finishes only after three silence limits
        assert generate(tokens).token_ids == done.token_ids
    finally:
        engine.close()


def test_a_finished_run_without_eval_is_complete_too(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 2}, eval={"enabled": False})
    first = run_training(load_recipe(str(recipe)), quiet())
    again = run_training(load_recipe(str(recipe)), quiet())
    assert again.already_complete and again.last_checkpoint == first.last_checkpoint
