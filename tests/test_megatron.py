"""HF -> Megatron torch_dist -> HF is bit-exact; megatron-core reads what we write; bad roots fail clearly."""

from __future__ import annotations

import pytest
import torch
from safetensors.torch import load_file

from orbit_core.errors import OrbitError
from tests.conftest import save_hf_model

pytest.importorskip("megatron.core")

from orbit_core.convert.megatron import hf_to_megatron, megatron_to_hf, resolve_iteration_dir  # noqa: E402

CASES = {"qwen3": dict(head_dim=16), "qwen2-tied": dict(tie_word_embeddings=True), "llama-bias": dict(attention_bias=True)}


@pytest.mark.parametrize("case", sorted(CASES))
def test_round_trip_is_bit_exact(tmp_path, case):
    kind = case.split("-")[0]
    save_hf_model(kind, tmp_path / "src", **CASES[case])
    hf_to_megatron(str(tmp_path / "src"), str(tmp_path / "mg"))
    assert (tmp_path / "mg" / "latest_checkpointed_iteration.txt").read_text() == "0"
    megatron_to_hf(str(tmp_path / "mg"), str(tmp_path / "back"), str(tmp_path / "src"))
    before, after = load_file(str(tmp_path / "src" / "model.safetensors")), load_file(str(tmp_path / "back" / "model.safetensors"))
    assert sorted(before) == sorted(after)
    for name in before:
        assert before[name].dtype == after[name].dtype and torch.equal(before[name], after[name]), name


def test_megatron_core_reads_our_names_and_layout(tmp_path):
    from megatron.core import dist_checkpointing

    save_hf_model("qwen3", tmp_path / "src", head_dim=16)
    hf_to_megatron(str(tmp_path / "src"), str(tmp_path / "mg"))
    meta = dist_checkpointing.load_tensors_metadata(str(resolve_iteration_dir(str(tmp_path / "mg"))))
    source = load_file(str(tmp_path / "src" / "model.safetensors"))
    # per-layer tensors are stacked under one key each, with the layer axis first
    qkv = meta["decoder.layers.self_attention.linear_qkv.weight"]
    # 4 query heads in 2 groups of head_dim 16: [q q k v] per group -> (2 * (2 + 2)) * 16 rows
    assert tuple(qkv.global_shape) == (2, 128, 64)
    assert tuple(meta["decoder.layers.mlp.linear_fc1.weight"].global_shape) == (2, 256, 64)
    assert "decoder.layers.self_attention.q_layernorm.weight" in meta
    assert "output_layer.weight" in meta and "embedding.word_embeddings.weight" in meta
    # q/k/v fuse into one, gate/up into one, both norms fold into their linears: 8 stacked + 3 others
    assert len(meta) == 8 + 3 and len(source) == 3 + 2 * 11
    from orbit_core.convert.megatron import _process_group

    with _process_group():
        plain = dist_checkpointing.load_plain_tensors(str(resolve_iteration_dir(str(tmp_path / "mg"))))
    fused = plain["decoder.layers.self_attention.linear_qkv.weight"][0]
    q, k, v = (source[f"model.layers.0.self_attn.{p}_proj.weight"] for p in "qkv")
    # group 0 = query heads 0-1, then kv head 0's key and value
    assert torch.equal(fused[:32], q[:32]) and torch.equal(fused[32:48], k[:16]) and torch.equal(fused[48:64], v[:16])
    fc1 = plain["decoder.layers.mlp.linear_fc1.weight"][0]
    assert torch.equal(fc1[:128], source["model.layers.0.mlp.gate_proj.weight"])
    assert torch.equal(fc1[128:], source["model.layers.0.mlp.up_proj.weight"])



def test_missing_tracker_and_bad_input(tmp_path):
    with pytest.raises(OrbitError, match="latest_checkpointed_iteration.txt not found"):
        resolve_iteration_dir(str(tmp_path))
    (tmp_path / "latest_checkpointed_iteration.txt").write_text("7")
    with pytest.raises(OrbitError, match="names iter_0000007, which does not exist"):
        resolve_iteration_dir(str(tmp_path))
    with pytest.raises(OrbitError, match="not found"):
        hf_to_megatron(str(tmp_path / "nope"), str(tmp_path / "out"))


# -- megatron-core's own loading path, and the megatron trainer backend -------------------------------

GPT_CASES = {"qwen3": dict(head_dim=16), "qwen2": dict(), "llama-tied": dict(tie_word_embeddings=True)}


@pytest.mark.parametrize("case", sorted(GPT_CASES))
def test_gpt_model_loads_our_checkpoint_through_dist_checkpointing(tmp_path, case):
    """GPTModel(local spec).sharded_state_dict() -> dist_checkpointing.load -> transformers' logits."""
    from orbit_core.models.checkpoint import read_hf_config
    from orbit_core.models.config import DecoderConfig
    from orbit_core.models.megatron_gpt import build_gpt, cpu_shims, ensure_model_parallel, load_gpt

    hf = save_hf_model(case.split("-")[0], tmp_path / "src", **GPT_CASES[case])
    hf_to_megatron(str(tmp_path / "src"), str(tmp_path / "mg"))
    ensure_model_parallel(torch.device("cpu"))
    gpt = build_gpt(DecoderConfig.from_hf(read_hf_config(str(tmp_path / "src"))), torch.float32).eval()
    load_gpt(gpt, str(resolve_iteration_dir(str(tmp_path / "mg"))))
    ids = torch.randint(0, 97, (2, 24))
    positions = torch.arange(24)[None].expand(2, -1)
    causal = torch.triu(torch.ones(1, 1, 24, 24, dtype=torch.bool), diagonal=1)
    with torch.no_grad(), cpu_shims():
        ours = gpt(ids, positions, causal)
    with torch.no_grad():
        reference = hf(ids).logits
    assert (ours - reference).abs().max() < 1e-5


def test_another_architecture_is_named_by_its_first_mismatching_tensor(tmp_path):
    from orbit_core.models.checkpoint import read_hf_config
    from orbit_core.models.config import DecoderConfig
    from orbit_core.models.megatron_gpt import build_gpt, ensure_model_parallel, load_gpt

    save_hf_model("qwen3", tmp_path / "small", head_dim=16)
    save_hf_model("qwen3", tmp_path / "wide", head_dim=16, intermediate_size=192)
    hf_to_megatron(str(tmp_path / "small"), str(tmp_path / "mg"))
    ensure_model_parallel(torch.device("cpu"))
    gpt = build_gpt(DecoderConfig.from_hf(read_hf_config(str(tmp_path / "wide"))), torch.float32)
    with pytest.raises(OrbitError, match=r"decoder.layers.mlp.linear_fc2.weight is \(2, 64, 128\), this model's config "
                                         r"asks for \(2, 64, 192\)"):
        load_gpt(gpt, str(resolve_iteration_dir(str(tmp_path / "mg"))))


def test_the_cli_conversion_prints_no_megatron_import_noise(tmp_path):
    from tests.test_cli import run

    missing = run("convert", "hf-to-megatron", str(tmp_path / "nope"), str(tmp_path / "out"))
    assert missing.returncode == 2 and missing.stderr.strip().startswith("error: model checkpoint directory not found")
    assert len(missing.stderr.strip().splitlines()) == 1, missing.stderr
    save_hf_model("qwen3", tmp_path / "src", head_dim=16)
    done = run("convert", "hf-to-megatron", str(tmp_path / "src"), str(tmp_path / "mg"))
    assert done.returncode == 0, done.stderr
    assert "Transformer Engine and Apex" not in done.stderr, done.stderr
