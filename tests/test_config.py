"""Recipes, dot overrides and their errors."""

from __future__ import annotations

import pytest

from orbit_core.config import RecipeConfig, list_recipes, load_recipe, to_yaml
from orbit_core.config.loader import build_config
from orbit_core.errors import OrbitError


def test_shipped_recipe_loads_and_overrides_apply():
    assert "tiny-arith-lora" in list_recipes()
    config = load_recipe("tiny-arith-lora", ["train.lr=3e-4", "peft.target_modules=q_proj,v_proj", "rl.std_normalization=false",
                                             "eval.k=[1,2]"])
    assert isinstance(config, RecipeConfig)
    assert config.train.lr == pytest.approx(3e-4)
    assert config.peft.target_modules == ["q_proj", "v_proj"]
    assert config.rl.std_normalization is False
    assert config.eval.k == [1, 2]
    assert "lr: 0.0003" in to_yaml(config)


@pytest.mark.parametrize("override, message", [
    ("train.lrr=1", "unknown key 'train.lrr' -- did you mean train.lr"),
    ("trian.lr=1", "unknown section 'trian' -- did you mean train"),
    ("train.steps=abc", "train.steps: expected int, got 'abc'"),
    ("rl.use_kl_loss=maybe", "rl.use_kl_loss: expected bool"),
    ("train.lr_schedule=exp", "train.lr_schedule: expected one of constant|linear|cosine"),
    ("train.lr", "bad override 'train.lr'"),
    ("train.micro_batch_size=100", "not a multiple of train.micro_batch_size"),
])
def test_override_errors_name_the_field(override, message):
    with pytest.raises(OrbitError, match=message.replace("|", r"\|").replace("(", r"\(")):
        load_recipe("tiny-arith-lora", [override])


def test_recipe_typo_suggests_close_names(tmp_path):
    with pytest.raises(OrbitError, match="did you mean tiny-arith-lora"):
        load_recipe("tiny-arith-lroa")
    bad = tmp_path / "r.yaml"
    bad.write_text("train:\n  stepz: 3\n")
    with pytest.raises(OrbitError, match="unknown key 'train.stepz' -- did you mean train.steps"):
        load_recipe(str(bad))
    broken = tmp_path / "broken.yaml"
    broken.write_text("train: [\n")
    with pytest.raises(OrbitError, match="not valid YAML"):
        load_recipe(str(broken))
    with pytest.raises(OrbitError, match="recipe file not found"):
        load_recipe(str(tmp_path / "missing.yaml"))


def test_cross_field_validation():
    with pytest.raises(OrbitError, match="eval.k values"):
        build_config({"eval": {"n_samples": 2, "k": [4]}})
    with pytest.raises(OrbitError, match="rl.use_kl_loss is on but rl.kl_coef is 0"):
        build_config({"rl": {"use_kl_loss": True}})
