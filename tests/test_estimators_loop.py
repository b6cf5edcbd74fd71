"""Every estimator and adapter through the real loop (tiny model, 2 steps), and their input errors."""

from __future__ import annotations

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.errors import OrbitError
from orbit_core.train import Callbacks, list_checkpoints, load_adapter, run_training
from tests.helpers import small_recipe

ESTIMATORS = ["grpo", "gspo", "ppo", "reinforce_plus_plus", "reinforce_plus_plus_baseline", "on_policy_distillation"]


@pytest.mark.parametrize("method", ["lora", "oft"])
@pytest.mark.parametrize("estimator", ESTIMATORS)
def test_estimator_runs_and_updates_the_adapter(tmp_path, tiny_checkpoint, teacher_checkpoint, estimator, method):
    rl = {"advantage_estimator": estimator, "use_kl_loss": False, "kl_coef": 0.01, "tis_cap": 2.0,
          "value_head": estimator == "ppo", "teacher_path": teacher_checkpoint if estimator == "on_policy_distillation" else ""}
    peft = {"method": method, "oft_block_size": 16}
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl=rl, peft=peft, train={"steps": 2}, eval={"enabled": False})
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert result.steps_done == 2
    for m in result.metrics:
        assert all(torch.isfinite(torch.tensor(v)) for v in m.values() if isinstance(v, float))
        # sync and colocated: the engine's logprobs are the trainer's up to float noise, so no token is
        # truncated and every importance weight is 1 (a broken engine or weight formula fails here)
        assert m["rollout/behaviour_proximal_logprob_abs_diff_max"] < 1e-4
        assert m["rollout/tis_truncated_fraction"] == 0.0
        assert abs(m["rollout/tis_weight_mean"] - 1.0) < 1e-4
    adapter, _ = load_adapter(list_checkpoints(str(tmp_path / "run"))[-1][1])
    moved = [n for n, t in adapter.items() if t.abs().sum() > 0 and ("lora_B" in n or "oft_skew" in n)]
    assert moved, "no adapter tensor moved"
    assert any("value_head" in n for n in adapter) == (estimator == "ppo")
    if estimator == "ppo":
        assert "value_loss" in result.metrics[-1]


@pytest.mark.parametrize("agg", ["seq-mean-token-sum", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_loss_aggregations_run_with_kl_loss(tmp_path, tiny_checkpoint, agg):
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"loss_agg": agg, "kl_type": "mse", "entropy_coef": 0.01},
                          train={"steps": 2, "global_batch_size": 16}, eval={"enabled": False})  # one update a step
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    # LoRA starts as the identity, so the first step's policy is the base (the reference) exactly;
    # after one update it is not: a reference computed with the adapter on would read 0 here
    assert result.metrics[0]["kl"] < 1e-9, result.metrics[0]["kl"]
    assert result.metrics[1]["kl"] > 1e-6, result.metrics[1]["kl"]


def test_dynamic_sampling_refills_groups(tmp_path, tiny_checkpoint):
    reward = tmp_path / "r.py"
    reward.write_text("def score(prompt, response, label):\n    return float(prompt.startswith('1') and '1' in response)\n")
    recipe = small_recipe(tmp_path, tiny_checkpoint, rl={"reward": f"{reward}:score", "filter_zero_signal_groups": True,
                                                         "dynamic_sampling_max_rounds": 3},
                          train={"steps": 2}, eval={"enabled": False})
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert sum(m["rollout/groups_filtered"] for m in result.metrics) > 0
    assert max(m["rollout/sampling_rounds"] for m in result.metrics) > 1


def test_optimizer_options_run(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 1, "weight_decay": 0.01, "adam_beta2": 0.95},
                          eval={"enabled": False})
    assert run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None)).steps_done == 1


@pytest.mark.parametrize("overrides, message", [
    ({"rl": {"advantage_estimator": "ppo"}}, "rl.advantage_estimator=ppo needs a value head"),
    ({"rl": {"advantage_estimator": "on_policy_distillation"}}, "needs a teacher"),
    ({"rl": {"advantage_estimator": "a2c"}}, "rl.advantage_estimator: expected one of grpo"),
    ({"peft": {"method": "oft", "oft_block_size": 24}}, r"peft.oft_block_size=24 does not divide model.layers.0.self_attn.q_proj"),
])
def test_bad_algorithm_settings_fail_before_loading(tmp_path, tiny_checkpoint, overrides, message, monkeypatch):
    import orbit_core.train.loop as loop

    def no_load(*args, **kwargs):
        raise AssertionError("the model was loaded before the config error")

    monkeypatch.setattr(loop, "build_policy", no_load)
    recipe = small_recipe(tmp_path, tiny_checkpoint, **overrides)
    with pytest.raises(OrbitError, match=message):
        run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
