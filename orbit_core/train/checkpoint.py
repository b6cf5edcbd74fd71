"""Atomic run checkpoints: adapter + optimizer + RNG + data position, the last K kept.

A checkpoint is written to a hidden temp dir and renamed into place; a crash mid-write leaves only
the temp dir, which resume ignores and the next save removes. Nothing non-finite is ever written:
a save whose adapter or optimizer state holds NaN/inf is refused before any file changes, so it
can never replace (or, through ``keep_last``, delete) a good checkpoint.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from orbit_core.errors import OrbitError
from orbit_core.policy.adapter_files import (
    TRAINER_STATE,
    checkpoint_root,
    list_checkpoints,
    load_adapter,
    save_adapter,
)


class NonFiniteState(OrbitError):
    """The adapter or optimizer state holds NaN or inf."""


def _tensors(state: Any) -> Iterator[tuple[str, torch.Tensor]]:
    if isinstance(state, torch.Tensor):
        yield "", state
    elif isinstance(state, dict):
        for key, value in state.items():
            for name, tensor in _tensors(value):
                yield f"{key}.{name}".rstrip("."), tensor
    elif isinstance(state, (list, tuple)):
        for i, value in enumerate(state):
            for name, tensor in _tensors(value):
                yield f"{i}.{name}".rstrip("."), tensor


def first_non_finite(state: Any) -> str | None:
    """Name of the first floating tensor in a (nested) state holding NaN/inf, else None."""
    for name, tensor in _tensors(state):
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            return name
    return None


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
    for what, state in (("adapter", adapter_state), ("optimizer state", optimizer_state)):
        bad = first_non_finite(state)
        if bad is not None:
            raise NonFiniteState(f"step {step}: the {what} holds NaN/inf ({bad}); the checkpoint was not written",
                                 "earlier checkpoints are intact: lower train.lr or check the reward, then resume")
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
        (tmp / TRAINER_STATE).write_text(json.dumps({**trainer_state, "step": step}, indent=2))
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
    state_file = path / TRAINER_STATE
    if not state_file.is_file():
        raise OrbitError(f"{path} is not a complete checkpoint (no {TRAINER_STATE})", "resume from another step_* directory")
    try:
        trainer_state = json.loads(state_file.read_text())
        int(trainer_state["step"])
    except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError, ValueError) as err:
        raise OrbitError(f"{state_file} is corrupt ({type(err).__name__})", "resume from an earlier checkpoint") from err
    adapter, adapter_config = load_adapter(path)
    try:
        optimizer = torch.load(path / "optimizer.pt", map_location="cpu", weights_only=False)
        rng = torch.load(path / "rng.pt", map_location="cpu", weights_only=False)
    except Exception as err:
        raise OrbitError(f"{path}: optimizer.pt or rng.pt is unreadable ({type(err).__name__})", "resume from an earlier checkpoint") from err
    bad = first_non_finite(adapter) or first_non_finite(optimizer)
    if bad is not None:
        raise NonFiniteState(f"{path} holds NaN/inf ({bad})", "resume from an earlier checkpoint")
    return {
        "adapter": adapter,
        "adapter_config": adapter_config,
        "optimizer": optimizer,
        "rng": rng,
        "trainer_state": trainer_state,
        "path": str(path),
    }


def load_latest_valid(output_dir: str, log: Callable[[str], None]) -> dict[str, Any] | None:
    """The newest checkpoint that loads whole; damaged newer ones are named and skipped."""
    for step, path in reversed(list_checkpoints(output_dir)):
        try:
            return load_checkpoint(path)
        except OrbitError as err:
            log(f"checkpoint {path.name} is unusable ({err.problem}); falling back to an earlier one")
    return None
