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


@pytest.mark.parametrize("kind", ["qwen3_moe", "qwen2_moe"])
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_quantize_moe_keeps_per_expert_names_routers_in_bf16_and_reads_back(tmp_path, kind, fmt):
    import json

    from compressed_tensors.compressors import BaseCompressor
    from safetensors.torch import load_file

    from orbit_core.policy import load_base
    from orbit_core.preflight import check_checkpoint
    from orbit_core.quant import QuantLinear, quantize_checkpoint
    from orbit_core.quant.dequant import dequant_fp8_block, dequant_int4, dequant_nvfp4
    from orbit_core.quant.formats import format_from_config

    extra = {"shared_expert_intermediate_size": 48} if kind == "qwen2_moe" else {}
    save_moe(kind, tmp_path / "src", **extra)
    out = quantize_checkpoint(str(tmp_path / "src"), str(tmp_path / fmt), fmt, group_size=16)
    config = json.loads((out / "config.json").read_text())["quantization_config"]
    weight_format, ignored = format_from_config(config, "config.json")
    layers = range(SHAPE["num_hidden_layers"])
    routers = [f"model.layers.{i}.mlp.gate" for i in layers]
    gates = [f"model.layers.{i}.mlp.shared_expert_gate" for i in layers] if extra else []
    assert sorted(ignored) == sorted(["lm_head", *routers, *gates])
    tensors = load_file(str(out / "model.safetensors"))
    assert tensors["model.layers.0.mlp.gate.weight"].dtype == torch.bfloat16
    module = "model.layers.2.mlp.experts.5.down_proj"  # llm-compressor's per-expert name
    local = {k[len(module) + 1:]: v for k, v in tensors.items() if k.startswith(module + ".")}
    assert "weight" not in local or fmt == "fp8"
    theirs = BaseCompressor.get_value_from_registry(weight_format.storage).decompress(local, weight_format.scheme)["weight"]
    if fmt == "int4":
        ours = dequant_int4(local["weight_packed"], local["weight_scale"], tuple(local["weight_shape"].tolist()), torch.float32)
    elif fmt == "fp8":
        ours = dequant_fp8_block(local["weight"], local["weight_scale"], torch.float32)
    else:
        ours = dequant_nvfp4(local["weight_packed"], local["weight_scale"], local["weight_global_scale"], torch.float32)
    torch.testing.assert_close(ours.to(theirs.dtype).float(), theirs.float(), atol=1e-6, rtol=2**-7)
    report = check_checkpoint(str(out), str(tmp_path / "src"))
    assert report.passed, [c.detail for c in report.checks]
    model = load_base(str(out))
    packed = {n for n, m in model.named_modules() if isinstance(m, QuantLinear)}
    experts = {n for n in packed if ".experts." in n}
    assert len(experts) == SHAPE["num_hidden_layers"] * SHAPE["num_experts"] * 3
    assert not any(n in packed for n in routers + gates)
    ids = torch.randint(0, SHAPE["vocab_size"], (2, 12), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        logits = model(ids)
    assert torch.isfinite(logits).all()


def _moe_trainer(path, replay: bool):
    from orbit_core.config.loader import build_config
    from orbit_core.peft.lora import apply_lora
    from orbit_core.train.torch_backend import TorchTrainer

    config = build_config({"model": {"path": str(path), "device": "cpu"}, "rl": {"routing_replay": replay},
                           "train": {"global_batch_size": 4, "micro_batch_size": 2},
                           "rollout": {"batch_size": 2, "n_samples_per_prompt": 2}})
    model = load_model(str(path))
    apply_lora(model, 4, 8, 0.0, ["all-linear"])
    return TorchTrainer(model, config)


def test_engine_records_routing_the_trainer_reproduces_and_replay_overrides_it(tmp_path):
    from orbit_core.models.moe import moe_routing
    from orbit_core.rl.logprobs import token_logprobs
    from orbit_core.rollout.engine import BuiltinEngine
    from orbit_core.rollout.types import SamplingParams
    from orbit_core.train.batch import build_batch

    save_moe("qwen3_moe", tmp_path, norm_topk_prob=True)
    trainer = _moe_trainer(tmp_path, replay=False)
    completions = BuiltinEngine(trainer.model, _Tokenizer(), max_running=8, seed=0).generate(
        [[5, 6, 7, 8, 9], [10, 11, 12]], SamplingParams(max_new_tokens=7, temperature=1.0, n=2))
    for c in completions:
        assert c.routing.shape == (len(c.prompt_ids) + len(c.token_ids) - 1, SHAPE["num_hidden_layers"], 2)
    batch = build_batch(completions, torch.zeros(4), 0)
    natural, _ = trainer.score(batch)
    assert trainer.routing_mismatch() <= 0.02  # the trainer's own routing reproduces the engine's

    shifted = build_batch(completions, torch.zeros(4), 0)
    shifted.routing = (shifted.routing + 1) % SHAPE["num_experts"]  # a constructed engine-side disagreement
    trainer.score(shifted)
    assert trainer.routing_mismatch() > 0.9
    replaying = _moe_trainer(tmp_path, replay=True)
    replayed, _ = replaying.score(shifted)
    assert replaying.routing_mismatch() > 0.9  # the metric reports the trainer's own choice either way
    with torch.no_grad(), moe_routing(replaying.model, replay=shifted.routing):
        ids = shifted.input_ids
        manual = token_logprobs(replaying.model(ids[:, :-1]), ids[:, 1:]) * shifted.response_mask
    torch.testing.assert_close(replayed * shifted.response_mask, manual, atol=1e-5, rtol=0)
    assert ((replayed - natural).abs() * shifted.response_mask).max() > 1e-3


@pytest.mark.parametrize("method", ["lora", "oft"])
@pytest.mark.parametrize("replay", [False, True])
def test_moe_training_logs_routing_mismatch(tmp_path, tiny_checkpoint, replay, method):
    import shutil
    from pathlib import Path

    from orbit_core.config import load_recipe
    from orbit_core.train import Callbacks, run_training
    from tests.helpers import small_recipe

    save_moe("qwen2_moe", tmp_path / "moe", shared_expert_intermediate_size=48)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tiny_checkpoint) / name).is_file():
            shutil.copy(Path(tiny_checkpoint) / name, tmp_path / "moe" / name)
    # rewards that vary within every group, so the update has signal whatever the random model answers
    (tmp_path / "noisy.py").write_text("import random\n\ndef score(prompt, response, label):\n    return random.random()\n")
    rl = {"routing_replay": replay, "reward": f"{tmp_path / 'noisy.py'}:score"}
    recipe = small_recipe(tmp_path, str(tmp_path / "moe"), rl=rl, train={"steps": 2},
                          eval={"enabled": False}, peft={"method": method, "oft_block_size": 16})
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert result.steps_done == 2
    from orbit_core.train import list_checkpoints, load_adapter

    adapter, _ = load_adapter(list_checkpoints(str(tmp_path / "run"))[-1][1])
    assert adapter and not any(".experts." in n or n.endswith("mlp.gate.weight") for n in adapter)
    assert any(t.abs().sum() > 0 for n, t in adapter.items() if "lora_B" in n or "oft_skew" in n)  # it trained
    for row in result.metrics:
        assert 0.0 <= row["moe/routing_mismatch_fraction"] <= 0.05  # engine and trainer route alike on the CPU
        assert row["rollout/behaviour_proximal_logprob_abs_diff_max"] < 1e-3


# -- active-expert-chunked dequantization on a packed base -----------------------------------------

@pytest.fixture(scope="module")
def int4_moe(tmp_path_factory):
    from orbit_core.quant import quantize_checkpoint

    root = tmp_path_factory.mktemp("moe-int4")
    save_moe("qwen2_moe", root / "src", shared_expert_intermediate_size=48, num_experts=8, num_experts_per_tok=2)
    return str(quantize_checkpoint(str(root / "src"), str(root / "int4"), "int4", group_size=16))


def _forward_backward(model, ids):
    from orbit_core.peft.base import adapter_parameters

    model.zero_grad(set_to_none=True)
    logits = model(ids)
    (logits.float().logsumexp(-1).mean()).backward()
    # an expert no token routes to gets no gradient on either path
    return logits.detach(), [torch.zeros_like(p) if p.grad is None else p.grad.clone() for p in adapter_parameters(model)]


@pytest.mark.parametrize("chunk, bank, targets, method", [
    (2, True, "all-linear", "lora"), (3, True, "all-linear", "lora"), (8, True, "all-linear", "lora"),
    (3, False, "all-linear", "lora"), (3, True, "*.experts.*", "lora"), (2, False, "*.experts.*.down_proj", "lora"),
    (3, True, "*.experts.*", "oft"),
])
def test_chunked_experts_equal_each_experts_own_modules(int4_moe, chunk, bank, targets, method, monkeypatch):
    """Forward logits and the adapter's gradients (through every MoE layer's experts) in fp32."""
    from orbit_core.models.moe import moe_layers, set_dequant_chunk, take_dequant_count
    from orbit_core.models.moe_experts import _BUFFERS, release_buffers
    from orbit_core.peft.lora import apply_lora
    from orbit_core.policy import load_base

    from orbit_core.quant.experts import ExpertBank

    model = load_base(int4_moe)
    assert all(layer.expert_bank is not None for layer in moe_layers(model))  # int4 experts are stacked at load
    if not bank:
        for layer in moe_layers(model):
            layer.expert_bank = None
    sizes: list[int] = []
    stacked = ExpertBank.dequantize_kind
    monkeypatch.setattr(ExpertBank, "dequantize_kind",
                        lambda self, ids, dtype, kind: sizes.append(len(ids)) or stacked(self, ids, dtype, kind))
    if method == "oft":
        from orbit_core.peft.oft import apply_oft

        targets_adapted = apply_oft(model, 16, False, 6e-5, False, ["all-linear", targets])
    else:
        targets_adapted = apply_lora(model, 4, 8, 0.0, ["all-linear", targets])
    assert any(".experts." in t for t in targets_adapted) == (targets != "all-linear")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name or "oft_skew" in name:
                p.normal_(0.0, 0.1)
    ids = torch.randint(0, SHAPE["vocab_size"], (3, 10), generator=torch.Generator().manual_seed(4))
    set_dequant_chunk(model, 0)
    reference_logits, reference_grads = _forward_backward(model, ids)
    assert take_dequant_count(model) == 0
    release_buffers()
    set_dequant_chunk(model, chunk)
    traces = []
    from orbit_core.models.moe import moe_routing

    with moe_routing(model) as traces:
        logits, grads = _forward_backward(model, ids)
    torch.testing.assert_close(logits, reference_logits, atol=1e-5, rtol=1e-5)
    for ours, theirs in zip(grads, reference_grads):
        torch.testing.assert_close(ours, theirs, atol=1e-5, rtol=1e-4)
    active = sum(len(trace[0].unique()) for trace in traces)
    assert take_dequant_count(model) == 2 * active  # once in forward, once more in backward
    # three tokens route to at most six of each layer's eight experts: only those are dequantized
    with moe_routing(model) as traces:
        _forward_backward(model, ids[:1, :3])
    active = sum(len(trace[0].unique()) for trace in traces)
    assert take_dequant_count(model) == 2 * active and active <= len(moe_layers(model)) * 6
    # the extra memory is `chunk` experts' weights at a time, whatever the expert count: one stacked
    # dequantization of at most `chunk` experts, or one reused buffer of `chunk` experts per weight kind
    if bank:
        assert sizes and max(sizes) <= chunk and not _BUFFERS
    else:
        assert not sizes and {tuple(t.shape)[0] for t in _BUFFERS.values()} == {chunk} and len(_BUFFERS) == 3


def test_chunk_smaller_than_top_k_is_refused(int4_moe, tmp_path):
    from orbit_core.errors import OrbitError
    from orbit_core.models.moe import set_dequant_chunk
    from orbit_core.policy import load_base

    with pytest.raises(OrbitError, match=r"moe.dequant_chunk_experts=1 is smaller than the model's top-k \(2\)"):
        set_dequant_chunk(load_base(int4_moe), 1)


def test_training_on_a_packed_moe_logs_the_experts_it_dequantized(tmp_path, int4_moe, tiny_checkpoint, monkeypatch):
    import shutil
    from pathlib import Path

    from orbit_core.config import load_recipe
    from orbit_core.train import Callbacks, run_training
    from tests.helpers import small_recipe

    base = tmp_path / "base"
    shutil.copytree(int4_moe, base)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        if (Path(tiny_checkpoint) / name).is_file():
            shutil.copy(Path(tiny_checkpoint) / name, base / name)
    recipe = small_recipe(tmp_path, str(base), train={"steps": 2}, eval={"enabled": False},
                          moe={"dequant_chunk_experts": 4, "grouped_gemm": "loop"})
    from orbit_core.models import moe_experts

    monkeypatch.setitem(moe_experts.GROUPED_MM, "impl", "auto")
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert moe_experts.GROUPED_MM["impl"] == "loop"  # moe.grouped_gemm reached the process's MoE layers
    rows = [row for row in result.metrics if "time/step_s" in row]
    # rollout, scoring and the update each dequantize only routed experts: never more than all of them, per pass
    assert all(0 < row["moe/experts_dequantized"] for row in rows)
    from orbit_core.errors import OrbitError

    with pytest.raises(OrbitError, match="smaller than the model's top-k"):
        run_training(load_recipe(str(recipe), ["moe.dequant_chunk_experts=1", f"train.output_dir={tmp_path / 'r2'}"]),
                     Callbacks(on_message=lambda m: None))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("grouped_mm, targets", [("triton", "all-linear"), ("cutlass", "all-linear"), ("loop", "all-linear"),
                                                 ("triton", "*.experts.*"), ("cutlass", "*.experts.*")])
def test_chunked_experts_on_the_gpu_match_each_experts_modules_in_bf16(int4_moe, grouped_mm, targets, monkeypatch):
    """Stacked int4 dequantization + grouped GEMM (forward and backward) against the per-expert path."""
    from orbit_core.models import moe_experts
    from orbit_core.models.moe import set_dequant_chunk
    from orbit_core.peft.lora import apply_lora
    from orbit_core.policy import load_base

    monkeypatch.setitem(moe_experts.GROUPED_MM, "impl", grouped_mm)
    model = load_base(int4_moe, "bfloat16", "cuda")
    apply_lora(model, 16, 32, 0.0, ["all-linear", targets])
    model.to("cuda")
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.1)
    ids = torch.randint(0, SHAPE["vocab_size"], (4, 16), device="cuda", generator=torch.Generator("cuda").manual_seed(0))
    set_dequant_chunk(model, 0)
    reference, reference_grads = _forward_backward(model, ids)
    set_dequant_chunk(model, 4)
    chunked, grads = _forward_backward(model, ids)
    assert (chunked.float() - reference.float()).abs().max() < 0.05 * reference.float().abs().max()
    for ours, theirs in zip(grads, reference_grads):
        assert (ours.float() - theirs.float()).norm() < 0.05 * theirs.float().norm() + 1e-6
