"""``train.orchestrator=ray`` on a local Ray: engine actors, object-store syncs, restarts, refusals."""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import ray
import torch

from orbit_core.config import load_recipe
from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.errors import OrbitError
from orbit_core.peft.base import load_adapter_state_dict
from orbit_core.peft.slots import engine_adapter_state
from orbit_core.policy.build import build_policy
from orbit_core.rl.logprobs import token_logprobs
from orbit_core.rollout.ray_engine import BuiltinEngineActor, remote_class
from orbit_core.rollout.types import SamplingParams
from orbit_core.train import Callbacks, run_training
from orbit_core.train.ray_engines import RayEnginePool
from tests.helpers import long_row, small_recipe, without_package
from tests.test_cli import run
from tests.test_serve import serve_processes


@pytest.fixture(scope="module")
def local_ray():
    ray.init(num_cpus=4, include_dashboard=False, log_to_driver=False,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    yield ray
    ray.shutdown()


def _steps(result) -> list[dict]:
    return [row for row in result.metrics if "time/step_s" in row]


def test_async_run_with_two_engine_actors(tmp_path, tiny_checkpoint, local_ray):
    recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"num_engines": 2},
                          train={"orchestrator": "ray", "mode": "async", "max_staleness": 1, "steps": 4,
                                 "save_rollouts": True}, eval={"enabled": False})
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=messages.append))
    assert result.steps_done == 4 and (tmp_path / "run" / "checkpoints" / "step_000004").is_dir()
    assert sum("Ray actor pid" in m for m in messages) == 2
    rows = _steps(result)
    assert all(row["staleness/max"] <= 1 for row in rows) and any(row["staleness/max"] == 1 for row in rows)
    for row in rows:
        assert 0 < row["sync/bytes"] < row["sync/full_weight_bytes"]
        for i in (0, 1):  # both engines took prompts and report their numbers
            assert row[f"engine{i}/tokens_per_s"] > 0 and f"engine{i}/queue_depth" in row
            assert row[f"engine{i}/restarts"] == 0
    # every sample records the adapter version that produced it, within the staleness bound
    for step in range(1, 5):
        lines = (tmp_path / "run" / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert {json.loads(line)["adapter_version"] for line in lines} <= {step - 2, step - 1} - {-1}


def _policy(checkpoint: str):
    return build_policy(ModelSection(path=checkpoint, device="cpu", warmstart_steps=0), PeftSection(rank=4, alpha=8),
                        log=lambda m: None)


def _engines(checkpoint: str):
    """A factory of builtin engine actors on ``checkpoint``, one CPU each."""
    model_section = ModelSection(path=checkpoint, device="cpu", warmstart_steps=0)

    def factory(index, restart, adapter_ref, version):
        return remote_class(ray, BuiltinEngineActor).options(num_cpus=1, max_restarts=0).remote(
            model_section, PeftSection(rank=4, alpha=8), 16, 100 * index + restart, 1, adapter_ref, version, False)

    return factory


def test_dead_engine_is_replaced_on_the_newest_adapter_and_its_prompts_resubmitted(tiny_checkpoint, local_ray):
    trainer = _policy(tiny_checkpoint)
    messages: list[str] = []
    pool = RayEnginePool(_engines(tiny_checkpoint), 2, engine_adapter_state(trainer.model), 0, max_restarts=1, timeout_s=120,
                         start_timeout_s=120, log=messages.append)
    try:
        torch.manual_seed(3)
        state = {name: torch.randn_like(t) * 0.3 for name, t in engine_adapter_state(trainer.model).items()}
        pool.push(1, state)
        pool.settle_loads(wait=True)
        prompts = [[5 + i, 6, 7, 8] for i in range(6)]
        params = SamplingParams(max_new_tokens=5, n=2)
        submission = pool.submit(prompts, params)
        ray.kill(pool.engines[0].actor, no_restart=True)
        completions = pool.gather(submission)
        assert [(c.prompt_index, c.sample_index) for c in completions] == [(p, s) for p in range(6) for s in range(2)]
        assert pool.engines[0].restarts == 1 and any("starting a replacement on adapter v1" in m for m in messages)
        assert {c.adapter_version for c in completions} == {1}
        # the samples came from adapter v1 (the replacement loaded it): the trainer's recompute agrees
        load_adapter_state_dict(trainer.model, state)
        for c in completions:
            ids = torch.tensor([c.prompt_ids + c.token_ids])
            with torch.no_grad():
                mine = token_logprobs(trainer.model(ids[:, :-1]), ids[:, 1:])[0, len(c.prompt_ids) - 1:]
            assert torch.allclose(mine, torch.tensor(c.logprobs), atol=1e-4)
        # an engine that keeps dying stops the run with its last error
        submission = pool.submit(prompts[:2], params)
        for engine in pool.engines:
            ray.kill(engine.actor, no_restart=True)
        with pytest.raises(OrbitError, match=r"rollout engine 0 died 2 times \(ray.max_engine_restarts=1\); last error: .*kill"):
            pool.gather(submission)
    finally:
        pool.close()


def test_an_engine_actor_is_timed_by_its_progress_not_by_the_length_of_a_generation(endless_checkpoint, local_ray):
    """rollout.engine_timeout_s limits silence: the pool reads an actor's decode steps while its
    share is out, so a generation three limits long finishes on its actor, and a frozen actor
    (SIGSTOP) is replaced within about one limit and its prompts generated again."""
    trainer = _policy(endless_checkpoint)
    messages: list[str] = []
    pool = RayEnginePool(_engines(endless_checkpoint), 1, engine_adapter_state(trainer.model), 0, max_restarts=1,
                         timeout_s=120, start_timeout_s=120, log=messages.append)
    prompt = trainer.tokenizer.encode("12+34=")
    try:
        def generate(tokens: int):
            return pool.generate([prompt], SamplingParams(max_new_tokens=tokens, temperature=0.0))[0]

        done, took, tokens = long_row(generate)
        pool.timeout_s = took / 3
        assert generate(tokens).token_ids == done.token_ids
        assert pool.engines[0].restarts == 0, messages

        pid = ray.get(pool.engines[0].actor.info.remote())["pid"]  # before: info queues behind a generate
        submission = pool.submit([prompt], SamplingParams(max_new_tokens=tokens, temperature=0.0))
        time.sleep(took / 6)
        os.kill(pid, signal.SIGSTOP)
        [replayed] = pool.gather(submission)
        assert replayed.token_ids == done.token_ids  # greedy: the replacement decodes the same row
        assert pool.engines[0].restarts == 1
        assert any("no progress within rollout.engine_timeout_s" in m for m in messages), messages
    finally:
        pool.close()


def test_sglang_servers_as_ray_engines_in_async_mode(tmp_path, tiny_checkpoint, local_ray):
    with serve_processes(tiny_checkpoint, 2) as urls:
        recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"backend": "sglang", "sglang_urls": urls},
                              train={"orchestrator": "ray", "mode": "async", "steps": 3}, eval={"enabled": False})
        result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert result.steps_done == 3
    rows = _steps(result)
    assert all(row["staleness/max"] <= 1 for row in rows)
    assert all(row["engine0/tokens_per_s"] > 0 and row["engine1/tokens_per_s"] > 0 for row in rows)
    assert rows[-1]["engine0/adapter_version"] >= 1


def test_ray_refusals(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint)
    with pytest.raises(OrbitError, match="needs train.orchestrator=ray"):
        load_recipe(str(recipe), ["rollout.num_engines=2"])
    with pytest.raises(OrbitError, match="one engine actor per server"):
        load_recipe(str(recipe), ["train.orchestrator=ray", "rollout.backend=sglang", "rollout.num_engines=3",
                                  "rollout.sglang_urls=[http://127.0.0.1:9,http://127.0.0.1:10]"])
    # Ray missing: one line naming the extra, exit 2, nothing written
    out = run("train", "--recipe", str(recipe), "train.orchestrator=ray", env_extra=without_package(tmp_path, "ray"))
    assert out.returncode == 2 and "orbit-rl[ray]" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run").exists()


KILLER = """
import os
calls = 0

def score(prompt, response, label):
    # runs in the trainer actor (rl.reward_workers=0): kills engine 0 once, while batches run ahead
    global calls
    calls += 1
    if calls == 40:
        import ray
        ray.kill(ray.get_actor(f"orbit-engine-{os.getpid()}-0-r0"), no_restart=True)
    return float("1" in response)
"""


def test_async_run_survives_an_engine_killed_mid_run(tmp_path, tiny_checkpoint, local_ray):
    """An engine actor killed while batches run ahead: replaced, its prompts resubmitted, bound kept."""
    (tmp_path / "killer.py").write_text(KILLER)
    recipe = small_recipe(tmp_path, tiny_checkpoint, rollout={"num_engines": 2},
                          rl={"reward": f"{tmp_path / 'killer.py'}:score", "reward_workers": 0},
                          train={"orchestrator": "ray", "mode": "async", "max_staleness": 1, "steps": 5,
                                 "save_rollouts": True}, eval={"enabled": False})
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=messages.append))
    assert result.steps_done == 5
    assert any("rollout engine 0 died" in m and "starting a replacement" in m for m in messages)
    rows = _steps(result)
    assert rows[-1]["rollout/engine_restarts"] == 1 and rows[-1]["engine0/restarts"] == 1
    assert all(row["staleness/max"] <= 1 for row in rows)
    for step in range(1, 6):
        lines = (tmp_path / "run" / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()
        assert len(lines) == 16 and {json.loads(line)["adapter_version"] for line in lines} <= {step - 2, step - 1}
