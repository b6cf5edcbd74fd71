"""Preflight gates: a healthy int4 pair passes; a corrupted checkpoint and a wrong-rope engine fail."""

from __future__ import annotations

import shutil

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.config.schema import PreflightSection
from orbit_core.errors import OrbitError
from orbit_core.preflight.run import run_preflight
from orbit_core.quant import quantize_checkpoint
from orbit_core.train import Callbacks, run_training
from tests.helpers import small_recipe
from tests.test_cli import run


@pytest.fixture(scope="module")
def int4_checkpoint(tmp_path_factory):
    from tests.conftest import make_tiny_checkpoint

    root = tmp_path_factory.mktemp("pf")
    source = make_tiny_checkpoint(root / "src", seed=3)
    return source, str(quantize_checkpoint(source, str(root / "int4"), "int4", group_size=16))


def _recipe(tmp_path, int4_checkpoint, **preflight):
    source, quantized = int4_checkpoint
    return small_recipe(tmp_path, quantized, preflight={"source_path": source, "num_prompts": 4, "max_new_tokens": 8, **preflight})


def test_healthy_pair_passes(tmp_path, int4_checkpoint):
    result = run_preflight(load_recipe(str(_recipe(tmp_path, int4_checkpoint))), "int4", log=lambda m: None)
    assert result.passed
    assert result.runtime.tokens > 0 and result.runtime.max_abs_diff < 1e-4 and result.runtime.topk_agreement == 1.0


def test_preflight_takes_the_trainer_backend_from_the_recipe(tmp_path, int4_checkpoint):
    pytest.importorskip("megatron.core")
    recipe = load_recipe(str(_recipe(tmp_path, int4_checkpoint)), ["train.backend=megatron"])
    result = run_preflight(recipe, "int4", log=lambda m: None)
    assert (result.runtime.engine, result.runtime.trainer) == ("Orbit builtin engine (in process)", "megatron-core GPTModel")
    assert result.passed and result.runtime.max_abs_diff < 1e-4
    broken = run_preflight(recipe, "int4", log=lambda m: None, engine_overrides={"rope_theta": 31.0})
    assert not broken.runtime.passed and broken.runtime.max_abs_diff > 0.05


def test_wrong_rope_theta_engine_fails(tmp_path, int4_checkpoint):
    result = run_preflight(load_recipe(str(_recipe(tmp_path, int4_checkpoint))), "int4", log=lambda m: None,
                           engine_overrides={"rope_theta": 31.0})
    assert result.checkpoint.passed and not result.runtime.passed
    assert result.runtime.max_abs_diff > 0.05
    # the mean alone refuses it: the loose per-token bound is not what catches a wrong rope
    gate = PreflightSection()
    assert result.runtime.mean_abs_diff > gate.max_logprob_mean_abs_diff
    assert result.runtime.worst[0].diff == pytest.approx(result.runtime.max_abs_diff, rel=1e-5)


def test_cli_exit_codes(tmp_path, int4_checkpoint):
    recipe = _recipe(tmp_path, int4_checkpoint)
    ok = run("preflight", "int4", "--recipe", str(recipe))
    assert ok.returncode == 0 and "preflight passed" in ok.stdout
    wrong = run("preflight", "fp8", "--recipe", str(recipe))
    assert wrong.returncode == 2 and "is int4, not fp8" in wrong.stderr
    corrupted = tmp_path / "corrupted"
    shutil.copytree(int4_checkpoint[1], corrupted)
    from safetensors.torch import load_file, save_file

    tensors = load_file(str(corrupted / "model.safetensors"))
    tensors["model.layers.0.self_attn.q_proj.weight_scale"] = torch.full_like(
        tensors["model.layers.0.self_attn.q_proj.weight_scale"], float("nan"))
    save_file(tensors, str(corrupted / "model.safetensors"))
    bad = run("preflight", "int4", "--recipe", str(recipe), f"model.path={corrupted}", "preflight.skip_runtime=true")
    assert bad.returncode == 1 and "FAIL" in bad.stdout


def test_train_refuses_to_start_when_runtime_parity_fails(tmp_path, int4_checkpoint):
    for gate in ("max_logprob_abs_diff", "max_logprob_mean_abs_diff"):
        recipe = _recipe(tmp_path, int4_checkpoint, runtime=True, **{gate: -1.0})
        with pytest.raises(OrbitError, match=r"runtime preflight \(Orbit builtin engine \(in process\) vs Orbit torch DecoderLM\) failed"):
            run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    recipe = _recipe(tmp_path, int4_checkpoint, runtime=True)
    result = run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    assert result.steps_done == 4


def test_fake_qat_trains_on_int4_and_is_refused_on_dense(tmp_path, int4_checkpoint, tiny_checkpoint):
    recipe = _recipe(tmp_path, int4_checkpoint)
    import yaml

    raw = yaml.safe_load(recipe.read_text())
    raw["quant"] = {"fake_qat": True}
    raw["train"].update(steps=1)
    raw["eval"] = {"enabled": False}
    recipe.write_text(yaml.safe_dump(raw))
    assert run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None)).steps_done == 1
    dense = small_recipe(tmp_path / "dense", tiny_checkpoint, quant={"fake_qat": True})
    with pytest.raises(OrbitError, match="quant.fake_qat=true needs a quantized base"):
        run_training(load_recipe(str(dense)), Callbacks(on_message=lambda m: None))
