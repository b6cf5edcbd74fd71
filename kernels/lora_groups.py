"""Up to three LoRA linears that read the same input, served by one launch of each LoRA kernel.

q, k and v read one normed hidden state, and so do gate and up. Their LoRA factors share a rank and
an input width, so one shrink can multiply the input by every group's A, and one expand can add
each group's update into its own output. The kernels reach groups 1 and 2 through element offsets
from group 0's tensors (pointers of one dtype, so the difference of two addresses is exact), and an
expand program finds its group from its output-tile index: a step launches two LoRA kernels per
group of linears instead of two per linear.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import tl, triton

MAX_GROUPS = 3


def offsets(tensors: list[torch.Tensor]) -> tuple[int, int]:
    """Element offsets of ``tensors[1]`` and ``tensors[2]`` from ``tensors[0]`` (0 where absent)."""
    base, size = tensors[0].data_ptr(), tensors[0].element_size()
    found = [(t.data_ptr() - base) // size for t in tensors[1:]]
    return tuple(found + [0] * (2 - len(found)))  # type: ignore[return-value]


def expand_args(ys: list[torch.Tensor], bs: list[torch.Tensor], block_n: int) -> tuple[int, tuple]:
    """(output tiles over all groups, the expand kernels' group arguments): the offsets of y and B,
    each group's width, first tile, and B slot and y row strides."""
    tiles = [triton.cdiv(y.shape[1], block_n) for y in ys]
    starts = [sum(tiles[:g]) for g in range(1, len(ys))]
    total = sum(tiles)
    pad = lambda values, fill: tuple(values) + (fill,) * (MAX_GROUPS - 1 - len(values))  # noqa: E731
    return total, (*offsets(ys), *offsets(bs), *pad([y.shape[1] for y in ys[1:]], 0), *pad(starts, total),
                   *pad([b.stride(0) for b in bs[1:]], 0), *pad([y.stride(0) for y in ys[1:]], 0))


def unserved_reason(ys: list[torch.Tensor], as_: list[torch.Tensor], bs: list[torch.Tensor]) -> str | None:
    """Why these linears cannot share launches (None: they can)."""
    if not 1 <= len(ys) <= MAX_GROUPS or not len(ys) == len(as_) == len(bs):
        return f"{len(ys)} outputs for {len(as_)} A and {len(bs)} B (1 to {MAX_GROUPS} groups)"
    first_y = ys[0]
    for y in ys:
        if y.dim() != 2 or y.stride(-1) != 1:
            return f"an output {tuple(y.shape)} is not [rows, features] with contiguous features"
        if y.dtype != first_y.dtype or y.shape[0] != first_y.shape[0]:
            return "the grouped linears' outputs differ in rows or dtype"
    return factors_reason(as_, bs)


def factors_reason(as_: list[torch.Tensor], bs: list[torch.Tensor]) -> str | None:
    """Why grouped linears' LoRA factors cannot be reached from the first's through offsets (None:
    they can): every ``A`` alike, every ``B`` alike but in width."""
    first_a, first_b = as_[0], bs[0]
    for a, b in zip(as_, bs):
        if a.shape != first_a.shape or a.stride() != first_a.stride() or a.dtype != first_a.dtype:
            return "the grouped linears' A differ in shape, layout or dtype"
        if b.dim() != 3 or b.shape[0] != first_b.shape[0] or b.shape[2] != first_b.shape[2] \
                or b.stride()[1:] != first_b.stride()[1:] or b.dtype != first_b.dtype:
            return "the grouped linears' B differ in slots, rank, layout or dtype"
    return None


def linear_reason(as_: list[torch.Tensor], bs: list[torch.Tensor], out_features: int, rows: int,
                  row_slot: torch.Tensor | None, max_rank: int) -> str | None:
    """Why one base call of ``out_features`` outputs (a linear, or a fused group's laid end to end)
    over ``rows`` rows cannot take these linears' LoRA factors in one kernel pass (None: it can)."""
    if not 1 <= len(as_) == len(bs) <= MAX_GROUPS:
        return f"{len(as_)} A and {len(bs)} B (1 to {MAX_GROUPS} linears)"
    why = factors_reason(as_, bs)
    if why is not None:
        return why
    a0, b0 = as_[0], bs[0]
    if a0.shape[1] > max_rank or b0.shape[2] != a0.shape[1]:
        return f"rank {a0.shape[1]} (B's {b0.shape[2]}) is not one the kernel takes (up to {max_rank})"
    if a0.stride(-1) != 1 or b0.stride(-1) != 1:
        return "a LoRA factor's last dimension is not contiguous"
    if sum(b.shape[1] for b in bs) != out_features:
        return f"the B widths sum to {sum(b.shape[1] for b in bs)}, not the weight's {out_features} rows"
    if row_slot is not None and row_slot.shape != (rows,):
        return f"row slots {tuple(row_slot.shape)} for {rows} rows"
    return None


if triton is not None:

    @triton.jit
    def group_of(pid_n, start1, start2):
        """The group of an index and where that group starts, with the groups laid end to end: of an
        output tile (starts in tiles), or of an output column (starts in columns)."""
        g = (pid_n >= start1).to(tl.int32) + (pid_n >= start2).to(tl.int32)
        first = tl.where(g == 0, 0, tl.where(g == 1, start1, start2))
        return g, first

    @triton.jit
    def pick(g, value0, value1, value2):
        return tl.where(g == 0, value0, tl.where(g == 1, value1, value2))

    @triton.jit
    def expand_view(y_ptr, b_ptr, N, stride_bs, stride_ym, y_off1, y_off2, b_off1, b_off2, n1, n2, start1, start2,
                    sbs1, sbs2, sym1, sym2, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr):
        """What an expand program (grid: row tiles x output tiles of all groups) works on: its group,
        that group's y and B, width, B slot and y row strides, and its row and column offsets."""
        g, first = group_of(tl.program_id(1), start1, start2)
        offs_m = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_n = (tl.program_id(1) - first) * BLOCK_N + tl.arange(0, BLOCK_N)
        return (g, y_ptr + pick(g, 0, y_off1, y_off2), b_ptr + pick(g, 0, b_off1, b_off2), pick(g, N, n1, n2),
                pick(g, stride_bs, sbs1, sbs2), pick(g, stride_ym, sym1, sym2), offs_m, offs_n)
