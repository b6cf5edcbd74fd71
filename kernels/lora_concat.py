"""LoRA inside the base GEMM of a weight dequantized ahead: ``y = [x | t] @ [W | scaling B]^T``.

Above the packed kernels' rows the engine dequantizes each packed weight into a buffer
(``models.dequant_ahead``) and calls cuBLAS; the LoRA update then costs a shrink kernel and an
expand kernel that reads and rewrites the whole output. Since the buffer is written anyway, it can
carry ``scaling * B`` as extra columns, and the input ``t = x @ A^T`` as extra columns of ``x``:
one GEMM then adds the update while it computes the base, and the expand kernel is gone.

Layout of the extra columns, ``groups x slots`` blocks of ``rank_block(r)`` columns (a multiple of
16, zero past ``r``), block ``g * slots + s`` for linear ``g`` of a fused group and adapter slot
``s``, then zeros to a whole number of 64-column steps of the GEMM (``extra_columns``):

* in the input: ``t_g = x @ A_g[s]^T`` rounded to the activation dtype (as the reference rounds
  it), kept only in the rows whose slot is ``s`` (zeros elsewhere);
* in the weight: ``scaling * B_g[s]`` in the rows of linear ``g``, zeros in the other linears' rows.

The update accumulates in fp32 with the base, where the reference rounds ``t @ B^T`` and its
scaling to the activation dtype before adding: the two differ by that rounding.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from orbit_kernels import lora_groups
from orbit_kernels._triton import serves, tl, triton
from orbit_kernels.lora_groups import group_of, pick
from orbit_kernels.packed_gemv import arrival_counters, finish_split

ENABLED = True
"""Set False to run the base GEMM and then the LoRA kernels (benchmarks compare the two)."""
MAX_EXTRA = 1 / 8
"""The extra columns may add at most this fraction to the inner dimension; past it the GEMM's
extra work could cost more than the expand it saves, so the LoRA kernels serve the call."""
MAX_RANK_BLOCK = 128


def rank_block(rank: int) -> int:
    return max(16, 1 << (rank - 1).bit_length())


def extra_columns(in_features: int, groups: int, slots: int, rank: int) -> int:
    """How many columns the update adds to the input and to the weight: its blocks, then zeros up
    to a multiple of 64 in all. A ragged inner dimension measured 27% slower in cuBLAS's GEMM for
    the 2,048-wide outputs at 256 rows (H100, one process)."""
    inner = in_features + groups * slots * rank_block(rank)
    return -(-inner // 64) * 64 - in_features


class LoRAColumns(NamedTuple):
    """The LoRA factors of one base call (a linear, or a fused group's linears in output order):
    ``as_[g]`` [slots, r, in], ``bs[g]`` [slots, out_g, r], each row's slot (None: slot 0)."""
    as_: tuple[torch.Tensor, ...]
    bs: tuple[torch.Tensor, ...]
    row_slot: torch.Tensor | None
    scaling: float

    def width(self, in_features: int) -> int:
        """How many columns the update adds to the input and to the weight (``extra_columns``)."""
        return extra_columns(in_features, len(self.as_), *self.as_[0].shape[:2])

    def same_as(self, as_, bs, row_slot, scaling: float) -> bool:
        """Whether these are the factors a call passes (the same tensors, not equal values)."""
        same = lambda p, q: p is q or (p is not None and q is not None and p.data_ptr() == q.data_ptr()  # noqa: E731
                                        and p.shape == q.shape and p.stride() == q.stride())
        return (scaling == self.scaling and len(as_) == len(self.as_) and len(bs) == len(self.bs)
                and all(same(p, q) for p, q in zip((*as_, *bs, row_slot), (*self.as_, *self.bs, self.row_slot))))


def columns_reason(in_features: int, as_, bs) -> str | None:
    """Why these factors cannot ride as extra columns of a base call (None: they can)."""
    slots, rank = as_[0].shape[:2]
    if rank_block(rank) > MAX_RANK_BLOCK:
        return f"rank {rank} over {MAX_RANK_BLOCK}"
    if not 1 <= len(as_) <= lora_groups.MAX_GROUPS or len(as_) != len(bs):
        return f"{len(as_)} A and {len(bs)} B (1 to {lora_groups.MAX_GROUPS} linears)"
    if extra_columns(in_features, len(as_), slots, rank) > MAX_EXTRA * in_features:
        return f"{len(as_)} linears x {slots} slots of rank {rank} over {MAX_EXTRA:.3g} of {in_features} inputs"
    if any(a.stride(-1) != 1 for a in as_) or any(b.stride(-1) != 1 for b in bs):
        return "a factor's last dimension is not contiguous"
    return lora_groups.factors_reason(list(as_), list(bs))


def shrink_reference(x_ext: torch.Tensor, x: torch.Tensor, as_: list[torch.Tensor],
                     row_slot: torch.Tensor | None) -> None:
    """``x_ext[:, :in] = x`` and each block ``t_g`` of slot ``s`` into the columns after."""
    k, (slots, rank) = x.shape[1], as_[0].shape[:2]
    block = rank_block(rank)
    extra = torch.zeros((x.shape[0], x_ext.shape[1] - k), dtype=x.dtype, device=x.device)
    for g, a in enumerate(as_):
        for s in range(slots):
            t = x @ a[s].to(x.dtype).t()
            if row_slot is not None:
                t = torch.where((row_slot == s)[:, None], t, torch.zeros_like(t))
            start = (g * slots + s) * block
            extra[:, start:start + rank] = t
    x_ext[:, :k] = x
    x_ext[:, k:] = extra


def fill_reference(w_ext: torch.Tensor, in_features: int, bs: list[torch.Tensor], scaling: float) -> None:
    """``w_ext[:, in:]``: ``scaling * B_g[s]`` in the block of linear ``g`` and slot ``s``, over the
    rows of linear ``g``; zeros elsewhere."""
    slots, _, rank = bs[0].shape
    block = rank_block(rank)
    extra = torch.zeros((w_ext.shape[0], w_ext.shape[1] - in_features), dtype=torch.float32, device=w_ext.device)
    row = 0
    for g, b in enumerate(bs):
        for s in range(slots):
            start = (g * slots + s) * block
            extra[row:row + b.shape[1], start:start + rank] = b[s].float() * scaling
        row += b.shape[1]
    w_ext[:, in_features:] = extra.to(w_ext.dtype)


if triton is not None:

    @triton.jit
    def _shrink_kernel(x_ptr, a_ptr, slot_ptr, out_ptr, part_ptr, count_ptr, M, K, R, SLOTS, GROUPS, C, k_per_split,
                       stride_xm, stride_as, stride_ar, stride_om, a_off1, a_off2, HAS_SLOTS: tl.constexpr,
                       SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr,
                       BLOCK_K: tl.constexpr):
        # a program per (row tile, inner split) computes every block's columns, reading its x once
        # and copying it to x_ext; the split's partials meet in the tile's last arrival
        pid_m, split = tl.program_id(0), tl.program_id(1)
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_c = tl.arange(0, BLOCK_C)
        g_c, s_c, j_c = offs_c // (SLOTS * BLOCK_R), (offs_c // BLOCK_R) % SLOTS, offs_c % BLOCK_R
        m_mask, c_mask = offs_m < M, (j_c < R) & (g_c < GROUPS)
        a_cols = a_ptr + pick(g_c, 0, a_off1, a_off2) + s_c * stride_as + j_c * stride_ar
        acc = tl.zeros((BLOCK_M, BLOCK_C), dtype=tl.float32)
        k_start = split * k_per_split
        for k0 in range(k_start, tl.minimum(k_start + k_per_split, K), BLOCK_K):
            offs_k = k0 + tl.arange(0, BLOCK_K)
            k_mask = offs_k < K
            x_mask = m_mask[:, None] & k_mask[None, :]
            x = tl.load(x_ptr + offs_m[:, None] * stride_xm + offs_k[None, :], mask=x_mask, other=0.0)
            tl.store(out_ptr + offs_m[:, None] * stride_om + offs_k[None, :], x, mask=x_mask)
            # A^T as [BLOCK_K, BLOCK_C], rounded to the activation dtype as the reference rounds it
            a = tl.load(a_cols[None, :] + offs_k[:, None], mask=k_mask[:, None] & c_mask[None, :],
                        other=0.0).to(x.dtype)
            acc = tl.dot(x, a, acc)
        if HAS_SLOTS:  # each row keeps its own slot's blocks
            slots = tl.load(slot_ptr + offs_m, mask=m_mask, other=-1)
            acc = tl.where(slots[:, None] == s_c[None, :], acc, 0.0)
        finish_split(acc, out_ptr + offs_m[:, None] * stride_om + K + offs_c[None, :],
                     m_mask[:, None] & (offs_c < C)[None, :], part_ptr, offs_m[:, None] * BLOCK_C + offs_c[None, :],
                     M * BLOCK_C, count_ptr, pid_m, split, SPLIT)

    @triton.jit
    def _fill_kernel(b_ptr, out_ptr, N, R, SLOTS, C, scaling, stride_bn, stride_om, b_off1, b_off2, n1, n12,
                     sbs0, sbs1, sbs2, BLOCK_N: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_c = tl.arange(0, BLOCK_C)
        g_n, start = group_of(offs_n, n1, n12)  # the linear of each output row
        g_c, s_c, j_c = offs_c // (SLOTS * BLOCK_R), (offs_c // BLOCK_R) % SLOTS, offs_c % BLOCK_R
        inside = (offs_n < N)[:, None] & (offs_c < C)[None, :]
        take = inside & (g_n[:, None] == g_c[None, :]) & (j_c < R)[None, :]
        rows = pick(g_n, 0, b_off1, b_off2) + (offs_n - start) * stride_bn
        b = tl.load(b_ptr + rows[:, None] + s_c[None, :] * pick(g_n, sbs0, sbs1, sbs2)[:, None] + j_c[None, :],
                    mask=take, other=0.0)
        tl.store(out_ptr + offs_n[:, None] * stride_om + offs_c[None, :],
                 (b.to(tl.float32) * scaling).to(out_ptr.dtype.element_ty), mask=inside)


def _kernel_reason(x_ext: torch.Tensor, x: torch.Tensor) -> str | None:
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations in {x.dtype} (tensor cores take bf16 or fp16)"
    if x.stride(-1) != 1 or x_ext.stride(-1) != 1:
        return "an input's last dimension is not contiguous"
    return None


def launch_shrink(x_ext: torch.Tensor, x: torch.Tensor, as_: list[torch.Tensor], row_slot: torch.Tensor | None,
                  split: int | None = None, block_m: int = 16, block_k: int = 128, num_warps: int = 4) -> None:
    """The shrink kernel (no dispatch checks: tests call it directly, also under the interpreter)."""
    (rows, k), (slots, rank) = x.shape, as_[0].shape[:2]
    a, columns = as_[0], x_ext.shape[1] - k
    block_c = triton.next_power_of_2(columns)
    tiles = triton.cdiv(rows, block_m)
    # enough programs to cover the SMs at a decode step's rows, each still streaming a few tiles
    split = split or max(1, min(triton.cdiv(k, 4 * block_k), triton.cdiv(128, tiles)))
    k_per_split = triton.cdiv(triton.cdiv(k, split), block_k) * block_k
    split = triton.cdiv(k, k_per_split)
    part = count = x_ext  # read only when the inner dimension is split
    if split > 1:
        part = torch.empty((split, rows, block_c), dtype=torch.float32, device=x.device)
        count = arrival_counters(x.device, tiles)
    _shrink_kernel[(tiles, split)](
        x, a, row_slot if row_slot is not None else x, x_ext, part, count, rows, k, rank, slots, len(as_), columns,
        k_per_split, x.stride(0), a.stride(0), a.stride(1), x_ext.stride(0), *lora_groups.offsets(list(as_)),
        HAS_SLOTS=row_slot is not None, SPLIT=split, BLOCK_M=block_m, BLOCK_R=rank_block(rank), BLOCK_C=block_c,
        BLOCK_K=block_k, num_warps=num_warps)


def launch_fill(w_ext: torch.Tensor, in_features: int, bs: list[torch.Tensor], scaling: float) -> None:
    """The fill kernel (no dispatch checks)."""
    slots, _, rank = bs[0].shape
    block, extra = rank_block(rank), w_ext[:, in_features:]
    widths = [b.shape[1] for b in bs] + [0] * (lora_groups.MAX_GROUPS - len(bs))
    strides = [b.stride(0) for b in bs] + [0] * (lora_groups.MAX_GROUPS - len(bs))
    columns = w_ext.shape[1] - in_features
    _fill_kernel[(triton.cdiv(w_ext.shape[0], 64),)](
        bs[0], extra, w_ext.shape[0], rank, slots, columns, scaling, bs[0].stride(1), w_ext.stride(0),
        *lora_groups.offsets(list(bs)), widths[0], widths[0] + widths[1] if len(bs) > 2 else w_ext.shape[0],
        *strides, BLOCK_N=64, BLOCK_R=block, BLOCK_C=triton.next_power_of_2(columns), num_warps=4)


@torch.library.custom_op("orbit::lora_concat_shrink_", mutates_args=("x_ext",))
def lora_concat_shrink_(x_ext: torch.Tensor, x: torch.Tensor, as_: list[torch.Tensor],
                        row_slot: torch.Tensor | None) -> None:
    """``x_ext [rows, in + width] = [x | t]`` (the module docstring's layout)."""
    if serves("lora_concat_shrink_", True, x, lambda: _kernel_reason(x_ext, x)):
        launch_shrink(x_ext, x, as_, row_slot)
    else:
        shrink_reference(x_ext, x, as_, row_slot)


@lora_concat_shrink_.register_fake
def _(x_ext, x, as_, row_slot):
    return None


@torch.library.custom_op("orbit::lora_concat_fill_", mutates_args=("w_ext",))
def lora_concat_fill_(w_ext: torch.Tensor, in_features: int, bs: list[torch.Tensor], scaling: float) -> None:
    """``w_ext[:, in_features:]``: each linear's ``scaling * B`` per slot (the module docstring's layout)."""
    if serves("lora_concat_fill_", True, w_ext, lambda: None if w_ext.stride(-1) == 1 else "w_ext is strided"):
        launch_fill(w_ext, in_features, bs, scaling)
    else:
        fill_reference(w_ext, in_features, bs, scaling)


@lora_concat_fill_.register_fake
def _(w_ext, in_features, bs, scaling):
    return None
