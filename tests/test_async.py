"""Async adapter RL: engine adapter slots, the engine process, double buffering, staleness, crashes."""

from __future__ import annotations

import json
import os
import signal

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.config.schema import ModelSection, PeftSection
from orbit_core.errors import OrbitError
from orbit_core.peft.base import load_adapter_state_dict
from orbit_core.peft.slots import attach_slots, engine_adapter_state, prepare, write_slot
from orbit_core.rl.logprobs import token_logprobs
from orbit_core.rollout.adapter_payload import encode
from orbit_core.rollout.remote import EngineCrashed, EngineProcess
from orbit_core.rollout.types import SamplingParams
from orbit_core.rollout.worker import EngineSpec
from orbit_core.train import Callbacks, list_checkpoints, load_adapter, run_training
from orbit_core.policy.build import build_policy
from tests.helpers import small_recipe

PEFTS = {"lora": PeftSection(rank=4, alpha=8), "oft": PeftSection(method="oft", oft_block_size=16)}


def _policy(checkpoint, peft):
    return build_policy(ModelSection(path=checkpoint, device="cpu"), peft, log=lambda m: None).model.eval()


def _randomize(model, seed: int, scale: float = 0.3) -> dict[str, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=gen) * scale)
    return {k: v.clone() for k, v in engine_adapter_state(model).items()}


def _sequence_logprobs(model, prompt: list[int], tokens: list[int]) -> torch.Tensor:
    ids = torch.tensor([prompt + tokens])
    with torch.no_grad():
        logits = model(ids[:, :-1])
    return token_logprobs(logits, ids[:, 1:], 1.0)[0, len(prompt) - 1:]


def _assert_sampled_with(trainer, completions, version: int) -> None:
    """Every completion came from ``version``, the adapter ``trainer`` holds: its logprobs recompute."""
    for c in completions:
        assert c.adapter_version == version
        torch.testing.assert_close(_sequence_logprobs(trainer, c.prompt_ids, c.token_ids), torch.tensor(c.logprobs),
                                   atol=1e-4, rtol=0)


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_slot_rows_equal_the_live_model_with_that_adapter(tiny_checkpoint, method):
    live = _policy(tiny_checkpoint, PEFTS[method])
    states = [_randomize(live, seed) for seed in (1, 2)]
    engine = _policy(tiny_checkpoint, PEFTS[method])
    bank = attach_slots(engine, 2)
    for slot, state in enumerate(states):
        write_slot(engine, bank, slot, prepare(engine, state), version=10 + slot)
    ids = torch.randint(3, live.config.vocab_size, (4, 7), generator=torch.Generator().manual_seed(0))
    rows = torch.tensor([0, 1, 1, 0])
    bank.set_rows(rows, (0, 1))
    with torch.no_grad():
        mixed = engine(ids)
        for slot, state in enumerate(states):
            load_adapter_state_dict(live, state)
            expected = live(ids[rows == slot])
            torch.testing.assert_close(mixed[rows == slot], expected, atol=2e-5, rtol=0)
    assert bank.versions == [10, 11]
    assert (mixed[0] - mixed[1]).abs().max() > 1e-3  # the two versions really differ


def test_bad_payload_is_refused_before_any_slot_changes(tiny_checkpoint):
    engine = _policy(tiny_checkpoint, PEFTS["lora"])
    bank = attach_slots(engine, 1)
    good = {k: v.clone() for k, v in engine_adapter_state(engine).items()}
    before = {n: b.clone() for n, b in engine.named_buffers() if "slot_" in n}
    name = sorted(good)[-1]
    cases = {
        "NaN or inf": {**good, name: torch.full_like(good[name], float("nan"))},
        "has shape": {**good, name: good[name][:1]},
        "missing": {k: v for k, v in good.items() if k != name},
        "unexpected": {**good, "model.extra.lora_A": good[name]},
    }
    prepare(engine, good)  # the payload's names and shapes are now a checked plan: the checks below still run
    for message, state in cases.items():
        with pytest.raises(OrbitError, match=message):
            write_slot(engine, bank, 0, prepare(engine, state), version=1)
    after = {n: b for n, b in engine.named_buffers() if "slot_" in n}
    assert all(torch.equal(before[n], after[n]) for n in before)
    assert bank.versions == [0]


def _engine(checkpoint, model, slots: int, max_running: int = 8, audit: bool = True) -> EngineProcess:
    spec = EngineSpec(checkpoint, "float32", "cpu", PEFTS["lora"], slots, max_running, seed=0, threads=1,
                      adapter=encode(engine_adapter_state(model)), version=0, audit=audit)
    return EngineProcess(spec, timeout_s=120)


@pytest.mark.parametrize("transport", ["pipe", "shared"])
def test_double_buffer_swaps_under_load_never_mix_versions(tiny_checkpoint, transport):
    """Also the shared-buffer transport with only two buffers for eight syncs, so the trainer rewrites
    buffers the engine has queued syncs from: every sample must still see exactly its version."""
    from orbit_core.rollout.shared_adapter import SharedAdapterSender

    trainer = _policy(tiny_checkpoint, PEFTS["lora"])
    versions = {0: {k: v.clone() for k, v in engine_adapter_state(trainer).items()}}
    engine = _engine(tiny_checkpoint, trainer, slots=2)
    sender = SharedAdapterSender(torch.device("cpu"), buffers=2)
    params = SamplingParams(max_new_tokens=40, temperature=1.0, n=2)
    prompts = [[5 + i, 6, 7, 8 + i] for i in range(6)]
    try:
        for v in range(1, 9):
            engine.submit(v, prompts, params)
            versions[v] = _randomize(trainer, seed=v)
            if transport == "shared":
                assert engine.push_shared(v, versions[v], sender) < 2 * len(encode(versions[v]))
            else:
                engine.push(v, encode(versions[v]))
        got = {v: engine.collect(v, len(prompts) * params.n) for v in range(1, 9)}
        assert not engine.failed
    finally:
        engine.close()
    seen = set()
    for batch, completions in got.items():
        for c in completions:
            assert batch - 1 <= c.adapter_version <= 8  # submitted after push batch-1: never older
            assert set(c.extra["token_versions"]) == {c.adapter_version}  # one version per sequence
            seen.add(c.adapter_version)
    assert len(seen) >= 4
    # Recomputing with the recorded version reproduces every token's logprob; another version does not.
    checked = 0
    for completions in got.values():
        for c in completions[:3]:
            load_adapter_state_dict(trainer, versions[c.adapter_version])
            recomputed = _sequence_logprobs(trainer, c.prompt_ids, c.token_ids)
            torch.testing.assert_close(recomputed, torch.tensor(c.logprobs), atol=1e-4, rtol=0)
            other = versions[(c.adapter_version + 1) % 9]
            load_adapter_state_dict(trainer, other)
            assert (_sequence_logprobs(trainer, c.prompt_ids, c.token_ids) - torch.tensor(c.logprobs)).abs().max() > 1e-3
            checked += 1
    assert checked == 24


def test_failed_sync_keeps_the_previous_adapter(tiny_checkpoint):
    from orbit_core.rollout.shared_adapter import SharedAdapterSender

    trainer = _policy(tiny_checkpoint, PEFTS["lora"])
    v1 = _randomize(trainer, seed=3)
    engine = _engine(tiny_checkpoint, trainer, slots=1)
    params = SamplingParams(max_new_tokens=8, temperature=1.0, n=2)
    try:
        engine.push(1, encode(v1))
        engine.wait_version(1)
        nan = {k: torch.full_like(v, float("nan")) for k, v in v1.items()}
        engine.push(2, encode(nan))
        engine.push(3, b"not safetensors")
        engine.push_shared(4, nan, SharedAdapterSender(torch.device("cpu"), buffers=2))
        completions = engine.generate([[5, 6, 7]], params)
        engine.wait_version(4)
        assert [v for v, _ in engine.failed] == [2, 3, 4]
        assert "NaN" in engine.failed[0][1] and "not valid safetensors" in engine.failed[1][1]
        assert "NaN" in engine.failed[2][1]
        assert engine.version == 1
    finally:
        engine.close()
    _assert_sampled_with(trainer, completions, 1)


def test_engine_error_is_reported_not_hung(tiny_checkpoint):
    trainer = _policy(tiny_checkpoint, PEFTS["lora"])
    engine = _engine(tiny_checkpoint, trainer, slots=1)
    try:
        with pytest.raises(EngineCrashed, match="IndexError"):
            engine.generate([[10_000, 5]], SamplingParams(max_new_tokens=4))  # token id outside the vocabulary
    finally:
        engine.close()


def _quiet(**kw):
    return Callbacks(on_message=lambda m: None, **kw)


@pytest.mark.parametrize("method,double_buffer,staleness,transport", [("lora", False, 1, "pipe"), ("oft", True, 2, "shared")])
def test_async_run_bounds_staleness_and_records_versions(tmp_path, tiny_checkpoint, method, double_buffer, staleness,
                                                         transport):
    peft = {"method": method, "oft_block_size": 16} if method == "oft" else {}
    # rewards that vary within every group, so every update moves the adapter (an update on groups
    # without signal leaves it unchanged, and then stale samples would match the proximal recompute)
    (tmp_path / "noisy.py").write_text("import random\n\ndef score(prompt, response, label):\n    return random.random()\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, peft=peft, rl={"reward": f"{tmp_path / 'noisy.py'}:score"},
                          train={"steps": 5, "mode": "async", "max_staleness": staleness, "save_interval": 1,
                                 "keep_last": 10, "save_rollouts": True},
                          rollout={"placement": "non-colocated", "adapter_double_buffer": double_buffer,
                                   "adapter_transport": transport},
                          eval={"enabled": False})
    config = load_recipe(str(recipe))
    result = run_training(config, _quiet())
    assert result.steps_done == 5
    for m in result.metrics:
        assert 0 <= m["staleness/max"] <= staleness
        counts = [m.get(f"staleness/count_{k}", 0) for k in range(staleness + 1)]
        assert sum(counts) == 16
        assert m["sync/bytes"] > 0 and m["sync/bytes"] < m["sync/full_weight_bytes"]
        for key in ("time/rollout_s", "time/train_s", "time/sync_s", "time/idle_s", "time/bubble_fraction"):
            assert m[key] >= 0
    assert max(m["staleness/max"] for m in result.metrics) == staleness  # the engine really ran ahead
    # decoupled PPO: stale samples are recomputed by the trainer (proximal), which differs from the
    # engine's behaviour logprobs once the adapter has moved
    assert max(m["rollout/behaviour_proximal_logprob_abs_diff_max"] for m in result.metrics) > 1e-3
    # throughput counts what the engine generated during each step: over the run, every consumed token once
    generated = sum(m.get("tokens_per_s", 0.0) * m["time/rollout_s"] for m in result.metrics)
    consumed = sum(m["response_len/mean"] * 16 for m in result.metrics)
    assert generated == pytest.approx(consumed, rel=1e-6)
    assert all(m["tokens_per_s"] < 1e6 for m in result.metrics if "tokens_per_s" in m)
    # every sample's logprobs come back when recomputed with the adapter version recorded for it
    model = _policy(tiny_checkpoint, config.peft)
    adapters = {step: load_adapter(path)[0] for step, path in list_checkpoints(config.train.output_dir)}
    adapters[0] = None
    for step in range(1, 6):
        rows = [json.loads(line) for line in (tmp_path / "run" / "rollouts" / f"step_{step:06d}.jsonl").read_text().splitlines()]
        assert len(rows) == 16
        for row in rows[::5]:
            assert step - 1 - staleness <= row["adapter_version"] <= step - 1
            state = adapters[row["adapter_version"]]
            if state is None:
                from orbit_core.peft.base import adapter_disabled
                with adapter_disabled(model):  # version 0: the adapter at init is the identity
                    recomputed = _sequence_logprobs(model, row["prompt_ids"], row["token_ids"])
            else:
                load_adapter_state_dict(model, state)
                recomputed = _sequence_logprobs(model, row["prompt_ids"], row["token_ids"])
            torch.testing.assert_close(recomputed, torch.tensor(row["logprobs"]), atol=1e-4, rtol=0)


def test_killed_engine_stops_the_run_after_saving(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 8, "mode": "async", "save_interval": 0},
                          rollout={"placement": "non-colocated", "engine_timeout_s": 60}, eval={"enabled": False})
    engine, done = {}, []

    def kill_after_two(metrics):
        done.append(metrics["step"])
        if metrics["step"] == 2:
            os.kill(engine["pid"], signal.SIGKILL)

    with pytest.raises(EngineCrashed, match="killed by SIGKILL"):
        run_training(load_recipe(str(recipe)), _quiet(on_engine_start=engine.update, on_step=kill_after_two))
    # a batch generated before the kill may still be trained on; the last completed step is saved
    assert 2 <= done[-1] <= 3
    assert [s for s, _ in list_checkpoints(str(tmp_path / "run"))] == [done[-1]]
    resumed = run_training(load_recipe(str(recipe), [f"train.steps={done[-1] + 1}"]), _quiet())
    assert resumed.steps_done == done[-1] + 1 and len(resumed.metrics) == 1


def test_rewards_failing_in_the_engine_process_stop_an_async_run(tmp_path, tiny_checkpoint):
    # the engine process scores the rollouts there; the trainer still refuses a batch scored by nothing
    reward = tmp_path / "typo_reward.py"
    reward.write_text("def score(prompt, response, label):\n    return {'x': 1.0}['y']\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward}:score"}, eval={"enabled": False},
                          train={"steps": 4, "mode": "async", "save_interval": 0},
                          rollout={"placement": "non-colocated", "engine_timeout_s": 60})
    with pytest.raises(OrbitError, match=r"no reward of a batch of 16 could be scored .*KeyError: 'y'"):
        run_training(load_recipe(str(recipe)), _quiet())
    assert list_checkpoints(str(tmp_path / "run")) == []


@pytest.mark.parametrize("overrides,message", [
    (["rollout.adapter_double_buffer=true"], "adapter_double_buffer=true needs an async, non-colocated run"),
    (["rollout.adapter_double_buffer=true", "train.mode=async"], "needs an async, non-colocated run"),
    (["train.mode=async"], "needs rollout.placement=non-colocated"),
    (["train.mode=async", "rollout.placement=non-colocated", "train.max_staleness=0"], "max_staleness must be >= 1"),
])
def test_async_settings_are_checked_before_anything_loads(overrides, message):
    with pytest.raises(OrbitError, match=message):
        load_recipe("tiny-arith-lora", overrides)


def test_colocated_engine_frees_its_cache_for_training(tiny_checkpoint):
    from orbit_core.rollout.engine import BuiltinEngine

    model = _policy(tiny_checkpoint, PEFTS["lora"])
    engine = BuiltinEngine(model, None or build_policy(ModelSection(path=tiny_checkpoint, device="cpu"), None,
                                                      log=lambda m: None).tokenizer)
    engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, n=2))
    assert engine.loop.cache is not None
    engine.release()
    assert engine.loop.cache is None
    assert len(engine.generate([[5, 6, 7]], SamplingParams(max_new_tokens=4, n=2))) == 2


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("method, device", [("lora", "cuda:0"), ("oft", "cuda:0"), ("lora", "cuda:1")])
def test_graphed_slot_decode_equals_eager_slot_decode_on_the_gpu(tiny_checkpoint, method, device):
    """The engine process's decode (two adapter slots, rows of mixed slots) replayed as CUDA graphs
    against the same decode run eagerly; also on a GPU that is not the current device."""
    if torch.device(device).index >= torch.cuda.device_count():
        pytest.skip(f"needs {device}")
    from orbit_core.models import load_tokenizer
    from orbit_core.rollout.decode_loop import DecodeLoop, Request

    tok = load_tokenizer(tiny_checkpoint)
    prompts = [tok(p, add_special_tokens=False)["input_ids"] for p in ("1+2=", "34-12=", "7=", "99+99+1-5=", "5-", "8+8=")]
    params = SamplingParams(max_new_tokens=10, temperature=1.0)
    runs = {}
    for graphs in (True, False):
        engine = _policy(tiny_checkpoint, PEFTS[method])
        states = [_randomize(engine, seed, scale=0.05) for seed in (1, 2)]
        engine.to(device)
        bank = attach_slots(engine, 2)
        for slot, state in enumerate(states):
            write_slot(engine, bank, slot, prepare(engine, state), version=10 + slot)
        loop = DecodeLoop(engine, tok, torch.Generator(device).manual_seed(0), 16, bank, streaming=True,
                          cuda_graph=graphs, check_every=4)
        loop.refresh_versions()
        loop.submit([Request(i, 0, p) for i, p in enumerate(prompts[:3])], params)
        done = loop.step() + loop.step() + loop.step()
        loop.active_slot = 1  # a new version arrives mid-generation: the next rows read slot 1
        loop.submit([Request(3 + i, 0, p) for i, p in enumerate(prompts[3:])], params)
        while not loop.idle:
            done += loop.step()
        runs[graphs] = sorted(done, key=lambda d: d[0].prompt_index)
        if graphs:
            assert not loop.graphed.failed and any(len(used) == 2 for _, used in loop.graphed.graphs)
    for (request, graphed), (_, eager) in zip(runs[True], runs[False]):
        assert graphed.adapter_version == eager.adapter_version == (10 if request.prompt_index < 3 else 11)
        assert graphed.token_ids == eager.token_ids
        torch.testing.assert_close(torch.tensor(graphed.logprobs), torch.tensor(eager.logprobs), atol=1e-4, rtol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("engine_device", ["cuda:0", "cuda:1"])
def test_cuda_ipc_syncs_give_the_engine_the_trainers_adapter(tiny_checkpoint, engine_device):
    """Syncs through CUDA IPC buffers on the trainer's GPU, to an engine process on the same GPU or
    another: the engine samples with exactly the adapter the trainer holds (logprobs recomputed by
    the trainer's model), over more syncs than there are buffers."""
    from orbit_core.rollout.shared_adapter import SharedAdapterSender

    if torch.device(engine_device).index >= torch.cuda.device_count():
        pytest.skip(f"needs {engine_device}")
    trainer = _policy(tiny_checkpoint, PEFTS["lora"])
    spec = EngineSpec(tiny_checkpoint, "float32", engine_device, PEFTS["lora"], 1, 16, 0, 1,
                      encode(engine_adapter_state(trainer)), 0)
    engine = EngineProcess(spec, timeout_s=120)
    sender = SharedAdapterSender(torch.device("cuda:0"), buffers=2)
    try:
        for version in range(1, 6):
            state = {k: v.to("cuda:0") for k, v in _randomize(trainer, seed=version).items()}
            engine.push_shared(version, state, sender)
            engine.wait_version(version)
        assert not engine.failed and engine.synced[5]["bytes"] > 0
        completions = engine.generate([[5, 6, 7], [9, 10]], SamplingParams(max_new_tokens=8, temperature=1.0, n=2))
    finally:
        engine.close()
    _assert_sampled_with(trainer, completions, 5)
