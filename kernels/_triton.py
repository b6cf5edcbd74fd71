"""Triton when it is installed (on CPU-only installs both names are None and every op serves its
plain-torch reference), and the one line an op logs when a kernel cannot serve a call."""

import logging
from typing import Callable

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

log = logging.getLogger("orbit.kernels")
_reported: set[tuple[str, str]] = set()


def note_fallback(op: str, why: str) -> None:
    """Log once per op and reason that ``op`` runs its torch reference instead of its kernel."""
    if (op, why) not in _reported:
        _reported.add((op, why))
        log.warning("orbit_kernels: %s falls back to the torch reference (%s)", op, why)


def serves(op: str, enabled: bool, tensor, reason: Callable[[], "str | None"]) -> bool:
    """Whether ``op`` runs its kernel: Triton is there, the op is enabled, ``tensor`` is on a GPU and
    ``reason()`` finds nothing the kernel cannot take (what it finds is noted once)."""
    if not (enabled and triton is not None and tensor.is_cuda):
        return False
    why = reason()
    if why is not None:
        note_fallback(op, why)
    return why is None
