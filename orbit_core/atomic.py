"""Output directories that appear whole or not at all."""

from __future__ import annotations

import contextlib
import os
import shutil
import tempfile
from pathlib import Path
from typing import Iterator

from orbit_core.errors import OrbitError


@contextlib.contextmanager
def atomic_output_dir(out: str | Path) -> Iterator[Path]:
    """Yield a hidden temp dir beside ``out``; on success it is renamed to ``out``.

    ``out`` must not exist or be empty. On any error the temp dir is removed, so a crash never
    leaves an ``out`` that looks complete.
    """
    final = Path(out)
    if final.exists() and (not final.is_dir() or any(final.iterdir())):
        raise OrbitError(f"output directory {out} is not empty", "choose a new directory")
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.", dir=final.parent))
    try:
        yield tmp
        if final.exists():
            final.rmdir()
        os.rename(tmp, final)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
