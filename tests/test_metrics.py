"""Metrics sinks: JSONL always, wandb only when asked (offline needs no network)."""

from __future__ import annotations

import pytest

from orbit_core.config import load_recipe
from orbit_core.train import Callbacks, run_training
from orbit_core.train.metrics import wandb_wanted
from tests.helpers import small_recipe


def test_wandb_auto_follows_configured_key(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    assert not wandb_wanted("auto")
    (tmp_path / ".wandb_key").write_text("x")
    assert wandb_wanted("auto")
    assert not wandb_wanted("false")
    assert wandb_wanted("offline")


def test_wandb_offline_run_is_written(tmp_path, tiny_checkpoint, monkeypatch):
    pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_SILENT", "true")
    recipe = small_recipe(tmp_path, tiny_checkpoint, train={"steps": 1, "wandb": "offline"}, eval={"enabled": False})
    run_training(load_recipe(str(recipe)), Callbacks(on_message=lambda m: None))
    runs = list((tmp_path / "run" / "wandb").glob("offline-run-*/run-*.wandb"))
    assert len(runs) == 1 and runs[0].stat().st_size > 0
