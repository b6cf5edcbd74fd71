"""Mixture-of-experts models (Qwen3-MoE, Qwen2-MoE) against transformers on tiny random checkpoints."""

from __future__ import annotations

import pytest
import torch

from orbit_core.models import load_model
from orbit_core.models.moe import SparseMoE

SHAPE = dict(vocab_size=97, hidden_size=64, intermediate_size=96, moe_intermediate_size=32, num_hidden_layers=3,
             num_attention_heads=4, num_key_value_heads=2, num_experts=6, num_experts_per_tok=2,
             max_position_embeddings=128)


def save_moe(kind: str, path, **overrides):
    from transformers import Qwen2MoeConfig, Qwen2MoeForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM

    config_cls, model_cls = {"qwen3_moe": (Qwen3MoeConfig, Qwen3MoeForCausalLM),
                             "qwen2_moe": (Qwen2MoeConfig, Qwen2MoeForCausalLM)}[kind]
    torch.manual_seed(0)
    model = model_cls(config_cls(**{**SHAPE, **overrides})).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.normal_(0.0, 0.1)
    model.save_pretrained(str(path))
    return model


@pytest.mark.parametrize("kind, overrides, every_expert", [
    ("qwen3_moe", {"norm_topk_prob": True}, True),
    ("qwen3_moe", {"norm_topk_prob": False, "decoder_sparse_step": 2, "tie_word_embeddings": True}, False),
    ("qwen3_moe", {"mlp_only_layers": [0, 2]}, False),
    ("qwen2_moe", {"shared_expert_intermediate_size": 48}, False),
    ("qwen2_moe", {"shared_expert_intermediate_size": 48, "norm_topk_prob": True, "mlp_only_layers": [1]}, False),
])
def test_moe_logits_equal_transformers(tmp_path, kind, overrides, every_expert):
    hf = save_moe(kind, tmp_path, **overrides)
    ours = load_model(str(tmp_path))
    sparse = [i for i, layer in enumerate(ours.model.layers) if isinstance(layer.mlp, SparseMoE)]
    expected = [i for i in range(SHAPE["num_hidden_layers"]) if i not in overrides.get("mlp_only_layers", [])
                and (i + 1) % overrides.get("decoder_sparse_step", 1) == 0]
    assert sparse == expected
    routed: dict[int, set[int]] = {i: set() for i in sparse}

    def record(layer_idx):
        def hook(module, inputs):
            routed[layer_idx].update(module.route(inputs[0].reshape(-1, inputs[0].shape[-1]))[1].flatten().tolist())
        return hook

    for i in sparse:
        ours.model.layers[i].mlp.register_forward_pre_hook(record(i))
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 24), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = hf(ids).logits
        got = ours(ids)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=0)
    if every_expert:  # the routing really spreads: every expert of every MoE layer ran on some token
        assert all(experts == set(range(SHAPE["num_experts"])) for experts in routed.values())
    assert all(len(experts) > 1 for experts in routed.values())


def test_all_linear_adapts_attention_and_dense_layers_not_the_experts(tmp_path):
    from orbit_core.peft.base import target_linears

    save_moe("qwen2_moe", tmp_path, shared_expert_intermediate_size=48)
    names = target_linears(load_model(str(tmp_path)), ["all-linear"])
    assert "model.layers.0.self_attn.q_proj" in names and "model.layers.0.mlp.shared_expert.up_proj" in names
    assert not any(".experts." in n or n.endswith("mlp.gate") or "shared_expert_gate" in n for n in names)
    experts = target_linears(load_model(str(tmp_path)), ["*.experts.*.down_proj"])
    assert len(experts) == SHAPE["num_hidden_layers"] * SHAPE["num_experts"]


class _Tokenizer:
    eos_token_id, pad_token_id = None, 0

    def decode(self, ids, skip_special_tokens=False):
        return " ".join(map(str, ids))


def test_engine_generates_from_an_moe_model_with_the_trainers_logprobs(tmp_path):
    from orbit_core.rl.logprobs import token_logprobs
    from orbit_core.rollout.engine import BuiltinEngine
    from orbit_core.rollout.types import SamplingParams

    save_moe("qwen2_moe", tmp_path, shared_expert_intermediate_size=48)
    model = load_model(str(tmp_path))
    prompts = [[5, 6, 7, 8], [9, 10, 11]]
    completions = BuiltinEngine(model, _Tokenizer(), max_running=8, seed=0).generate(
        prompts, SamplingParams(max_new_tokens=6, temperature=1.0, n=2))
    assert len(completions) == 4
    for c in completions:
        ids = torch.tensor([c.prompt_ids + c.token_ids])
        with torch.no_grad():
            fresh = token_logprobs(model(ids[:, :-1]), ids[:, 1:])[0, len(c.prompt_ids) - 1:]
        torch.testing.assert_close(torch.tensor(c.logprobs), fresh, atol=2e-5, rtol=0)
