"""The residual add, the RMSNorm after it and the LoRA shrink of the linears that read the norm, in
one kernel for the decode step, beside its plain-torch reference.

A decode layer runs ``add_rms_norm`` and then, for q/k/v and again for gate/up, a shrink kernel
``t = normed @ A[s]^T`` before the packed GEMV: two launches of a few microseconds each in a chain
of dependent kernels. ``orbit::add_rms_norm_shrink`` gives every (row, rank index, group) a program
that computes the row's add and norm itself (a few KB from L2) and its dot with one row of A; the
first program of each row also stores ``h`` and the normed row. The add and the norm round as
``add_rms_norm``'s kernel does, over the same ``[1, BLOCK]`` tile, and ``t`` sums in fp32 as the
shrink does. The engine hands ``t`` to the linears' shrink through ``lora.offer_shrink``.

``orbit::embed_rms_norm_shrink`` is the same kernel at a step's start: each row's input is its
token's row of the embedding table (no add), normed and shrunk for layer 0's q/k/v, in place of an
embedding lookup, a norm and a shrink kernel.
"""

from __future__ import annotations

import torch

from orbit_kernels import _triton, lora, lora_groups, rmsnorm
from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton
from orbit_kernels.lora_groups import pick

ENABLED = True
"""Set False to run ``add_rms_norm`` and the shrink apart (benchmarks compare)."""
MAX_ROWS = 4
"""Rows a call may have: a program per (row, rank index, group) redoes the row's norm, which pays
where a step has a row or a few (the packed GEMV's rows)."""
EARLY_GAMMA = True
"""Read the norm weight with A, before the PDL wait under ``EARLY_READS`` (it is frozen), not after
the row's sum of squares. H100, int4 + LoRA r16, one process
(``decode_throughput_early_tables_gamma_h100.jsonl``): 2,174 and 2,178 tok/s against 2,151 with it
off at batch 4; within noise at 1 (776.0 and 779.8 against 780.4). False: after it (benchmarks
compare)."""
EMBED = True
"""A decode step's embedding lookup, layer 0's input norm and its q/k/v shrink in one kernel
(``embed_rms_norm_shrink``). False: three kernels (benchmarks compare)."""


def add_rms_norm_shrink_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                                  as_: list[torch.Tensor], row_slot: torch.Tensor | None):
    h, normed = rmsnorm.add_rms_norm_reference(x, delta, weight, eps)
    return h, normed, lora.shrink_reference(normed.reshape(-1, normed.shape[-1]), as_, row_slot)


def embed_rms_norm_shrink_reference(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float,
                                    as_: list[torch.Tensor], row_slot: torch.Tensor | None):
    x = torch.nn.functional.embedding(ids, table)
    normed = rmsnorm.rms_norm_reference(x, weight, eps)
    return x, normed, lora.shrink_reference(normed.reshape(-1, normed.shape[-1]), as_, row_slot)


if triton is not None:

    @triton.jit
    def _add_norm_shrink_kernel(x_ptr, d_ptr, h_ptr, w_ptr, y_ptr, a_ptr, slot_ptr, t_ptr, cols, R, stride_as,
                                stride_ar, stride_tm, a_off1, a_off2, eps, HAS_SLOTS: tl.constexpr,
                                BLOCK: tl.constexpr, EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
                                EARLY_W: tl.constexpr = False, GATHER: tl.constexpr = False):
        """``GATHER``: ``x_ptr`` is an embedding table and ``d_ptr`` the rows' token ids; a row's ``h``
        is its token's row (no add)."""
        row, r, g = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        early: tl.constexpr = EARLY and not HAS_SLOTS  # a row's slot is not a frozen weight: it waits
        if not early:
            pdl_enter(PDL)
        slot = tl.load(slot_ptr + row) if HAS_SLOTS else 0
        offs = tl.arange(0, BLOCK)
        a = tl.load(a_ptr + pick(g, 0, a_off1, a_off2) + slot * stride_as + r * stride_ar + offs, mask=offs < cols,
                    other=0.0)
        if EARLY_W:  # the norm weight is frozen too (``EARLY_GAMMA``): read with A
            w = tl.load(w_ptr + offs, mask=offs < cols, other=0.0).to(tl.float32)
        if early:  # A's row was read before the wait (``EARLY_READS``); x and the outputs come after it
            pdl_enter(PDL)
        # the norm as ``rmsnorm._rms_norm_kernel`` computes it for one row: a [1, BLOCK] tile
        cells = tl.arange(0, 1)[:, None] * 0 + offs[None, :]
        mask = cells < cols
        if GATHER:
            token = tl.load(d_ptr + row)
            h = tl.load(x_ptr + token * cols + cells, mask=mask, other=0.0).to(h_ptr.dtype.element_ty)
        else:
            x = tl.load(x_ptr + row * cols + cells, mask=mask, other=0.0).to(tl.float32)
            d = tl.load(d_ptr + row * cols + cells, mask=mask, other=0.0).to(tl.float32)
            h = (x + d).to(h_ptr.dtype.element_ty)
        hf = h.to(tl.float32)
        scale = tl.rsqrt(tl.sum(hf * hf, axis=1) / cols + eps)
        normed = (hf * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        if not EARLY_W:
            w = tl.load(w_ptr + offs, mask=offs < cols, other=0.0).to(tl.float32)
        y = (w[None, :] * normed).to(y_ptr.dtype.element_ty)
        if r == 0 and g == 0:  # one program of the row writes the new residual and the normed row
            tl.store(h_ptr + row * cols + cells, h, mask=mask)
            tl.store(y_ptr + row * cols + cells, y, mask=mask)
        t = tl.sum(y.to(tl.float32) * a.to(tl.float32)[None, :], axis=1)
        tl.store(t_ptr + row * stride_tm + g * R + r + tl.arange(0, 1), t)


def unserved_reason(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                    as_: list[torch.Tensor]) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if delta.shape != x.shape or delta.dtype != x.dtype or not x.is_contiguous() or not delta.is_contiguous():
        return "x and delta differ in shape or dtype, or are not contiguous"
    return _unserved_rows(x.numel() // x.shape[-1], x.shape[-1], x.dtype, weight, as_)


def unserved_embed_reason(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor,
                          as_: list[torch.Tensor]) -> str | None:
    """Why ``embed_rms_norm_shrink``'s kernel cannot take this call (None: it can)."""
    if ids.dtype != torch.long or not ids.is_contiguous() or table.dim() != 2 or not table.is_contiguous():
        return "token ids that are not contiguous int64, or an embedding table that is not a contiguous matrix"
    return _unserved_rows(ids.numel(), table.shape[1], table.dtype, weight, as_)


def _unserved_rows(rows: int, cols: int, dtype: torch.dtype, weight: torch.Tensor,
                   as_: list[torch.Tensor]) -> str | None:
    if rows > MAX_ROWS:
        return f"{rows} rows over {MAX_ROWS}"
    if dtype not in (torch.bfloat16, torch.float16) or weight.dtype != dtype:
        return f"activations {dtype} with a {weight.dtype} norm weight"
    if cols > 16384 or weight.numel() != cols:
        return f"rows of {cols} with a norm weight of {weight.numel()}"
    if not 1 <= len(as_) <= lora_groups.MAX_GROUPS or any(
            a.dim() != 3 or a.shape[1:] != as_[0].shape[1:] or a.dtype != as_[0].dtype or a.stride(-1) != 1
            or a.stride() != as_[0].stride() for a in as_):
        return "the groups' A differ in shape, dtype or layout"
    if as_[0].shape[2] != cols or as_[0].shape[1] > lora.MAX_RANK:
        return f"A {tuple(as_[0].shape)} for rows of {cols}"
    return None


@torch.library.custom_op("orbit::add_rms_norm_shrink", mutates_args=())
def add_rms_norm_shrink(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
                        as_: list[torch.Tensor], row_slot: torch.Tensor | None
                        ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(h, rms_norm(h), t)`` with ``h = x + delta`` and fp32 ``t [rows, groups * r]`` =
    ``rms_norm(h) @ as_[g][s]^T`` for each group ``g`` and row slot ``s`` (inference only)."""
    if not serves("add_rms_norm_shrink", ENABLED and rmsnorm.ENABLED, x,
                  lambda: unserved_reason(x, delta, weight, as_)):
        return add_rms_norm_shrink_reference(x, delta, weight, eps, as_, row_slot)
    return launch(x, delta, weight, eps, as_, row_slot)


@add_rms_norm_shrink.register_fake
def _(x, delta, weight, eps, as_, row_slot):
    rows = x.numel() // x.shape[-1]
    return (torch.empty_like(x), torch.empty_like(x),
            x.new_empty((rows, len(as_) * as_[0].shape[1]), dtype=torch.float32))


def launch(x, delta, weight, eps, as_, row_slot):
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    return _launch(x, delta, x.shape, weight, eps, as_, row_slot, gather=False)


def launch_embed(ids, table, weight, eps, as_, row_slot):
    """``embed_rms_norm_shrink``'s kernel (no dispatch checks)."""
    return _launch(table, ids, (*ids.shape, table.shape[1]), weight, eps, as_, row_slot, gather=True)


def _launch(x, d, shape, weight, eps, as_, row_slot, gather: bool):
    """``shape``: the outputs' (the rows' shape and the columns); ``x`` is the table when ``gather``."""
    h, y = (torch.empty(shape, dtype=x.dtype, device=x.device) for _ in range(2))
    cols = shape[-1]
    rows, groups, r = h.numel() // cols, len(as_), as_[0].shape[1]
    t = torch.empty((rows, groups * r), dtype=torch.float32, device=x.device)
    a = as_[0]
    block = triton.next_power_of_2(cols)
    _add_norm_shrink_kernel[(rows, r, groups)](
        x, d, h, weight, y, a, row_slot if row_slot is not None else t, t, cols, r, a.stride(0), a.stride(1),
        t.stride(0), *lora_groups.offsets(as_), eps, HAS_SLOTS=row_slot is not None, BLOCK=block,
        num_warps=4 if block <= 4096 else 8, EARLY=_triton.EARLY_READS, EARLY_W=EARLY_GAMMA, GATHER=gather,
        **pdl_args(y))
    return h, y, t


@torch.library.custom_op("orbit::embed_rms_norm_shrink", mutates_args=())
def embed_rms_norm_shrink(ids: torch.Tensor, table: torch.Tensor, weight: torch.Tensor, eps: float,
                          as_: list[torch.Tensor], row_slot: torch.Tensor | None
                          ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(x, rms_norm(x), t)`` with ``x = table[ids]`` and ``t`` as ``add_rms_norm_shrink``'s (inference only)."""
    if not serves("embed_rms_norm_shrink", ENABLED and EMBED and rmsnorm.ENABLED, ids,
                  lambda: unserved_embed_reason(ids, table, weight, as_)):
        return embed_rms_norm_shrink_reference(ids, table, weight, eps, as_, row_slot)
    return launch_embed(ids, table, weight, eps, as_, row_slot)


@embed_rms_norm_shrink.register_fake
def _(ids, table, weight, eps, as_, row_slot):
    shape = (*ids.shape, table.shape[1])
    return (table.new_empty(shape), table.new_empty(shape),
            table.new_empty((ids.numel(), len(as_) * as_[0].shape[1]), dtype=torch.float32))
