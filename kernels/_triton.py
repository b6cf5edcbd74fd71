"""Triton when it is installed (on CPU-only installs both names are None and every op serves its
plain-torch reference), the one line an op logs when a kernel cannot serve a call, and programmatic
dependent launch for the decode step's kernels (``pdl_args``, ``pdl_enter``)."""

import logging
from typing import Callable

import torch

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = tl = None

PDL = True
"""Launch the decode step's kernels with programmatic dependent launch (Hopper and later): a kernel
may be scheduled while the one before it drains, and waits at its first line for that kernel's
results. Set False to launch them plainly (benchmarks compare the two)."""

_PDL_BUILD = False
if triton is not None:
    try:
        from triton.backends.nvidia.compiler import CUDAOptions
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait

        _PDL_BUILD = "launch_pdl" in CUDAOptions.__dataclass_fields__
    except (ImportError, AttributeError):
        pass

    if _PDL_BUILD:

        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            """A kernel's first line under programmatic dependent launch: wait until the kernel before
            it has finished and its writes are visible (so nothing here may touch memory earlier), then
            let the kernel after it be scheduled."""
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
    else:

        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            pass
else:
    pdl_enter = None

_CAPABLE: dict[int, bool] = {}


def pdl_args(tensor) -> dict:
    """Launch options for a kernel that starts with ``pdl_enter(PDL)``: programmatic dependent launch
    on a GPU of compute capability 9 or later when ``PDL`` is on and Triton can launch it; nothing
    otherwise (the interpreter, the CPU, older GPUs or Triton)."""
    if not (PDL and _PDL_BUILD and tensor.is_cuda):
        return {}
    index = tensor.device.index if tensor.device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return {"PDL": True, "launch_pdl": True} if _CAPABLE[index] else {}

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
