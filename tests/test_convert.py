"""Exported adapters load in HF peft with Orbit's logits; merged checkpoints load in transformers."""

from __future__ import annotations

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.convert import export_peft_adapter, merge_adapter
from orbit_core.errors import OrbitError
from orbit_core.models import load_model
from orbit_core.peft.base import load_adapter_state_dict
from orbit_core.train import Callbacks, load_adapter, run_training
from orbit_core.policy import apply_adapter, resolve_adapter_dir
from tests.conftest import save_hf_model
from tests.helpers import small_recipe


def _trained_run(tmp_path, checkpoint, method, estimator="grpo"):
    rl = {"advantage_estimator": estimator, "value_head": estimator == "ppo"}
    recipe = small_recipe(tmp_path, checkpoint, rl=rl, peft={"method": method, "oft_block_size": 16, "dropout": 0.0},
                          train={"steps": 2, "lr": 5e-2}, eval={"enabled": False})
    config = load_recipe(str(recipe))
    run_training(config, Callbacks(on_message=lambda m: None))
    return tmp_path / "run", config


def _orbit_logits(base, run_dir, config, ids):
    model = load_model(str(base))
    apply_adapter(model, config.peft)
    state, _ = load_adapter(resolve_adapter_dir(str(run_dir)))
    load_adapter_state_dict(model, {k: v for k, v in state.items() if not k.startswith("value_head.")})
    with torch.no_grad():
        return model(ids)


@pytest.mark.parametrize("method, estimator", [("lora", "grpo"), ("oft", "grpo"), ("lora", "ppo")])
def test_peft_loads_exported_adapter_with_same_logits(tmp_path, method, estimator):
    peft = pytest.importorskip("peft")
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_hf_model("qwen3", base, vocab_size=18, head_dim=16)
    from orbit_core.models.char_tokenizer import build_char_tokenizer
    from orbit_core.data.arith import ALPHABET

    build_char_tokenizer(ALPHABET, str(base))
    run_dir, config = _trained_run(tmp_path, str(base), method, estimator)
    out = export_peft_adapter(str(run_dir), str(tmp_path / "peft"))
    ids = torch.randint(0, 18, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _orbit_logits(base, run_dir, config, ids)
    hf = AutoModelForCausalLM.from_pretrained(str(base), dtype=torch.float32)
    with torch.no_grad():
        plain = hf(ids).logits
    adapted = peft.PeftModel.from_pretrained(hf, str(out)).eval()
    with torch.no_grad():
        actual = adapted(ids).logits
    assert (expected - plain).abs().max() > 1e-3  # the adapter changes the model
    torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4)  # fp32, different op order
    with pytest.raises(OrbitError, match="is not empty"):
        export_peft_adapter(str(run_dir), str(out))


@pytest.mark.parametrize("method", ["lora", "oft"])
def test_merged_checkpoint_loads_in_transformers(tmp_path, method):
    from transformers import AutoModelForCausalLM

    base = tmp_path / "base"
    save_hf_model("qwen3", base, vocab_size=18, head_dim=16)
    from orbit_core.models.char_tokenizer import build_char_tokenizer
    from orbit_core.data.arith import ALPHABET

    build_char_tokenizer(ALPHABET, str(base))
    run_dir, config = _trained_run(tmp_path, str(base), method)
    ids = torch.randint(0, 18, (2, 12), generator=torch.Generator().manual_seed(0))
    expected = _orbit_logits(base, run_dir, config, ids)
    merged_fp32 = merge_adapter(str(base), str(run_dir), str(tmp_path / "merged32"), dtype="float32")
    merged_bf16 = merge_adapter(str(base), str(run_dir), str(tmp_path / "merged"), dtype="bfloat16")
    with torch.no_grad():
        fp32 = AutoModelForCausalLM.from_pretrained(str(merged_fp32), dtype=torch.float32)(ids).logits
        hf = AutoModelForCausalLM.from_pretrained(str(merged_bf16))
        assert hf.dtype == torch.bfloat16
        bf16 = hf.float()(ids).logits
    torch.testing.assert_close(fp32, expected, atol=1e-4, rtol=1e-4)
    assert (bf16 - expected).abs().max() < 0.1  # bf16 weight rounding only
    assert (merged_bf16 / "tokenizer.json").is_file()
