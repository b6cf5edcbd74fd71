"""MoE bases on ``train.backend=megatron``: megatron-core's router and experts against Orbit's
SparseMoE, at one rank and with the experts split over two (``train.expert_parallel=2``)."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("megatron.core")

from orbit_core.config import load_recipe  # noqa: E402
from orbit_core.errors import OrbitError  # noqa: E402
from orbit_core.policy.build import build_policy  # noqa: E402
from orbit_core.rollout.engine import BuiltinEngine  # noqa: E402
from orbit_core.rollout.types import SamplingParams  # noqa: E402
from orbit_core.train.batch import build_batch  # noqa: E402
from orbit_core.train.megatron_backend import MegatronTrainer  # noqa: E402
from tests.helpers import small_recipe  # noqa: E402
from tests.test_megatron_backend import _pair, ranks_train_like_the_torch_trainer  # noqa: E402


def test_megatron_moe_trainer_matches_the_torch_trainer(tmp_path, tiny_moe_checkpoint):
    from megatron.core.transformer.moe.moe_layer import MoELayer

    config, torch_side, megatron_side, reference = _pair(tmp_path, tiny_moe_checkpoint, "lora")
    layers = megatron_side.model.gpt.decoder.layers
    assert all(isinstance(layer.mlp, MoELayer) for layer in layers)  # megatron's block, not Orbit's
    # all-linear adapts attention only on an MoE (as on the torch backend): the same tensors on both sides
    assert sorted(megatron_side.adapter_state()) == sorted(torch_side.adapter_state())
    torch.manual_seed(1)
    state = {name: torch.randn_like(t) * 0.2 for name, t in torch_side.adapter_state().items()}
    torch_side.load_adapter(state, "test")
    megatron_side.load_adapter(state, "test")
    engine = BuiltinEngine(reference.model, reference.tokenizer, seed=0)
    completions = engine.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_new_tokens=6, n=4))
    batch = build_batch(completions, torch.randn(8), reference.tokenizer.pad_token_id or 0)
    score = torch_side.score(batch)[0]
    assert (megatron_side.score(batch)[0] - score).abs().max() < 1e-5
    batch.old_logprobs = score
    batch.advantages = torch.randn(len(batch))[:, None].expand_as(score).contiguous() * batch.response_mask
    ours, theirs = torch_side.update(batch), megatron_side.update(batch)
    assert abs(ours["loss"] - theirs["loss"]) < 1e-5
    assert abs(ours["grad_norm"] - theirs["grad_norm"]) < 1e-4 * max(1.0, ours["grad_norm"])
    after, got = torch_side.adapter_state(), megatron_side.adapter_state()
    moved = max((after[k] - state[k]).abs().max() for k in after)
    assert moved > 0 and all((got[k] - after[k]).abs().max() < 2e-2 * moved for k in after)


def test_two_expert_parallel_ranks_train_like_the_torch_trainer(tmp_path, tiny_moe_checkpoint):
    """``train.expert_parallel=2`` on two CPU ranks: each holds two of the four experts, and the
    trainer still matches the torch trainer on the whole model."""
    got = ranks_train_like_the_torch_trainer(tmp_path, tiny_moe_checkpoint, "lora", ["train.expert_parallel=2"])
    assert got["implementation"] == "megatron-core GPTModel, TP=1, EP=2"
    assert got["experts"] == [0, 1]  # rank 0's half; rank 1 holds 2 and 3


def test_expert_parallel_bad_input(tmp_path, tiny_checkpoint, tiny_moe_checkpoint):
    recipe = str(small_recipe(tmp_path, tiny_moe_checkpoint))
    with pytest.raises(OrbitError, match="expert_parallel=2 needs train.backend=megatron"):
        load_recipe(recipe, ["train.expert_parallel=2", "peft.dropout=0.0"])
    with pytest.raises(OrbitError, match="at train.tensor_parallel=1"):
        load_recipe(recipe, ["train.backend=megatron", "train.expert_parallel=2", "train.tensor_parallel=2", "peft.dropout=0.0"])
    with pytest.raises(OrbitError, match="peft.dropout=0"):
        load_recipe(recipe, ["train.backend=megatron", "train.expert_parallel=2"])
    for checkpoint, overrides, message in [
        (tiny_moe_checkpoint, ["train.expert_parallel=3"], r"expert_parallel=3 needs an MoE base whose experts it divides \(qwen3_moe, 4"),
        (tiny_checkpoint, ["train.expert_parallel=2"], r"expert_parallel=2 needs an MoE base .*\(qwen3, 0 experts\)"),
        (tiny_moe_checkpoint, ["train.tensor_parallel=2"], "does not split MoE models"),
    ]:
        config = load_recipe(str(small_recipe(tmp_path, checkpoint)), ["train.backend=megatron", "peft.dropout=0.0", *overrides])
        policy = build_policy(config.model, config.peft, log=lambda m: None)
        with pytest.raises(OrbitError, match=message):
            MegatronTrainer(policy, config)
