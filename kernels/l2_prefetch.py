"""Ask the L2 cache to fetch frozen weights ahead of the kernels that will read them.

At one decode row the packed GEMVs read a layer's int4 weights from DRAM in bursts, between
stretches of small kernels (norms, rope, attention, the LoRA shrinks) that leave DRAM idle. This
op issues Hopper's bulk L2 prefetch (``cp.async.bulk.prefetch.L2.global``) over whole tensors:
one instruction a chunk of ``CHUNK`` bytes, spread over programs so that many SMs' copy engines
issue at once, and nothing comes back to the SM. The weights then stream in while the small
kernels run, and the GEMVs find them in L2.

It changes no value: a prefetch is a hint. Its reference is therefore to do nothing, which is what
the CPU, the interpreter and GPUs before compute capability 9 get.

Under programmatic dependent launch the kernel lets the next one be scheduled at once (it writes
nothing the next kernel reads) but still waits for the kernel before it before it exits: a
kernel's wait covers only the kernel launched just before it, so an early exit here would let
the next one run ahead of unfinished work.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import _PDL_BUILD, pdl_args, tl, triton

ENABLED = True
"""Set False to make the op launch nothing (benchmarks compare the two in one process)."""
CHUNK = 16384
"""Bytes a prefetch instruction asks for."""
PER_PROGRAM = 32
"""Chunks a program issues, one per thread of its single warp."""
MAX_TENSORS = 8

_CAPABLE: dict[int, bool] = {}


def capable(device: torch.device) -> bool:
    """Whether the op launches its kernel on ``device`` (Triton there, a GPU of capability 9+)."""
    if not (ENABLED and triton is not None and device.type == "cuda"):
        return False
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _CAPABLE:
        _CAPABLE[index] = torch.cuda.get_device_capability(index)[0] >= 9
    return _CAPABLE[index]


def regions(tensors: list[torch.Tensor]) -> list[tuple[torch.Tensor, int, int]]:
    """Each contiguous tensor with the 16-byte-aligned span the instruction may name: (tensor, bytes from its
    first element back to the aligned start, aligned length). The caching allocator hands out
    blocks aligned to 512 bytes and sized in multiples of 512, so the widened span stays inside the
    tensor's own block."""
    spans = []
    for t in tensors:
        if t.numel() == 0 or not t.is_contiguous():
            continue
        lead = t.data_ptr() % 16
        spans.append((t, lead, -(-(t.numel() * t.element_size() + lead) // 16) * 16))
    return spans


if triton is not None:
    if _PDL_BUILD:
        from triton.language.extra.cuda import gdc_launch_dependents, gdc_wait
    else:
        gdc_launch_dependents = gdc_wait = None

    @triton.jit
    def _prefetch_region(ptr, lead, length, pid, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr):
        offs = (pid * PER_PROGRAM + tl.arange(0, PER_PROGRAM)).to(tl.int64) * CHUNK
        size = tl.minimum(length - offs, CHUNK).to(tl.int32)
        addr = ptr.to(tl.pointer_type(tl.int8), bitcast=True) - lead + offs
        tl.inline_asm_elementwise(
            "{ .reg .pred live; setp.gt.s32 live, $2, 0; @live cp.async.bulk.prefetch.L2.global [$1], $2; "
            "mov.u32 $0, 0; }",
            "=r,l,r", [addr.to(tl.int64, bitcast=True), size], dtype=tl.int32, is_pure=False, pack=1)

    @triton.jit
    def _l2_prefetch_kernel(p0, l0, n0, p1, l1, n1, p2, l2, n2, p3, l3, n3, p4, l4, n4, p5, l5, n5, p6, l6, n6, p7,
                            l7, n7, COUNT: tl.constexpr, CHUNK: tl.constexpr, PER_PROGRAM: tl.constexpr,
                            PDL: tl.constexpr = False):
        if PDL:
            gdc_launch_dependents()
        pid, which = tl.program_id(0), tl.program_id(1)
        # one grid row per tensor; rows past a tensor's end issue nothing (size <= 0)
        if which == 0:
            _prefetch_region(p0, l0, n0, pid, CHUNK, PER_PROGRAM)
        if COUNT > 1 and which == 1:
            _prefetch_region(p1, l1, n1, pid, CHUNK, PER_PROGRAM)
        if COUNT > 2 and which == 2:
            _prefetch_region(p2, l2, n2, pid, CHUNK, PER_PROGRAM)
        if COUNT > 3 and which == 3:
            _prefetch_region(p3, l3, n3, pid, CHUNK, PER_PROGRAM)
        if COUNT > 4 and which == 4:
            _prefetch_region(p4, l4, n4, pid, CHUNK, PER_PROGRAM)
        if COUNT > 5 and which == 5:
            _prefetch_region(p5, l5, n5, pid, CHUNK, PER_PROGRAM)
        if COUNT > 6 and which == 6:
            _prefetch_region(p6, l6, n6, pid, CHUNK, PER_PROGRAM)
        if COUNT > 7 and which == 7:
            _prefetch_region(p7, l7, n7, pid, CHUNK, PER_PROGRAM)
        if PDL:
            gdc_wait()


def launch(tensors: list[torch.Tensor]) -> int:
    """Prefetch up to ``MAX_TENSORS`` tensors (no dispatch checks); returns the launches made."""
    launches = 0
    for start in range(0, len(tensors), MAX_TENSORS):
        spans = regions(tensors[start:start + MAX_TENSORS])
        if not spans:
            continue
        args = []
        for t, lead, length in spans:
            args += [t, lead, length]
        args += [spans[0][0], 0, 0] * (MAX_TENSORS - len(spans))
        programs = triton.cdiv(max(length for _, _, length in spans), CHUNK * PER_PROGRAM)
        _l2_prefetch_kernel[(programs, len(spans))](*args, COUNT=len(spans), CHUNK=CHUNK, PER_PROGRAM=PER_PROGRAM,
                                                     num_warps=1, **pdl_args(spans[0][0]))
        launches += 1
    return launches


@torch.library.custom_op("orbit::l2_prefetch", mutates_args=())
def l2_prefetch(tensors: list[torch.Tensor]) -> None:
    """Ask L2 to fetch ``tensors`` (a hint: no value changes; nothing happens where it cannot run)."""
    if tensors and capable(tensors[0].device):
        launch(tensors)


@l2_prefetch.register_fake
def _(tensors):
    return None
