"""Small run recipes for tests: the tiny untrained checkpoint, a few arithmetic prompts."""

from __future__ import annotations

import json
import time
from pathlib import Path

import yaml

from orbit_core.data.arith import make_splits


def write_prompts(path: Path, count: int, split: str = "train") -> Path:
    rows = make_splits(seed=1)[split][:count]
    path.write_text("".join(json.dumps({"question": r["prompt"], "answer": r["label"]}) + "\n" for r in rows))
    return path


def small_recipe(tmp_path: Path, checkpoint: str, **sections) -> Path:
    tmp_path.mkdir(parents=True, exist_ok=True)
    train_file = write_prompts(tmp_path / "train.jsonl", 16)
    test_file = write_prompts(tmp_path / "test.jsonl", 4, "test")
    # an untrained model never solves arithmetic; this reward varies within groups, so updates happen
    reward_file = tmp_path / "has_digit_one.py"
    reward_file.write_text("def score(prompt, response, label):\n    return float('1' in response)\n")
    recipe = {
        "model": {"path": checkpoint, "device": "cpu"},
        "data": {"train_path": str(train_file), "prompt_key": "question", "label_key": "answer"},
        "rollout": {"batch_size": 4, "n_samples_per_prompt": 4, "max_new_tokens": 6, "max_running": 8},
        "rl": {"reward": f"{reward_file}:score", "use_kl_loss": True, "kl_coef": 0.01},
        "peft": {"rank": 4, "alpha": 8, "dropout": 0.1},
        "train": {"steps": 4, "global_batch_size": 8, "micro_batch_size": 4, "lr": 1e-2, "lr_schedule": "cosine",
                  "warmup_steps": 1, "output_dir": str(tmp_path / "run"), "save_interval": 2, "keep_last": 2,
                  "wandb": "false"},
        "eval": {"test_path": str(test_file), "n_samples": 2, "k": [1, 2], "max_new_tokens": 6, "before_train": True},
    }
    for section, values in sections.items():
        recipe.setdefault(section, {}).update(values)
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def without_package(tmp_path: Path, name: str) -> dict[str, str]:
    """Environment in which ``import name`` fails as if the package were not installed."""
    import os

    fake = tmp_path / f"no_{name}"
    (fake / name).mkdir(parents=True)
    (fake / name / "__init__.py").write_text(f"raise ImportError('No module named {name}')\n")
    return {"PYTHONPATH": f"{fake}{os.pathsep}{os.environ.get('PYTHONPATH', '')}"}


def long_row(generate, seconds: float = 2.4):
    """One greedy row of ``endless_checkpoint``, lengthened until it decodes for ``seconds`` or more
    (at most 8,000 tokens): the silence-limit tests need a generation that outlasts a limit set to a
    third of it. ``generate(tokens)`` returns the row's Completion. Returns (completion, seconds
    taken, tokens)."""
    def timed(tokens: int):
        start = time.monotonic()
        done = generate(tokens)
        return done, time.monotonic() - start

    tokens = 256
    done, took = timed(tokens)
    while took < seconds and tokens < 8000:
        tokens = min(8000, int(tokens * (seconds + 0.5) / max(took, 1e-3)))
        done, took = timed(tokens)
    assert done.finish_reason == "length" and took > seconds / 2, (done.finish_reason, took)
    return done, took, tokens
