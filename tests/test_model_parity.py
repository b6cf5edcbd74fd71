"""Orbit's native decoder against transformers on random checkpoints saved by transformers (fp32)."""

from __future__ import annotations

import json

import pytest
import torch

from orbit_core.errors import OrbitError
from orbit_core.models import load_model
from tests.conftest import save_hf_model

CASES = {
    "llama-llama3-rope-bias": ("llama", dict(attention_bias=True, rope_parameters={
        "rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
        "original_max_position_embeddings": 32, "rope_theta": 500000.0})),
    "llama-linear-rope": ("llama", dict(rope_parameters={"rope_type": "linear", "factor": 2.0, "rope_theta": 10000.0})),
    "qwen2-tied": ("qwen2", dict(tie_word_embeddings=True)),
    "qwen3-qk-norm": ("qwen3", dict(head_dim=32)),
    "qwen3-yarn": ("qwen3", dict(head_dim=16, rope_parameters={"rope_type": "yarn", "factor": 4.0,
                                                             "original_max_position_embeddings": 32, "rope_theta": 1e6})),
}


@pytest.mark.parametrize("case", sorted(CASES))
def test_logits_match_transformers(case, tmp_path):
    kind, overrides = CASES[case]
    reference = save_hf_model(kind, tmp_path, **overrides)
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, 97, (3, 70), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        expected = reference(ids).logits
        actual = ours(ids)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_sharded_checkpoint_loads(tmp_path):
    reference = save_hf_model("qwen3", tmp_path, max_shard_size="60KB")
    assert (tmp_path / "model.safetensors.index.json").is_file()
    ours = load_model(str(tmp_path))
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(ours(ids), reference(ids).logits, atol=1e-5, rtol=1e-5)


def test_orbit_save_shards_and_loads_back(tmp_path):
    from orbit_core.models import save_model

    save_hf_model("qwen3", tmp_path / "src")
    model = load_model(str(tmp_path / "src"))
    config = json.loads((tmp_path / "src" / "config.json").read_text())
    save_model(model, str(tmp_path / "out"), config, max_shard_bytes=50_000)
    index = json.loads((tmp_path / "out" / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    ids = torch.randint(0, 97, (2, 16))
    with torch.no_grad():
        torch.testing.assert_close(load_model(str(tmp_path / "out"))(ids), model(ids), atol=0, rtol=0)


def test_unsupported_architecture_is_one_clear_error(tmp_path):
    save_hf_model("qwen3", tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["model_type"] = "mamba"
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(OrbitError, match="unsupported architecture model_type='mamba'"):
        load_model(str(tmp_path))


def test_truncated_safetensors_names_the_file(tmp_path):
    save_hf_model("qwen3", tmp_path)
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:1000])
    with pytest.raises(OrbitError, match="model.safetensors is corrupted or truncated"):
        load_model(str(tmp_path))


def test_missing_checkpoint_dir(tmp_path):
    with pytest.raises(OrbitError, match="not found"):
        load_model(str(tmp_path / "nope"))
