"""Frozen weights pulled into L2 ahead of the kernels that read them, by Hopper's bulk-copy engine.

At one or a few rows a decode layer is a chain of small kernels, and only its GEMVs read much
memory: while the norms, the q/k path and the attention run, DRAM is nearly idle. Here a launch
asks the bulk-copy (TMA) engine to bring spans of frozen weights into L2
(``cp.async.bulk.prefetch.L2``, sm_90), one request of at most ``CHUNK`` bytes a program. The
engine issues it on a side stream (``models.weight_prefetch``), so that the chain never waits on
it: a program ends only once its bytes have arrived.

There is nothing to compute, so the reference is to do nothing (the CPU, other GPUs and an
interpreter run it): a prefetch changes when bytes arrive, never a result.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import capability_major, tl, triton

ENABLED = True
"""Set False to skip the prefetches (benchmarks compare the two in one process)."""
MODE = "bulk"
"""How a program asks for its bytes: ``bulk``, one bulk-copy request; ``lines``, every 128-byte
line by its own thread (``prefetch.global.L2::evict_last``); ``loads``, plain loads marked to stay
in L2 (``evict_last``), whose values are dropped."""
CHUNK = 256 * 1024
"""Bytes one program asks for: a multiple of 16 below 1 MiB (sm_90 encodes the size in 16-byte units
in 16 bits)."""


def ranges_tensor(tensors: list[torch.Tensor], device: torch.device, chunk: int | None = None) -> torch.Tensor:
    """``[n, 2]`` int64 (address, bytes) requests covering each tensor's storage in pieces of at most
    ``chunk`` bytes (``CHUNK`` when None), the start rounded up and the end down to 16 bytes (the bulk copy's alignment;
    a hint may leave a few bytes out)."""
    chunk = chunk or CHUNK
    if chunk % 16 or not 16 <= chunk < 1 << 20:
        raise ValueError(f"a prefetch request of {chunk} bytes: it must be a multiple of 16 below 1 MiB")
    rows = []
    for t in tensors:
        start, end = t.data_ptr(), t.data_ptr() + t.numel() * t.element_size()
        aligned, stop = (start + 15) // 16 * 16, end // 16 * 16
        rows += [(a, min(chunk, stop - a)) for a in range(aligned, stop, chunk)]
    return torch.tensor(rows, dtype=torch.int64).reshape(-1, 2).to(device)


def device_reason(device: torch.device) -> str | None:
    """Why the kernel cannot run on ``device`` (None: it can)."""
    if triton is None or device.type != "cuda" or capability_major(device) < 9:
        return "the bulk-copy prefetch needs Triton and a GPU of compute capability 9 or later"
    return None


def unserved_reason(ranges: torch.Tensor) -> str | None:
    """Why the kernel cannot take ``ranges`` (None: it can)."""
    if device_reason(ranges.device) is not None:
        return device_reason(ranges.device)
    if ranges.dtype != torch.int64 or ranges.dim() != 2 or ranges.shape[1] != 2 or not ranges.is_contiguous():
        return f"ranges {ranges.dtype} {tuple(ranges.shape)} are not contiguous int64 [n, 2]"
    return None


if triton is not None:

    @triton.jit
    def _l2_prefetch_kernel(ranges_ptr):
        r = tl.program_id(0)
        address = tl.load(ranges_ptr + 2 * r)
        size = tl.load(ranges_ptr + 2 * r + 1).to(tl.int32)
        tl.inline_asm_elementwise("{ cp.async.bulk.prefetch.L2.global [$1], $2; mov.u32 $0, 0; }", "=r,l,r",
                                  [address, size], dtype=tl.int32, is_pure=False, pack=1)


    @triton.jit
    def _l2_lines_kernel(ranges_ptr, LANES: tl.constexpr):
        r = tl.program_id(0)
        address = tl.load(ranges_ptr + 2 * r)
        size = tl.load(ranges_ptr + 2 * r + 1)
        lines = tl.arange(0, LANES).to(tl.int64) * 128
        for start in range(0, size, LANES * 128):
            offs = start + lines
            tl.inline_asm_elementwise(
                "{ .reg .pred p; setp.lt.s64 p, $2, $3; @p prefetch.global.L2::evict_last [$1]; mov.u32 $0, 0; }",
                "=r,l,l,l", [address + offs, offs, size + offs * 0], dtype=tl.int32, is_pure=False, pack=1)


    @triton.jit
    def _l2_loads_kernel(ranges_ptr, sink_ptr, BLOCK: tl.constexpr):
        r = tl.program_id(0)
        words = tl.load(ranges_ptr + 2 * r).to(tl.pointer_type(tl.int32), bitcast=True)
        count = tl.load(ranges_ptr + 2 * r + 1) // 4
        acc = tl.zeros((BLOCK,), dtype=tl.int32)
        offs = tl.arange(0, BLOCK)
        for start in range(0, count, BLOCK):
            acc ^= tl.load(words + start + offs, mask=start + offs < count, other=0, eviction_policy="evict_last")
        total = tl.xor_sum(acc, axis=0)
        tl.store(sink_ptr, total, mask=total == 0x7FFFFFFF)  # a use, so the loads stay; almost never stored


def launch(ranges: torch.Tensor) -> None:
    """The kernel (no dispatch checks: GPU tests call it directly)."""
    if not ranges.shape[0]:
        return
    if MODE == "bulk":
        _l2_prefetch_kernel[(ranges.shape[0],)](ranges, num_warps=1)
    elif MODE == "lines":
        _l2_lines_kernel[(ranges.shape[0],)](ranges, LANES=128, num_warps=4)
    else:
        sink = _SINKS.get(ranges.device)
        if sink is None:
            sink = _SINKS[ranges.device] = torch.zeros(1, dtype=torch.int32, device=ranges.device)
        _l2_loads_kernel[(ranges.shape[0],)](ranges, sink, BLOCK=4096, num_warps=4)


_SINKS: dict[torch.device, torch.Tensor] = {}


@torch.library.custom_op("orbit::l2_prefetch", mutates_args=())
def l2_prefetch(ranges: torch.Tensor) -> None:
    """Ask for each (address, bytes) row of ``ranges`` to be brought into L2."""
    if ENABLED and unserved_reason(ranges) is None:
        launch(ranges)


@l2_prefetch.register_fake
def _(ranges):
    return None
