"""``train.backend=megatron`` against the torch backend: same logprobs, same update, HF-named adapters."""

from __future__ import annotations


import pytest
import torch

pytest.importorskip("megatron.core")

from orbit_core.config import load_recipe  # noqa: E402
from orbit_core.errors import OrbitError  # noqa: E402
from orbit_core.policy.adapter_files import load_adapter  # noqa: E402
from orbit_core.policy.build import build_policy  # noqa: E402
from orbit_core.rollout.engine import BuiltinEngine  # noqa: E402
from orbit_core.rollout.types import SamplingParams  # noqa: E402
from orbit_core.train import Callbacks, list_checkpoints, run_training  # noqa: E402
from orbit_core.train.batch import build_batch  # noqa: E402
from orbit_core.train.megatron_backend import MegatronTrainer  # noqa: E402
from orbit_core.train.torch_backend import TorchTrainer  # noqa: E402
from tests.helpers import small_recipe, without_package  # noqa: E402
from tests.test_cli import run  # noqa: E402


@pytest.fixture(scope="module")
def packed_checkpoints(tiny_checkpoint, tmp_path_factory):
    from orbit_core.quant import quantize_checkpoint

    root = tmp_path_factory.mktemp("q")
    return {fmt: str(quantize_checkpoint(tiny_checkpoint, str(root / fmt), fmt, group_size=32)) for fmt in ("int4", "fp8", "nvfp4")}


def _pair(tmp_path, checkpoint, method, overrides=None, megatron=True):
    overrides = overrides or [f"peft.method={method}", "peft.oft_block_size=16", "peft.dropout=0.0", "rl.kl_coef=0.0",
                              "rl.use_kl_loss=false"]
    config = load_recipe(str(small_recipe(tmp_path, checkpoint)), overrides)
    torch.manual_seed(0)
    reference = build_policy(config.model, config.peft, log=lambda m: None)
    torch.manual_seed(0)
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    return config, TorchTrainer(reference.model, config), MegatronTrainer(policy, config) if megatron else None, reference


@pytest.mark.parametrize("method,base", [("lora", "fp32"), ("oft", "fp32"), ("lora", "int4"), ("oft", "int4"),
                                         ("lora", "fp8"), ("lora", "nvfp4")])
def test_megatron_trainer_matches_the_torch_trainer(tmp_path, tiny_checkpoint, packed_checkpoints, method, base):
    config, torch_side, megatron_side, reference = _pair(tmp_path, packed_checkpoints.get(base, tiny_checkpoint), method)
    if base != "fp32":  # the GPTModel holds Orbit's packed linears, not dense copies
        from orbit_core.quant import QuantLinear

        packed = [m for m in megatron_side.model.modules() if isinstance(m, QuantLinear)]
        assert len(packed) == 7 * 2 and not any(p.numel() > 4096 for p in megatron_side.model.gpt.decoder.parameters()
                                                if not p.requires_grad)
    # a non-trivial adapter on both sides (LoRA's B and OFT's skew start at zero)
    torch.manual_seed(1)
    state = {name: torch.randn_like(t) * 0.2 for name, t in torch_side.adapter_state().items()}
    torch_side.load_adapter(state, "test")
    megatron_side.load_adapter(state, "test")
    assert sorted(megatron_side.adapter_state()) == sorted(state)  # HF names on the way out
    engine = BuiltinEngine(reference.model, reference.tokenizer, seed=0)
    completions = engine.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_new_tokens=6, n=4))
    batch = build_batch(completions, torch.randn(8), reference.tokenizer.pad_token_id or 0)
    theirs, ours = torch_side.score(batch)[0], megatron_side.score(batch)[0]
    assert (theirs - ours).abs().max() < 1e-5
    assert (torch_side.reference_logprobs(batch) - megatron_side.reference_logprobs(batch)).abs().max() < 1e-5
    batch.old_logprobs = theirs.clone()
    batch.advantages = torch.randn(len(batch))[:, None].expand_as(theirs).contiguous() * batch.response_mask
    before = {k: v.clone() for k, v in megatron_side.adapter_state().items()}
    a, b = torch_side.update(batch), megatron_side.update(batch)
    assert abs(a["loss"] - b["loss"]) < 1e-5 and abs(a["grad_norm"] - b["grad_norm"]) < 1e-4 * max(1.0, a["grad_norm"])
    # where gradients flow: every adapter tensor gets the torch trainer's gradient (clipped the same)
    grads_torch = {n: p.grad for n, p in torch_side.model.named_parameters() if p.requires_grad}
    grads_megatron = {megatron_side.to_hf[n]: p.grad for n, p in megatron_side.model.named_parameters() if p.requires_grad}
    assert sorted(grads_torch) == sorted(grads_megatron)
    scale = max(g.abs().max() for g in grads_torch.values())
    for name, grad in grads_torch.items():
        assert (grad - grads_megatron[name]).abs().max() < 1e-4 * scale, name
    after_megatron = megatron_side.adapter_state()
    assert max((after_megatron[k] - before[k]).abs().max() for k in before) > 1e-4
    # the engine's copy follows the trainer after the update
    engine_copy = {k: v for k, v in megatron_side.engine_model.state_dict().items() if k in after_megatron}
    assert all(torch.equal(engine_copy[k], after_megatron[k]) for k in engine_copy) and engine_copy


def test_megatron_run_saves_hf_named_adapters_and_gates_on_parity(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"backend": "megatron", "steps": 2}, preflight={"runtime": True},
                          eval={"enabled": False})
    messages: list[str] = []
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=messages.append))
    assert result.steps_done == 2
    gate = [m for m in messages if m.startswith("runtime preflight")]
    assert gate and "Orbit builtin engine (in process) vs megatron-core GPTModel" in gate[0]
    adapter, adapter_config = load_adapter(list_checkpoints(tmp_path / "run")[-1][1])
    assert all(name.startswith("model.layers.") for name in adapter)
    assert adapter_config["recipe"]["train"]["backend"] == "megatron"
    # `orbit eval` reads it with the torch model
    out = run("eval", "--adapter", str(tmp_path / "run"), "eval.n_samples=2", "eval.k=[1]")
    assert out.returncode == 0, out.stderr[-1500:]
    # peft reads the export back; merge-adapter folds it into the base
    out = run("convert", "export-adapter", str(tmp_path / "run"), str(tmp_path / "peft"))
    assert out.returncode == 0, out.stderr[-1500:]
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    peft_model = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_checkpoint), str(tmp_path / "peft"))
    assert peft_model.peft_config["default"].r == 4
    out = run("convert", "merge-adapter", tiny_checkpoint, str(tmp_path / "run"), str(tmp_path / "merged"))
    assert out.returncode == 0 and (tmp_path / "merged" / "config.json").is_file(), out.stderr[-1500:]


def test_megatron_bad_input(tmp_path, tiny_checkpoint):
    recipe = small_recipe(tmp_path, tiny_checkpoint)
    with pytest.raises(OrbitError, match="does not build activation checkpointing"):
        load_recipe(str(recipe), ["train.backend=megatron", "train.activation_checkpointing=full"])
    with pytest.raises(OrbitError, match="train.compile=on compiles the torch trainer"):
        load_recipe(str(recipe), ["train.backend=megatron", "train.compile=on"])
    out = run("train", "--recipe", str(recipe), "train.backend=megatron", env_extra=without_package(tmp_path, "megatron"))
    assert out.returncode == 2 and "orbit-rl[megatron]" in out.stderr and "Traceback" not in out.stderr
    assert not (tmp_path / "run" / "checkpoints").exists()


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_two_tensor_parallel_ranks_give_orbits_logits(tmp_path, method):
    """The README's TP sharding of each adapter, on two CPU ranks (gloo): the GPTModel at TP=2 with
    the adapter sharded by ``shard_adapter`` gives the logits of Orbit's own model with the whole adapter."""
    import subprocess
    import sys

    from safetensors.torch import save_file

    from orbit_core.config.schema import PeftSection
    from orbit_core.convert.megatron import hf_to_megatron
    from orbit_core.peft.base import adapter_state_dict, load_adapter_state_dict
    from orbit_core.policy import load_base
    from orbit_core.policy.build import apply_adapter
    from tests.conftest import save_hf_model

    save_hf_model("qwen3", tmp_path / "src", head_dim=16, vocab_size=96)  # vocab splits evenly over 2 ranks
    hf_to_megatron(str(tmp_path / "src"), str(tmp_path / "mg"))
    reference = load_base(str(tmp_path / "src"))
    apply_adapter(reference, PeftSection(method=method, rank=4, alpha=8, oft_block_size=8))
    torch.manual_seed(5)
    adapter = {name: torch.randn_like(t) * 0.2 for name, t in adapter_state_dict(reference).items()}
    load_adapter_state_dict(reference, adapter)
    save_file(adapter, str(tmp_path / "adapter.safetensors"))
    init = f"file://{tmp_path / 'pg'}"
    workers = [subprocess.Popen([sys.executable, "-m", "tests.megatron_tp_worker", str(rank), "2", init,
                                 str(tmp_path / "src"), str(tmp_path / "mg"), str(tmp_path / "adapter.safetensors"),
                                 method, str(tmp_path / "logits.pt")], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                text=True) for rank in range(2)]
    for worker in workers:
        _, err = worker.communicate(timeout=300)
        assert worker.returncode == 0, err[-3000:]
    ids = torch.arange(2 * 12).reshape(2, 12) % 96
    with torch.no_grad():
        expected = reference(ids)
    assert (torch.load(tmp_path / "logits.pt") - expected).abs().max() < 1e-4


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_two_tensor_parallel_ranks_train_like_the_torch_trainer(tmp_path, tiny_checkpoint, method):
    """``train.tensor_parallel=2`` on two CPU ranks (gloo): the same logprobs, loss, gradient norm and
    updated adapter as Orbit's torch trainer on the whole model."""
    got = ranks_train_like_the_torch_trainer(tmp_path, tiny_checkpoint, method, ["train.tensor_parallel=2"])
    assert got["implementation"] == "megatron-core GPTModel, TP=2"


def ranks_train_like_the_torch_trainer(tmp_path, checkpoint, method, parallel: list[str]) -> dict:
    """Rank 0 (``tests.megatron_tp_train_worker``) and the ranks it starts, against the torch trainer
    on the whole model: logprobs, reference logprobs, loss, clipped gradient norm, the adapter after
    one AdamW step, and logits after it. Returns what rank 0 saved."""
    import subprocess
    import sys

    overrides = [f"peft.method={method}", "peft.oft_block_size=16", "peft.dropout=0.0", "rl.kl_coef=0.0",
                 "rl.use_kl_loss=false", "train.grad_clip=0.05"]  # a clip that bites, so the ranks' norm matters
    recipe = small_recipe(tmp_path, checkpoint)
    config, torch_side, _, reference = _pair(tmp_path, checkpoint, method, overrides, megatron=False)
    torch.manual_seed(1)
    state = {name: torch.randn_like(t) * 0.2 for name, t in torch_side.adapter_state().items()}
    torch_side.load_adapter(state, "test")
    engine = BuiltinEngine(reference.model, reference.tokenizer, seed=0)
    completions = engine.generate([[5, 6, 7, 8], [9, 10, 11]], SamplingParams(max_new_tokens=6, n=4))
    batch = build_batch(completions, torch.randn(8), reference.tokenizer.pad_token_id or 0)
    score = torch_side.score(batch)[0]
    reference_logprobs = torch_side.reference_logprobs(batch)
    old, advantages = score.clone(), torch.randn(len(batch))[:, None].expand_as(score).contiguous() * batch.response_mask
    ids = torch.tensor([[3, 4, 5, 6, 7, 8]])
    torch.save({"overrides": overrides + ["train.backend=megatron", *parallel], "adapter": state,
                "batch": batch, "old_logprobs": old, "advantages": advantages, "ids": ids}, tmp_path / "inputs.pt")
    batch.old_logprobs, batch.advantages = old, advantages
    stats = torch_side.update(batch)
    with torch.no_grad():  # the worker asks for these after its update
        logits = torch_side.model(ids)
    rank0 = subprocess.run([sys.executable, "-m", "tests.megatron_tp_train_worker", str(recipe), str(tmp_path / "inputs.pt"),
                            str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=600)
    assert rank0.returncode == 0, rank0.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt", weights_only=False)
    assert (got["score"] - score).abs().max() < 1e-5
    assert (got["reference"] - reference_logprobs).abs().max() < 1e-5
    # after the update, so Adam's small-gradient sensitivity (below) shows here too
    assert (got["logits"] - logits).abs().max() < 1e-3
    assert abs(got["stats"]["loss"] - stats["loss"]) < 1e-5
    assert abs(got["stats"]["grad_norm"] - stats["grad_norm"]) < 1e-4 * max(1.0, stats["grad_norm"])
    assert stats["grad_norm"] > 0.05  # the clip applied on both sides
    after = torch_side.adapter_state()
    assert sorted(got["adapter"]) == sorted(after)
    moved = max((after[k] - state[k]).abs().max() for k in after)
    # every tensor, gathered from its two shards, took the same AdamW step. Adam divides by |g|, so where
    # a gradient is ~0 a summation-order difference moves the step a little; a missing or double
    # all-reduce would be off by a whole step
    for name, tensor in after.items():
        assert (got["adapter"][name] - tensor).abs().max() < 2e-2 * moved, name
    assert got["engine"] and all(torch.equal(got["engine"][k], got["adapter"][k]) for k in got["engine"])
    assert got["state_ranks"] == 2
    return got


def test_tensor_parallel_bad_input(tmp_path, tiny_checkpoint):
    recipe = str(small_recipe(tmp_path, tiny_checkpoint))
    with pytest.raises(OrbitError, match="needs train.backend=megatron"):
        load_recipe(recipe, ["train.tensor_parallel=2"])
    with pytest.raises(OrbitError, match="peft.dropout=0"):
        load_recipe(recipe, ["train.backend=megatron", "train.tensor_parallel=2", "peft.dropout=0.1"])
    config = load_recipe(recipe, ["train.backend=megatron", "train.tensor_parallel=4", "peft.dropout=0.0"])
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    with pytest.raises(OrbitError, match=r"tensor_parallel=4 does not divide the model's vocab_size \(18\)"):
        MegatronTrainer(policy, config)


@pytest.mark.parametrize("checkpoint, parallel, implementation", [
    ("tiny_checkpoint", {"tensor_parallel": 2}, "megatron-core GPTModel, TP=2"),
    ("tiny_moe_checkpoint", {"expert_parallel": 2}, "megatron-core GPTModel, TP=1, EP=2"),
])
def test_parallel_run_saves_whole_adapters_and_resumes(tmp_path, request, checkpoint, parallel, implementation):
    """``orbit train`` at TP=2, or EP=2 on an MoE (rank 1 started by the run): the runtime preflight runs
    every rank, the checkpoint holds the whole HF-named adapter, and a resume restores both ranks'
    optimizer state."""
    from orbit_core.peft.base import adapter_state_dict

    recipe = small_recipe(tmp_path, request.getfixturevalue(checkpoint), train={"backend": "megatron", "steps": 2, **parallel},
                          peft={"dropout": 0.0}, preflight={"runtime": True}, eval={"enabled": False})
    out = run("train", "--recipe", str(recipe))
    assert out.returncode == 0, out.stderr[-3000:]
    assert implementation in out.stdout
    adapter, _ = load_adapter(list_checkpoints(tmp_path / "run")[-1][1])
    config = load_recipe(str(recipe))
    whole = adapter_state_dict(build_policy(config.model, config.peft, log=lambda m: None).model)
    assert {n: t.shape for n, t in adapter.items()} == {n: t.shape for n, t in whole.items()}
    out = run("train", "--recipe", str(recipe), "train.steps=3")
    assert out.returncode == 0, out.stderr[-3000:]
    assert [step for step, _ in list_checkpoints(tmp_path / "run")][-1] == 3


def test_ranks_waiting_longer_than_their_limit_for_rank_0_are_kept_by_its_pings(tmp_path, tiny_checkpoint):
    """Ranks 1..N-1 wait for the next call while rank 0 generates rollouts, which on a large model
    can outlast their limit: rank 0 pings them between calls. Here rank 0 idles for two limits of
    6 s, then loads an adapter on both ranks and gathers it back whole."""
    import subprocess
    import sys

    from orbit_core.peft.base import adapter_state_dict

    recipe = small_recipe(tmp_path, tiny_checkpoint)
    config = load_recipe(str(recipe), ["peft.dropout=0.0"])
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    torch.manual_seed(4)
    state = {name: torch.randn_like(t) * 0.2 for name, t in adapter_state_dict(policy.model).items()}
    torch.save({"overrides": ["peft.dropout=0.0", "train.backend=megatron", "train.tensor_parallel=2"],
                "adapter": state, "idle_timeout_s": 6.0, "idle_s": 12.5}, tmp_path / "inputs.pt")
    rank0 = subprocess.run([sys.executable, "-m", "tests.megatron_tp_train_worker", str(recipe), str(tmp_path / "inputs.pt"),
                            str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert rank0.returncode == 0, rank0.stderr[-3000:]
    gathered = torch.load(tmp_path / "out.pt")["adapter"]
    assert gathered.keys() == state.keys()
    assert all(torch.equal(gathered[name], state[name]) for name in state)


def test_a_call_failing_on_rank_0_stops_the_other_ranks_at_once(tmp_path, tiny_checkpoint):
    """Rank 1 waits inside a collective for rank 0, which failed: closing kills it rather than
    leaving it (and rank 0's goodbye) to wait out the process-group timeout."""
    import subprocess
    import sys

    recipe = small_recipe(tmp_path, tiny_checkpoint)
    config = load_recipe(str(recipe), ["peft.dropout=0.0"])
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    engine = BuiltinEngine(policy.model, policy.tokenizer, seed=0)
    batch = build_batch(engine.generate([[5, 6, 7, 8]], SamplingParams(max_new_tokens=6, n=2)), torch.randn(2), 0)
    torch.save({"overrides": ["peft.dropout=0.0", "train.backend=megatron", "train.tensor_parallel=2"], "batch": batch,
                "fail_mid_call": True}, tmp_path / "inputs.pt")
    rank0 = subprocess.run([sys.executable, "-m", "tests.megatron_tp_train_worker", str(recipe), str(tmp_path / "inputs.pt"),
                            str(tmp_path / "out.pt")], capture_output=True, text=True, timeout=300)
    assert rank0.returncode == 0, rank0.stderr[-3000:]
    got = torch.load(tmp_path / "out.pt")
    assert got["alive"] == [False] and got["close_s"] < 30
