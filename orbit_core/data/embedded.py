"""``embedded:tiny-arith/...`` data: the tiny task's prompt files, generated offline on first use.

Everything derives from a fixed seed and is cached under ``$ORBIT_CACHE`` (default
``~/.cache/orbit``). Builds go to a temp dir that is renamed into place, so an interrupted build is
never mistaken for a finished one (the embedded model in ``orbit_core.policy.embedded`` reuses this).
"""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Callable

from orbit_core.data.arith import make_splits, write_jsonl
from orbit_core.errors import OrbitError

PREFIX = "embedded:"
TASK = "tiny-arith"
TASK_SEED = 0


def cache_root() -> Path:
    return Path(os.environ.get("ORBIT_CACHE", Path.home() / ".cache" / "orbit"))


def is_embedded(spec: str) -> bool:
    return spec.startswith(PREFIX)


def atomic_build(target: Path, build: Callable[[Path], None]) -> Path:
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        build(tmp)
        try:
            os.rename(tmp, target)
        except OSError:
            if not target.exists():  # another process won the race otherwise
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def data_dir() -> Path:
    def build(tmp: Path) -> None:
        for name, rows in make_splits(TASK_SEED).items():
            write_jsonl(rows, tmp / f"{name}.jsonl")

    return atomic_build(cache_root() / TASK / "data", build)


def resolve_data_path(spec: str) -> str:
    """``embedded:tiny-arith/train.jsonl@[:64]`` -> a real path (slice suffix kept)."""
    if not is_embedded(spec):
        return spec
    rest = spec[len(PREFIX):]
    task, _, file = rest.partition("/")
    if task != TASK or not file:
        raise OrbitError(f"unknown embedded data {spec!r}", f"use embedded:{TASK}/train.jsonl or embedded:{TASK}/test.jsonl")
    return str(data_dir() / file)
