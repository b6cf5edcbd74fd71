"""Triton when it is installed (on CPU-only installs both names are None and every op serves its
plain-torch reference), and the one line an op logs when a kernel cannot serve a call."""

import logging

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
