"""LoRA for many rows on tensor cores: the batched ``y += scaling * (x @ A[s]^T) @ B[s]^T`` of
``orbit::lora_add_`` when a decode step has tens to hundreds of rows.

The row kernels of ``lora.py`` give each row its own programs and multiply on CUDA cores, which is
right for a few rows and falls behind cuBLAS by a few dozen. The reference's cuBLAS path pays in
another way: per linear it casts both fp32 factors, runs two GEMMs, scales, adds, and with mixed
slots runs all of it once per slot and selects (six to fourteen kernels). Here two kernels serve
any batch and any mix of slots, reading the fp32 factors directly:

* shrink: ``t = x @ A_all^T`` with every slot's ``A`` stacked as ``[slots * r, in]``; programs
  split the inner dimension and each writes its partial sum, so a 256-row batch still fills the
  GPU and the result does not depend on timing (no atomics);
* expand: sums the partials, keeps each row's own slot's columns, rounds ``t`` to the activation
  dtype as the reference does, and adds ``scaling * t @ B_all^T`` into ``y`` in one pass.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

from orbit_kernels import lora_groups
from orbit_kernels._triton import pdl_args, pdl_enter, tl, triton
from orbit_kernels.lora_groups import expand_view, pick

MAX_STACKED_RANK = 256
"""Slots times rank a program holds in registers (two slots of rank 128)."""


if triton is not None:

    @triton.jit
    def _shrink_tiles_kernel(x_ptr, a_ptr, part_ptr, M, K, C, R, k_per_split, stride_xm, stride_as, stride_ar,
                             stride_ps, stride_pm, a_off1, a_off2,
                             BLOCK_M: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_K: tl.constexpr,
                             PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        pid_m, split, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        a_ptr += pick(g, 0, a_off1, a_off2)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        m_mask, c_mask = offs_m < M, offs_c < C
        # column c of t is rank c % R of slot c // R
        a_cols = a_ptr + (offs_c[None, :] // R) * stride_as + (offs_c[None, :] % R) * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=m_mask[:, None] & k_mask[None, :],
                        other=0.0)
            # A^T as [BLOCK_K, BLOCK_C], rounded to the activation dtype as the reference rounds it
            a = tl.load(a_cols + offs_k[:, None], mask=k_mask[:, None] & c_mask[None, :], other=0.0).to(x.dtype)
            acc = tl.dot(x, a, acc)
        tl.store(part_ptr + split * stride_ps + offs_m[:, None] * stride_pm + g * C + offs_c[None, :], acc,
                 mask=m_mask[:, None] & c_mask[None, :])

    @triton.jit
    def _expand_tiles_kernel(part_ptr, b_ptr, slot_ptr, y_ptr, M, N, C, R, splits, scaling,
                             stride_ps, stride_pm, stride_bs, stride_bn, stride_ym,
                             y_off1, y_off2, b_off1, b_off2, n1, n2, start1, start2, sbs1, sbs2, sym1, sym2,
                             HAS_SLOTS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                             BLOCK_C: tl.constexpr, WRITE: tl.constexpr = False, PDL: tl.constexpr = False):
        # WRITE: y = the update, rounded once (``dense_lora``: a GEMM adds the base product onto it)
        pdl_enter(PDL)  # first: nothing before it may touch memory
        g, y_ptr, b_ptr, N, stride_bs, stride_ym, offs_m, offs_n = expand_view(
            y_ptr, b_ptr, N, stride_bs, stride_ym, y_off1, y_off2, b_off1, b_off2, n1, n2, start1, start2, sbs1, sbs2,
            sym1, sym2, BLOCK_M, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        m_mask, n_mask, c_mask = offs_m < M, offs_n < N, offs_c < C
        t_mask = m_mask[:, None] & c_mask[None, :]
        if HAS_SLOTS:  # each row keeps the columns of its own slot only
            slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1)
            t_mask = t_mask & ((offs_c[None, :] // R) == slots[:, None])
        t = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        for split in range(0, splits):
            t += tl.load(part_ptr + split * stride_ps + offs_m[:, None] * stride_pm + g * C + offs_c[None, :],
                         mask=t_mask, other=0.0)
        y_ptrs = y_ptr + offs_m[:, None] * stride_ym + offs_n[None, :]
        y_mask = m_mask[:, None] & n_mask[None, :]
        dtype = y_ptr.dtype.element_ty
        # B_all^T as [BLOCK_C, BLOCK_N]: column c of t is rank c % R of slot c // R
        b = tl.load(b_ptr + (offs_c[:, None] // R) * stride_bs + offs_n[None, :] * stride_bn + offs_c[:, None] % R,
                    mask=c_mask[:, None] & n_mask[None, :], other=0.0).to(dtype)
        delta = tl.dot(t.to(dtype), b) * scaling
        if not WRITE:
            delta += tl.load(y_ptrs, mask=y_mask, other=0.0).to(tl.float32)
        tl.store(y_ptrs, delta.to(dtype), mask=y_mask)


def unserved_reason(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> str | None:
    """Why the tile kernels cannot take this call (None: they can); the row kernels then serve it."""
    if a.shape[0] * a.shape[1] > MAX_STACKED_RANK:
        return f"{a.shape[0]} slots of rank {a.shape[1]} over {MAX_STACKED_RANK} stacked"
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {x.dtype} (tensor cores take bf16 or fp16)"
    return None


def splits_for(rows: int, k: int, block_m: int, block_k: int) -> int:
    """Inner-dimension splits: enough programs to cover the SMs, each still streaming several tiles."""
    m_tiles = triton.cdiv(rows, block_m)
    most = max(1, triton.cdiv(k, 4 * block_k))
    return max(1, min(most, triton.cdiv(128, m_tiles)))


def launch_tiles(y: torch.Tensor, x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, row_slot: torch.Tensor | None,
                 scaling: float, split: int | None = None) -> None:
    """The two kernels (no dispatch checks). ``a`` [slots, r, in], ``b`` [slots, out, r]."""
    launch_tile_groups([y], x, [a], [b], row_slot, scaling, split)


def launch_tile_groups(ys: list[torch.Tensor], x: torch.Tensor, as_: list[torch.Tensor], bs: list[torch.Tensor],
                       row_slot: torch.Tensor | None, scaling: float, split: int | None = None,
                       write: bool = False) -> None:
    """The two kernels for up to three linears that read ``x`` (``lora_groups``). ``write``: each
    ``ys[g]`` becomes the update instead of having it added (nothing of ``ys`` is read)."""
    expand_tiles(ys, shrink_tiles(x, as_, split), bs, row_slot, scaling, write)


def shrink_tiles(x: torch.Tensor, as_: list[torch.Tensor], split: int | None = None,
                 beside: torch.cuda.Stream | None = None) -> torch.Tensor:
    """The shrink: fp32 partial sums ``[splits, rows, groups * slots * r]`` of ``x @ A_all^T`` for
    each group's stacked ``A``. ``beside``: launched on that stream once it has caught up with the
    current one (the caller makes the current stream wait for it before reading the partials);
    the partials are allocated on the current stream either way."""
    rows, k = x.shape
    a = as_[0]
    groups, r, stacked = len(as_), a.shape[1], a.shape[0] * a.shape[1]
    block_c = max(16, triton.next_power_of_2(stacked))
    # a [block_k, block_c] tile of A per pipeline stage: keep it within shared memory at 256 stacked ranks
    block_m, block_k = (16 if rows <= 16 else 32), (128 if block_c <= 64 else 64)
    split = split or splits_for(rows, k, block_m, block_k)
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    part = torch.empty((split, rows, groups * stacked), dtype=torch.float32, device=x.device)
    if beside is not None:
        beside.wait_stream(torch.cuda.current_stream(x.device))
    with torch.cuda.stream(beside) if beside is not None else nullcontext():
        _shrink_tiles_kernel[(triton.cdiv(rows, block_m), split, groups)](
            x, a, part, rows, k, stacked, r, k_per_split, x.stride(0), a.stride(0), a.stride(1), part.stride(0),
            part.stride(1), *lora_groups.offsets(as_), BLOCK_M=block_m, BLOCK_C=block_c, BLOCK_K=block_k,
            num_warps=4, **({} if beside is not None else pdl_args(x)))
    return part


def expand_tiles(ys: list[torch.Tensor], part: torch.Tensor, bs: list[torch.Tensor], row_slot: torch.Tensor | None,
                 scaling: float, write: bool = False) -> None:
    """The expand: ``shrink_tiles``' partials summed, each row's own slot's columns kept, times ``B``,
    added into (or, ``write``, written as) each ``ys[g]``."""
    rows, b = ys[0].shape[0], bs[0]
    r, stacked = b.shape[2], b.shape[0] * b.shape[2]
    block_c = max(16, triton.next_power_of_2(stacked))
    slots = row_slot if row_slot is not None else part  # unused pointer when HAS_SLOTS is off
    block_m, block_n = (16 if rows <= 16 else 64), 64
    tiles, group_args = lora_groups.expand_args(ys, bs, block_n)
    y = ys[0]
    _expand_tiles_kernel[(triton.cdiv(rows, block_m), tiles)](
        part, b, slots, y, rows, y.shape[1], stacked, r, part.shape[0], scaling, part.stride(0), part.stride(1),
        b.stride(0), b.stride(1), y.stride(0), *group_args, HAS_SLOTS=row_slot is not None,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_C=block_c, WRITE=write, num_warps=4, **pdl_args(y))
