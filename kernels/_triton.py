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

EARLY_READS = True
"""Under PDL, let the kernels that read a frozen weight (the packed GEMV's first K step, the LoRA
shrink's A) issue those loads before the wait, so that they overlap the kernel before. Nothing on
the stream writes those tensors during a decode step: the base is frozen and adapter updates land
between steps. H100, decoding int4 at the Qwen3-1.7B shape, against False in one process
(``decode_throughput_early_reads_h100.jsonl``, the GEMV's ``PREFETCH`` plan): with LoRA 625.4 and
609.9 tok/s (first and last run) against 588.0 at batch 1, 1,960 and 1,957 against 1,866 at 4;
bare 729.9 and 745.2 against 711.4 at 1. With the GEMV's ``ONE_STEP`` plan, which loads a one-row
program's whole weight slice early, LoRA decodes 646.9 and 658.4 against 579.6 without early reads
(``decode_throughput_gemv_plans_h100.jsonl``). False: every load after the wait (benchmarks
compare)."""

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
            it has finished and its writes are visible (so nothing may touch memory earlier, but the
            frozen weights of ``EARLY_READS``), then let the kernel after it be scheduled."""
            if PDL:
                gdc_wait()
                gdc_launch_dependents()
        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            """``pdl_enter``'s wait alone, for a kernel of many waves that lets the kernel after it be
            scheduled only at its end (``pdl_release``): launched at its start, that kernel's waiting
            programs would hold SM slots that this one's later waves need."""
            if PDL:
                gdc_wait()

        @triton.jit
        def pdl_release(PDL: tl.constexpr):
            """Let the kernel after this one be scheduled (once every program has called it or exited)."""
            if PDL:
                gdc_launch_dependents()
    else:

        @triton.jit
        def pdl_enter(PDL: tl.constexpr):
            pass

        @triton.jit
        def pdl_wait(PDL: tl.constexpr):
            pass

        @triton.jit
        def pdl_release(PDL: tl.constexpr):
            pass
else:
    pdl_enter = pdl_wait = pdl_release = None

_MAJOR: dict[int, int] = {}


def capability_major(device: torch.device) -> int:
    """The major compute capability of a CUDA device, asked once per device."""
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _MAJOR:
        _MAJOR[index] = torch.cuda.get_device_capability(index)[0]
    return _MAJOR[index]


def pdl_args(tensor) -> dict:
    """Launch options for a kernel that starts with ``pdl_enter(PDL)``: programmatic dependent launch
    on a GPU of compute capability 9 or later when ``PDL`` is on and Triton can launch it; nothing
    otherwise (the interpreter, the CPU, older GPUs or Triton)."""
    if not (PDL and _PDL_BUILD and tensor.is_cuda):
        return {}
    return {"PDL": True, "launch_pdl": True} if capability_major(tensor.device) >= 9 else {}

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
