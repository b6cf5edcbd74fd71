"""LoRA for inference in two Triton kernels over adapter slots, beside its plain-torch reference.

``orbit::lora_add_`` adds ``scaling * (x @ A[s]^T) @ B[s]^T`` to a base linear's output in place,
where ``s`` is each row's adapter slot (``row_slot``; one slot for every row when it is None).
The reference, also the CPU path, is what the trainer computes: both GEMMs in the activation dtype
after casting the fp32 factors, which costs six kernels per linear, and with mixed slots one pass
per slot and a select. Here a shrink kernel computes ``x @ A[s]^T`` per row in fp32 and an expand
kernel multiplies by ``B[s]`` and adds into ``y``: two kernels for any mix of slots (the batched
LoRA of S-LoRA and Punica, for a decode step's few rows). The fp32 accumulation differs from the
reference only by the activation dtype's rounding of the two intermediate products. Above
``KERNEL_MAX_ROWS`` rows, ``lora_tiles`` serves the same op with two tensor-core kernels.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from orbit_kernels import _triton, lora_groups, lora_tiles
from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton
from orbit_kernels.lora_groups import expand_view, group_of, pick

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""
MAX_RANK = 128
KERNEL_MAX_ROWS = 32
"""Up to this many rows the row kernels serve; above, the tensor-core tile kernels (``lora_tiles``).
Before those existed the reference's cuBLAS GEMMs served above 32 rows: one H200, Qwen3-1.7B
shape, LoRA r16, whole decode steps (bench/results/decode_throughput_lora_kernel_h200.jsonl), the
row kernels were 16-22% faster than the reference at batch 1 and 8-11% at 32, 3-8% slower at 256."""
FEW_ROWS = True
"""Set False to expand a few rows with the kernel for up to ``KERNEL_MAX_ROWS`` (benchmarks compare)."""
FEW_ROWS_MAX, FEW_ROWS_BLOCK_N = 4, 64
"""Up to this many rows the expand takes all groups' columns end to end, ``FEW_ROWS_BLOCK_N`` a
program, each reading whole rank rows of ``B``; the general expand pads rows to 16 and reads one
rank column of ``B`` at a time (strided), 429 us for 112 launches at batch 1 on an H200. Taking
this kernel up to 32 rows (8 columns a program at 32) measured 5% slower at batch 8 than the
general expand, and no faster at 32 (``decode_throughput_few_rows_32_h200.jsonl``)."""
SHRINK_PDL = True
"""Launch the shrink under programmatic dependent launch at every row count: the kernel before it is
one of ours (a norm, the attention's merge, the SwiGLU product), itself under PDL. False: the shrink
follows ``PDL_ABOVE_FEW_ROWS`` as the expand does. H100, Qwen3-1.7B shape, LoRA r16, in one process
(``decode_throughput_lora_shrink_pdl_h100.jsonl``, True first and last): int4 + LoRA 5,496 and
5,414 tok/s against 5,242 at batch 16, 9,107 and 9,013 against 8,895 at 32, but 2,990 and 3,031
against 3,117 at 8; bf16 + LoRA within 1% at 8-32."""
PDL_ABOVE_FEW_ROWS = False
"""Launch the general expand (and the shrink, with ``SHRINK_PDL`` off) under programmatic dependent
launch above ``FEW_ROWS_MAX`` rows too (up to it they always are). Off: behind a cuBLAS GEMM, which
never lets it start early, PDL makes bf16 + LoRA slower; behind int4's packed GEMM (9-32 rows, under
PDL) it would help. Against it in one process (``decode_throughput_lora_shrink_pdl_h100.jsonl``,
shrink under PDL both ways): bf16 + LoRA 2,632 and 2,643 tok/s against 2,491 at batch 8, 4,897 and
4,890 against 4,494 at 16, 8,847 and 8,861 against 8,958 at 32; int4 + LoRA 5,496 and 5,414 against
5,603 at 16, 9,107 and 9,013 against 9,477 at 32. (The round before measured it once against True
in ``decode_throughput_lora_pdl_rows_h100.jsonl``; ``decode_throughput_lora_pdl_rows_again_h100.jsonl``
repeats that: bf16 + LoRA 2,642 against 2,455 and 2,483 at 8, 4,891 against 4,447 and 4,506 at 16.)"""
EXPAND_AFTER_PDL = True
"""Launch the general expand under PDL above ``FEW_ROWS_MAX`` rows when its caller says the base
output came from one of our kernels under PDL (int4's packed GEMM at 9-32 rows), where it can start
early; behind cuBLAS (bf16) it stays without (``PDL_ABOVE_FEW_ROWS``). H100, int4 + LoRA, against
False in one process (``decode_throughput_lora_expand_after_pdl_h100.jsonl``, True first and
last): 5,616 and 5,715 tok/s against 5,520 at batch 16, 9,444 and 9,421 against 9,182 at 32."""
WIDE_SHRINK = True
"""Set False for the shrink's old 512-column steps (a 2,048-wide row takes four; benchmarks compare)."""
TILES_ENABLED = True
"""Set False to serve more than ``KERNEL_MAX_ROWS`` rows through the reference (benchmarks)."""
SHRINK_BESIDE, BESIDE_MAX_ROWS = True, 128
"""Above ``KERNEL_MAX_ROWS`` rows and up to ``BESIDE_MAX_ROWS``, where a caller computes the base
output itself (``add_beside``: a cuBLAS GEMM), the tile shrink, which reads only the input, runs on
a side stream while the base GEMM runs, and the expand follows both. In the 256-row decode step of
bf16 + LoRA r16 at the Qwen3-1.7B shape the shrinks took 0.39 ms of a 5.46 ms replay, in the chain
after each GEMM (``decode_graph_replay_profile_prefill_256_h100.txt``). H100, that shape, on at
every row count above 32 against off, one process (``decode_throughput_shrink_beside_h100.jsonl``,
first and last on): at 64 rows int4 + LoRA 13,843 and 13,768 tok/s against 13,104, bf16 + LoRA
18,755 and 18,782 against 17,115; at 256 rows int4 + LoRA 30,555 and 30,517 against 30,613 and
bf16 + LoRA 35,328 and 35,279 against 35,944, a loss, hence the cap (128 rows is not measured).
False: shrink and expand after the GEMM (benchmarks compare)."""


def lora_add_reference(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor,
                       row_slot: torch.Tensor | None, scaling: float) -> None:
    """``a`` [slots, r, in], ``b`` [slots, out, r]; ``x`` [rows, in] and ``y`` [rows, out]."""
    def delta(slot: int) -> torch.Tensor:
        return ((x @ a[slot].to(x.dtype).t()) @ b[slot].to(x.dtype).t()) * scaling

    if row_slot is None:
        y += delta(0).to(y.dtype)
        return
    for slot in range(a.shape[0]):
        mask = (row_slot == slot)[:, None]
        y.copy_(torch.where(mask, y + delta(slot).to(y.dtype), y))


def shrink_reference(x: torch.Tensor, as_: list[torch.Tensor], row_slot: torch.Tensor | None) -> torch.Tensor:
    """What ``shrink`` computes, in fp32 torch: ``x [rows, in] @ as_[g][s]^T`` for each group ``g``
    and each row's slot ``s`` (slot 0 without ``row_slot``), the groups side by side."""
    flat = x.float()
    slots = row_slot.long() if row_slot is not None else torch.zeros(flat.shape[0], dtype=torch.long,
                                                                     device=flat.device)
    return torch.cat([torch.einsum("ni,nri->nr", flat, a.float()[slots]) for a in as_], dim=1)


if triton is not None:

    @triton.jit
    def a_row_first(a_ptr, slot_ptr, row, r, cols, stride_as, stride_ar, HAS_SLOTS: tl.constexpr,
                    BLOCK_K: tl.constexpr, EARLY: tl.constexpr, PDL: tl.constexpr):
        """A shrink program's start: ``(pointer to row r of the row's slot of A, its first BLOCK_K
        values)``, with the PDL wait before anything the kernel before may write. Under
        ``EARLY_READS`` and one slot, A's first step (a frozen weight) is read before the wait."""
        early: tl.constexpr = EARLY and not HAS_SLOTS  # a row's slot is not a frozen weight: it waits
        if not early:
            pdl_enter(PDL)
        slot = tl.load(slot_ptr + row) if HAS_SLOTS else 0
        a_row = a_ptr + slot * stride_as + r * stride_ar
        a_first = tl.load(a_row + tl.arange(0, BLOCK_K), mask=tl.arange(0, BLOCK_K) < cols, other=0.0)
        if early:
            pdl_enter(PDL)
        return a_row, a_first

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, slot_ptr, t_ptr, K, R, stride_xm, stride_as, stride_ar, stride_tm, a_off1, a_off2,
                       HAS_SLOTS: tl.constexpr, BLOCK_K: tl.constexpr, EARLY: tl.constexpr = False,
                       PDL: tl.constexpr = False):
        # one program per (row, rank index, group): a decode step has a row or a few, so a program
        # per row alone would leave all but a few SMs idle while one streams the whole of A
        row, r, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        # x and t come after the wait
        a_row, a_first = a_row_first(a_ptr + pick(g, 0, a_off1, a_off2), slot_ptr, row, r, K, stride_as, stride_ar,
                                     HAS_SLOTS, BLOCK_K, EARLY, PDL)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, K, BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + row * stride_xm + offs_k, mask=k_mask, other=0.0).to(tl.float32)
            a = a_first
            if k0 > 0:
                a = tl.load(a_row + offs_k, mask=k_mask, other=0.0)
            acc += x * a.to(tl.float32)
        tl.store(t_ptr + row * stride_tm + g * R + r, tl.sum(acc, axis=0))

    @triton.jit
    def _expand_kernel(t_ptr, b_ptr, slot_ptr, y_ptr, M, N, R, scaling, stride_tm, stride_bs, stride_bn, stride_ym,
                       y_off1, y_off2, b_off1, b_off2, n1, n2, start1, start2, sbs1, sbs2, sym1, sym2,
                       HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                       PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        g, y_ptr, b_ptr, N, stride_bs, stride_ym, offs_m, offs_n = expand_view(
            y_ptr, b_ptr, N, stride_bs, stride_ym, y_off1, y_off2, b_off1, b_off2, n1, n2, start1, start2, sbs1, sbs2,
            sym1, sym2, BLOCK_M, BLOCK_N)
        offs_r = tl.arange(0, BLOCK_R)
        m_mask, n_mask, r_mask = offs_m < M, offs_n < N, offs_r < R
        slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=0) if HAS_SLOTS else tl.zeros((BLOCK_M,), dtype=tl.int64)
        t = tl.load(t_ptr + offs_m[:, None] * stride_tm + g * R + offs_r[None, :], mask=m_mask[:, None] & r_mask[None, :],
                    other=0.0)
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r in range(0, R):
            t_r = tl.sum(tl.where(offs_r[None, :] == r, t, 0.0), axis=1)
            b_r = tl.load(b_ptr + slots[:, None] * stride_bs + offs_n[None, :] * stride_bn + r,
                          mask=m_mask[:, None] & n_mask[None, :], other=0.0).to(tl.float32)
            acc += t_r[:, None] * b_r
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + acc * scaling).to(y_ptr.dtype.element_ty), mask=mask)


if triton is not None:

    @triton.jit
    def _t_pointers(t_ptr, rows, offs_n, R, stride_tm, n1, n12):
        # [rows, columns] pointers to rank 0 of each row's t for the column's group
        g, _ = group_of(offs_n, n1, n12)
        return t_ptr + rows[:, None] * stride_tm + (g * R)[None, :]

    @triton.jit
    def _b_pointers(b_ptr, slot_ptr, rows, offs_n, M, stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2,
                    HAS_SLOTS: tl.constexpr):
        # [rows, columns] pointers to rank 0 of B_g[slot(row), column]
        g, start = group_of(offs_n, n1, n12)
        b_cols = pick(g, 0, b_off1, b_off2) + (offs_n - start) * stride_bn
        slots = tl.load(slot_ptr + rows, mask=rows < M, other=0) if HAS_SLOTS else tl.zeros_like(rows)
        return b_ptr + slots[:, None] * pick(g, sbs0, sbs1, sbs2)[None, :] + b_cols[None, :]

    @triton.jit
    def rows_delta(t_ptr, b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_tm, stride_bn, b_off1, b_off2, n1, n12,
                   sbs0, sbs1, sbs2, HAS_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr):
        """``sum_r t[m, g R + r] * B_g[slot(m), n - start_g, r]`` for rows ``rows`` and output
        columns ``offs_n`` of groups laid end to end (group 1 starts at ``n1``, group 2 at ``n12``):
        a LoRA expand for a few rows, for a kernel that holds those rows' base outputs."""
        b = rows_delta_b(b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1,
                         sbs2, HAS_SLOTS, BLOCK_R, R)
        t = rows_delta_t(t_ptr, rows, offs_n, M, N, R, stride_tm, n1, n12, BLOCK_R, R)
        return tl.sum(t * b, axis=2)

    @triton.jit
    def _rank_mask(rows, offs_n, M, N, ranks, BLOCK_R: tl.constexpr):
        offs_r = tl.arange(0, BLOCK_R)
        mask = ((rows < M)[:, None] & (offs_n < N)[None, :])[:, :, None] & (offs_r < ranks)[None, None, :]
        return offs_r, mask

    @triton.jit
    def rows_delta_b(b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2,
                     HAS_SLOTS: tl.constexpr, BLOCK_R: tl.constexpr, ranks):
        """``rows_delta``'s ``[rows, columns, rank]`` fp32 factor of B, its first ``ranks`` (R; 0 reads nothing):
        a frozen read for a step, so a kernel may issue it before its PDL wait when there are no
        row slots to read first."""
        b_ptrs = _b_pointers(b_ptr, slot_ptr, rows, offs_n, M, stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2,
                             HAS_SLOTS)
        offs_r, mask = _rank_mask(rows, offs_n, M, N, ranks, BLOCK_R)
        return tl.load(b_ptrs[:, :, None] + offs_r[None, None, :], mask=mask, other=0.0).to(tl.float32)

    @triton.jit
    def rows_delta_t(t_ptr, rows, offs_n, M, N, R, stride_tm, n1, n12, BLOCK_R: tl.constexpr, ranks):
        """``rows_delta``'s ``[rows, columns, rank]`` factor of ``t``, its first ``ranks``."""
        t_ptrs = _t_pointers(t_ptr, rows, offs_n, R, stride_tm, n1, n12)
        offs_r, mask = _rank_mask(rows, offs_n, M, N, ranks, BLOCK_R)
        return tl.load(t_ptrs[:, :, None] + offs_r[None, None, :], mask=mask, other=0.0)

    @triton.jit
    def rows_delta_by_rank(t_ptr, b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_tm, stride_bn, b_off1, b_off2, n1,
                           n12, sbs0, sbs1, sbs2, HAS_SLOTS: tl.constexpr):
        """``rows_delta`` one rank at a time, for a row tile whose ``[rows, columns, rank]``
        product would not fit in registers (the packed GEMM's 16 and 32 rows)."""
        t_ptrs = _t_pointers(t_ptr, rows, offs_n, R, stride_tm, n1, n12)
        b_ptrs = _b_pointers(b_ptr, slot_ptr, rows, offs_n, M, stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2,
                             HAS_SLOTS)
        mask = (rows < M)[:, None] & (offs_n < N)[None, :]
        delta = tl.load(t_ptrs, mask=mask, other=0.0) * tl.load(b_ptrs, mask=mask, other=0.0).to(tl.float32)
        for r in range(1, R):
            delta += tl.load(t_ptrs + r, mask=mask, other=0.0) * tl.load(b_ptrs + r, mask=mask, other=0.0).to(tl.float32)
        return delta


if triton is not None:

    @triton.jit
    def _expand_rows_kernel(t_ptr, b_ptr, slot_ptr, y_ptr, M, N, R, scaling, stride_tm, stride_bn, b_off1, b_off2,
                            y_off1, y_off2, n1, n12, sbs0, sbs1, sbs2, sym0, sym1, sym2,
                            HAS_SLOTS: tl.constexpr, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr,
                            PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        # the columns of all groups laid end to end; B is read a whole rank row at a time (contiguous)
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        rows = tl.arange(0, ROWS)
        delta = rows_delta(t_ptr, b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_tm, stride_bn, b_off1, b_off2, n1,
                           n12, sbs0, sbs1, sbs2, HAS_SLOTS, BLOCK_R)
        g, start = group_of(offs_n, n1, n12)
        columns = pick(g, 0, y_off1, y_off2) + offs_n - start
        y_ptrs = y_ptr + rows[:, None] * pick(g, sym0, sym1, sym2)[None, :] + columns[None, :]
        mask = (rows < M)[:, None] & (offs_n < N)[None, :]
        y = tl.load(y_ptrs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, (y + delta * scaling).to(y_ptr.dtype.element_ty), mask=mask)


def unserved_reason(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why no kernel can take this call (None: one can)."""
    if x.dim() != 2 or y.dim() != 2:
        return f"x {tuple(x.shape)} and y {tuple(y.shape)} are not [rows, features]"
    if a.shape[1] > MAX_RANK:
        return f"rank {a.shape[1]} over {MAX_RANK}"
    if x.stride(-1) != 1 or y.stride(-1) != 1 or a.stride(-1) != 1 or b.stride(-1) != 1:
        return "a last dimension is not contiguous"
    return None


def _path(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> str:
    """``rows`` (the row kernels), ``tiles`` (the tensor-core kernels) or ``reference``."""
    if not serves("lora_add_", ENABLED, x, lambda: unserved_reason(y, x, a, b)):
        return "reference"
    if x.shape[0] <= KERNEL_MAX_ROWS:
        return "rows"
    if TILES_ENABLED and serves("lora_add_ tiles", True, x, lambda: lora_tiles.unserved_reason(x, a, b)):
        return "tiles"
    return "reference"


def launch(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slot: torch.Tensor | None,
           scaling: float, after_pdl: bool = False) -> None:
    """The two kernels (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    launch_groups([y], x, [a], [b], row_slot, scaling, after_pdl)


def _shrink_key(x: torch.Tensor, as_: list[torch.Tensor], row_slot: torch.Tensor | None) -> tuple:
    def place(tensor: torch.Tensor) -> tuple:
        return tensor.data_ptr(), tuple(tensor.shape), tuple(tensor.stride())
    return place(x), tuple(place(a) for a in as_), None if row_slot is None else place(row_slot)


_OFFERED: tuple | None = None


class offer_shrink:
    """Inside it, a ``shrink`` of exactly ``x`` (``[rows, in]``) by exactly ``as_`` and ``row_slot``
    returns ``t`` and launches nothing: a kernel before it computed the shrink already
    (``norm_shrink``, ``silu_shrink``). Any other call shrinks as usual."""

    def __init__(self, x: torch.Tensor, as_: list[torch.Tensor], row_slot: torch.Tensor | None, t: torch.Tensor):
        self.offer = (_shrink_key(x, as_, row_slot), t)

    def __enter__(self) -> None:
        global _OFFERED
        self.before, _OFFERED = _OFFERED, self.offer

    def __exit__(self, *exc) -> None:
        global _OFFERED
        _OFFERED = self.before


def shrink(x: torch.Tensor, as_: list[torch.Tensor], row_slot: torch.Tensor | None) -> torch.Tensor:
    """fp32 ``t [rows, groups * r]``: ``x @ as_[g][s]^T`` for each group ``g`` and row slot ``s``."""
    if _OFFERED is not None and _OFFERED[0] == _shrink_key(x, as_, row_slot):
        return _OFFERED[1]
    rows, k = x.shape
    groups, r = len(as_), as_[0].shape[1]
    t = torch.empty((rows, groups * r), dtype=torch.float32, device=x.device)
    slots = row_slot if row_slot is not None else t  # unused pointer when HAS_SLOTS is off
    a = as_[0]
    _shrink_kernel[(rows, r, groups)](x, a, slots, t, k, r, x.stride(0), a.stride(0), a.stride(1), t.stride(0),
                                      *lora_groups.offsets(as_), HAS_SLOTS=row_slot is not None,
                                      BLOCK_K=min(triton.next_power_of_2(k), 2048) if WIDE_SHRINK else 512, num_warps=4,
                                      EARLY=_triton.EARLY_READS, **(pdl_args(x) if SHRINK_PDL else _pdl(x, rows)))
    return t


def _pdl(tensor: torch.Tensor, rows: int) -> dict:
    return pdl_args(tensor) if PDL_ABOVE_FEW_ROWS or rows <= FEW_ROWS_MAX else {}


def launch_groups(ys: list[torch.Tensor], x: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                  row_slot: torch.Tensor | None, scaling: float, after_pdl: bool = False) -> None:
    """The two kernels for up to three linears that read ``x`` (``lora_groups``); ``after_pdl``: the
    outputs ``ys`` come from a kernel launched under PDL (``EXPAND_AFTER_PDL``)."""
    rows, r = x.shape[0], as_[0].shape[1]
    t = shrink(x, as_, row_slot)
    slots = row_slot if row_slot is not None else t  # unused pointer when HAS_SLOTS is off
    block_r = max(16, triton.next_power_of_2(r))
    if FEW_ROWS and rows <= FEW_ROWS_MAX:
        widths = [y.shape[1] for y in ys] + [0] * (3 - len(ys))
        pad = lambda values: list(values) + [0] * (3 - len(values))  # noqa: E731
        y_strides, b_strides = pad([y.stride(0) for y in ys]), pad([b.stride(0) for b in bs])
        _expand_rows_kernel[(triton.cdiv(sum(widths), FEW_ROWS_BLOCK_N),)](
            t, bs[0], slots, ys[0], rows, sum(widths), r, scaling, t.stride(0), bs[0].stride(1), *lora_groups.offsets(bs),
            *lora_groups.offsets(ys), widths[0], widths[0] + widths[1], *b_strides, *y_strides,
            HAS_SLOTS=row_slot is not None, ROWS=triton.next_power_of_2(rows), BLOCK_N=FEW_ROWS_BLOCK_N,
            BLOCK_R=block_r, num_warps=4, **pdl_args(t))
        return
    block_m = 16 if rows <= 16 else 32
    tiles, group_args = lora_groups.expand_args(ys, bs, 64)
    y, b = ys[0], bs[0]
    _expand_kernel[(triton.cdiv(rows, block_m), tiles)](
        t, b, slots, y, rows, y.shape[1], r, scaling, t.stride(0), b.stride(0), b.stride(1), y.stride(0), *group_args,
        HAS_SLOTS=row_slot is not None, BLOCK_M=block_m, BLOCK_N=64, BLOCK_R=block_r, num_warps=4,
        **(pdl_args(t) if after_pdl and EXPAND_AFTER_PDL else _pdl(t, rows)))


_BESIDE: dict[tuple[int, int], torch.cuda.Stream] = {}


def _beside_stream(device: torch.device) -> torch.cuda.Stream:
    """A side stream of the current stream's priority (a graph's capture stream runs at high priority)."""
    current = torch.cuda.current_stream(device)
    key = (current.device.index, current.priority)
    if key not in _BESIDE:
        _BESIDE[key] = torch.cuda.Stream(current.device, priority=current.priority)
    return _BESIDE[key]


def add_beside(base: Callable[[], list[torch.Tensor]], x: torch.Tensor, as_: list[torch.Tensor],
               bs: list[torch.Tensor], row_slot: torch.Tensor | None, scaling: float) -> list[torch.Tensor] | None:
    """``base()``'s outputs (one per linear of ``x``, ``[rows, features]``) with each linear's update
    added (``lora_add_group_``'s arithmetic): the tile shrink on a side stream while ``base()`` runs
    on the current one, then the expand once both are done (``SHRINK_BESIDE``). None, with nothing
    run: not these rows, or factors the tile kernels do not take (the caller runs base, then the add)."""
    rows = x.shape[0]
    if not (SHRINK_BESIDE and ENABLED and TILES_ENABLED and x.is_cuda and KERNEL_MAX_ROWS < rows <= BESIDE_MAX_ROWS):
        return None
    a, b = as_[0], bs[0]
    if not serves("lora_add_ beside", True, x, lambda: unserved_reason(x, x, a, b) or lora_tiles.unserved_reason(
            x, a, b) or lora_groups.factors_reason(as_, bs)):
        return None
    side = _beside_stream(x.device)
    part = lora_tiles.shrink_tiles(x, as_, beside=side)
    ys = base()
    torch.cuda.current_stream(x.device).wait_stream(side)
    if lora_groups.unserved_reason(ys, as_, bs) is None:
        lora_tiles.expand_tiles(ys, part, bs, row_slot, scaling)
    else:  # outputs the expand cannot address (not [rows, features] with contiguous features)
        for y, a, b in zip(ys, as_, bs):
            lora_add_reference(y, x, a, b, row_slot, scaling)
    return ys


@torch.library.custom_op("orbit::lora_add_", mutates_args=("y",))
def lora_add_(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slot: torch.Tensor | None,
              scaling: float, after_pdl: bool = False) -> None:
    """``y += scaling * (x @ a[s]^T) @ b[s]^T`` per row (no autograd: inference only). ``after_pdl``:
    ``y`` comes from one of our kernels launched under PDL (a launch option, not arithmetic)."""
    path = _path(y, x, a, b)
    if path == "rows":
        launch(y, x, a, b, row_slot, scaling, after_pdl)
    elif path == "tiles":
        lora_tiles.launch_tiles(y, x, a, b, row_slot, scaling)
    else:
        lora_add_reference(y, x, a, b, row_slot, scaling)


@lora_add_.register_fake
def _(y, x, a, b, row_slot, scaling, after_pdl=False):
    return None


@torch.library.custom_op("orbit::lora_add_group_", mutates_args=("ys",))
def lora_add_group_(ys: list[torch.Tensor], x: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                    row_slot: torch.Tensor | None, scaling: float, after_pdl: bool = False) -> None:
    """``lora_add_`` for up to three linears that read ``x`` (q/k/v, gate/up), in one launch of
    each kernel (``lora_groups``); ``ys[g] += scaling * (x @ as_[g][s]^T) @ bs[g][s]^T``."""
    path = _path(ys[0], x, as_[0], bs[0])
    if path != "reference" and not serves("lora_add_group_", True, x, lambda: lora_groups.unserved_reason(ys, as_, bs)):
        path = "reference"
    if path == "rows":
        launch_groups(ys, x, as_, bs, row_slot, scaling, after_pdl)
    elif path == "tiles":
        lora_tiles.launch_tile_groups(ys, x, as_, bs, row_slot, scaling)
    else:
        for y, a, b in zip(ys, as_, bs):
            lora_add_reference(y, x, a, b, row_slot, scaling)


@lora_add_group_.register_fake
def _(ys, x, as_, bs, row_slot, scaling, after_pdl=False):
    return None
