"""Adapter files as ``orbit train`` writes them, and finding them in a run directory.

A run keeps ``<output_dir>/checkpoints/step_000010/`` directories; each holds
``adapter_model.safetensors`` and ``adapter_config.json`` (plus the trainer's state, written by
``orbit_core.train.checkpoint``). Every command that reads an adapter (eval, convert, resume) comes here.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orbit_core.errors import OrbitError

STEP_DIR = re.compile(r"^step_(\d{6,})$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"
TRAINER_STATE = "trainer_state.json"


def checkpoint_root(output_dir: str | Path) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str | Path) -> list[tuple[int, Path]]:
    """Complete checkpoints (``trainer_state.json`` present), oldest first."""
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / TRAINER_STATE).is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str | Path) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_adapter_dir(path: str) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return p
    latest = latest_checkpoint(p)
    if latest is None:
        raise OrbitError(f"no adapter in {path}", "pass a step_* checkpoint directory or a run directory written by `orbit train`")
    return latest


def save_adapter(directory: Path, adapter_state: dict[str, torch.Tensor], adapter_config: dict[str, Any]) -> None:
    tensors = {k: v.detach().to("cpu", torch.float32).contiguous() for k, v in adapter_state.items()}
    save_file(tensors, str(directory / ADAPTER_WEIGHTS), metadata={"format": "orbit-lora"})
    (directory / ADAPTER_CONFIG).write_text(json.dumps(adapter_config, indent=2))


def load_adapter(directory: str | Path) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    directory = Path(directory)
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    for path in (weights, config):
        if not path.is_file():
            raise OrbitError(f"{path} not found", "point at a checkpoint directory written by `orbit train`")
    try:
        with safe_open(str(weights), framework="pt") as handle:
            state = {name: handle.get_tensor(name) for name in handle.keys()}
    except Exception as err:
        raise OrbitError(f"{weights} is corrupted or truncated ({err})", "use an earlier checkpoint") from err
    try:
        meta = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise OrbitError(f"{config} is not valid JSON", "use an earlier checkpoint") from err
    return state, meta
