"""Atomic run checkpoints: adapter + optimizer + RNG + data position, the last K kept.

Layout: ``<output_dir>/checkpoints/step_000010/`` with
``adapter_model.safetensors``, ``adapter_config.json``, ``optimizer.pt``, ``rng.pt``, ``trainer_state.json``.
A checkpoint is written to a hidden temp dir and renamed into place; a crash mid-write leaves
only the temp dir, which resume ignores and the next save removes.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from orbit_core.errors import OrbitError

_STEP_DIR = re.compile(r"^step_(\d{6,})$")
ADAPTER_WEIGHTS = "adapter_model.safetensors"
ADAPTER_CONFIG = "adapter_config.json"


def checkpoint_root(output_dir: str) -> Path:
    return Path(output_dir) / "checkpoints"


def list_checkpoints(output_dir: str) -> list[tuple[int, Path]]:
    root = checkpoint_root(output_dir)
    if not root.is_dir():
        return []
    found = []
    for entry in root.iterdir():
        match = _STEP_DIR.match(entry.name)
        if match and entry.is_dir() and (entry / "trainer_state.json").is_file():
            found.append((int(match.group(1)), entry))
    return sorted(found)


def latest_checkpoint(output_dir: str) -> Path | None:
    found = list_checkpoints(output_dir)
    return found[-1][1] if found else None


def resolve_adapter_dir(path: str) -> Path:
    """A checkpoint dir as given, or a run dir's latest checkpoint."""
    p = Path(path)
    if (p / ADAPTER_CONFIG).is_file():
        return p
    latest = latest_checkpoint(str(p))
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
    except json.JSONDecodeError as err:
        raise OrbitError(f"{config} is not valid JSON", "use an earlier checkpoint") from err
    return state, meta


def save_checkpoint(
    output_dir: str,
    step: int,
    adapter_state: dict[str, torch.Tensor],
    adapter_config: dict[str, Any],
    optimizer_state: dict[str, Any],
    rng_state: dict[str, Any],
    trainer_state: dict[str, Any],
    keep_last: int,
) -> Path:
    root = checkpoint_root(output_dir)
    root.mkdir(parents=True, exist_ok=True)
    for stale in root.glob(".tmp-step_*"):
        shutil.rmtree(stale, ignore_errors=True)
    final = root / f"step_{step:06d}"
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-step_{step:06d}-", dir=root))
    try:
        save_adapter(tmp, adapter_state, adapter_config)
        torch.save(optimizer_state, tmp / "optimizer.pt")
        torch.save(rng_state, tmp / "rng.pt")
        # trainer_state.json is written last: its presence marks the checkpoint complete.
        (tmp / "trainer_state.json").write_text(json.dumps({**trainer_state, "step": step}, indent=2))
        for f in tmp.iterdir():
            with open(f, "rb") as handle:
                os.fsync(handle.fileno())
        if final.exists():
            shutil.rmtree(final)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    for _, old in list_checkpoints(output_dir)[:-keep_last] if keep_last > 0 else []:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> dict[str, Any]:
    path = Path(path)
    state_file = path / "trainer_state.json"
    if not state_file.is_file():
        raise OrbitError(f"{path} is not a complete checkpoint (no trainer_state.json)", "resume from another step_* directory")
    adapter, adapter_config = load_adapter(path)
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    except Exception as err:
        raise OrbitError(f"{path}: optimizer.pt or rng.pt is unreadable ({type(err).__name__})", "resume from an earlier checkpoint") from err
    return {
        "adapter": adapter,
        "adapter_config": adapter_config,
        "optimizer": optimizer,
        "rng": rng,
        "trainer_state": json.loads(state_file.read_text()),
        "path": str(path),
    }
