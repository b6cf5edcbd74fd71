"""Grouped GEMM for MoE experts: rows ``offsets[g]:offsets[g+1]`` of ``a`` times ``b[g]``.

``a`` is ``[M, K]`` with its rows sorted by group, ``b`` is ``[G, K, N]`` (any strides, so a stack
of ``[N, K]`` expert weights is passed as its ``transpose(1, 2)`` view without a copy), and the
result is ``[M, N]``. One Triton kernel serves four ops, each a ``custom_op`` + ``register_fake``
dispatch point with its plain-torch reference beside it (the CPU path, the fallback for dtypes the
kernel does not serve, and what the GPU tests compare against):

* ``orbit::grouped_mm``: ``a @ b[g]``.
* ``orbit::grouped_swiglu_in``: ``silu(a @ gate[g]) * (a @ up[g])``. The gate and up GEMMs share
  their reads of ``a`` and the SwiGLU is their epilogue, so neither product is written out.
* ``orbit::grouped_swiglu_grads``: the same two GEMMs recomputed in backward, with the SwiGLU's
  derivative (given ``dh``) as the epilogue.
* ``orbit::grouped_mm_sum``: ``a @ b[g] + a2 @ b2[g]`` in one accumulator (the input gradient
  through gate and up).

Each program owns ``BLOCK_M`` rows of one group (it finds the group from ``offsets``), so no tile
straddles two experts and an expert with 3 rows costs one small tile, not a padded block of the
largest expert. ``BLOCK_M`` follows the mean rows per group (decode: a few; training: hundreds).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels._triton import note_fallback, tl, triton

ENABLED = True
"""Set False to force the reference (benchmarks compare the two in one process)."""


def grouped_mm_reference(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    out = a.new_empty((a.shape[0], b.shape[-1]))
    for g in range(len(offsets) - 1):
        lo, hi = offsets[g], offsets[g + 1]
        if hi > lo:
            out[lo:hi] = a[lo:hi] @ b[g]
    return out


def device_offsets(offsets: list[int], device: torch.device) -> torch.Tensor:
    """int32 offsets on ``device`` through pinned memory: a copy from pageable memory would make the
    host wait for the GPU on every call, and launches would no longer run ahead of the kernels."""
    return torch.tensor(offsets, dtype=torch.int32).pin_memory().to(device, non_blocking=True)


def _block_m(rows: int, groups: int) -> int:
    mean = rows / max(groups, 1)
    for block in (16, 32, 64):
        if mean <= block:
            return block
    return 128


if triton is not None:

    _CONFIGS = [
        triton.Config({"BLOCK_N": 64, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=4, num_stages=4),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 256, "BLOCK_K": 64}, num_warps=8, num_stages=3),
        triton.Config({"BLOCK_N": 128, "BLOCK_K": 128}, num_warps=8, num_stages=3),
    ]

    @triton.jit
    def _dot_k(acc, a_ptr, b_ptr, offs_m, offs_n, m_mask, n_mask, K, stride_a, stride_bk, stride_bn,
               BLOCK_K: tl.constexpr):
        offs_k = tl.arange(0, BLOCK_K)
        a_ptrs = a_ptr + offs_m[:, None].to(tl.int64) * stride_a + offs_k[None, :]
        b_ptrs = b_ptr + offs_k[:, None] * stride_bk + offs_n[None, :] * stride_bn
        for k0 in range(0, K, BLOCK_K):
            k_mask = offs_k < K - k0
            a = tl.load(a_ptrs, mask=m_mask[:, None] & k_mask[None, :], other=0.0)
            b = tl.load(b_ptrs, mask=k_mask[:, None] & n_mask[None, :], other=0.0)
            acc = tl.dot(a, b, acc)
            a_ptrs += BLOCK_K
            b_ptrs += BLOCK_K * stride_bk
        return acc

    @triton.autotune(configs=_CONFIGS, key=["N", "K", "BLOCK_M", "MODE"])
    @triton.jit
    def _grouped_kernel(a_ptr, b_ptr, a2_ptr, b2_ptr, e_ptr, c_ptr, c2_ptr, offsets_ptr, G, N, K,
                        stride_a, stride_bg, stride_bk, stride_bn, stride_c,
                        MODE: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        # MODE 0: C = A B. 1: C = silu(A B) * (A B2), the SwiGLU's input half. 2: with g = A B, u = A B2
        # and dh = E, C = d(gate) and C2 = d(up) of the SwiGLU. 3: C = A B + A2 B2.
        # Tiles never straddle two groups: program t finds its group by counting each group's tiles
        # (the grid has exactly as many tiles as the groups need).
        tile = tl.program_id(0)
        group = 0
        row0 = 0
        row_end = 0
        seen = 0
        for g in range(0, G):
            lo = tl.load(offsets_ptr + g)
            hi = tl.load(offsets_ptr + g + 1)
            count = tl.cdiv(hi - lo, BLOCK_M)
            if (tile >= seen) & (tile < seen + count):
                group = g
                row0 = lo + (tile - seen) * BLOCK_M
                row_end = hi
            seen += count
        offs_m = row0 + tl.arange(0, BLOCK_M)
        offs_n = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
        m_mask = offs_m < row_end
        n_mask = offs_n < N
        b_off = group.to(tl.int64) * stride_bg
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        acc = _dot_k(acc, a_ptr, b_ptr + b_off, offs_m, offs_n, m_mask, n_mask, K, stride_a, stride_bk, stride_bn,
                     BLOCK_K)
        if MODE == 3:
            acc = _dot_k(acc, a2_ptr, b2_ptr + b_off, offs_m, offs_n, m_mask, n_mask, K, stride_a, stride_bk,
                         stride_bn, BLOCK_K)
        if MODE == 1 or MODE == 2:
            acc2 = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
            acc2 = _dot_k(acc2, a_ptr, b2_ptr + b_off, offs_m, offs_n, m_mask, n_mask, K, stride_a, stride_bk,
                          stride_bn, BLOCK_K)
        # round g and u to the activation dtype first, as the unfused SwiGLU does
        out_rows = offs_m[:, None].to(tl.int64) * stride_c + offs_n[None, :]
        mask = m_mask[:, None] & n_mask[None, :]
        dtype = c_ptr.dtype.element_ty
        if MODE == 1:
            g = acc.to(dtype).to(tl.float32)
            u = acc2.to(dtype).to(tl.float32)
            acc = g * tl.sigmoid(g) * u
        if MODE == 2:
            g = acc.to(dtype).to(tl.float32)
            u = acc2.to(dtype).to(tl.float32)
            dh = tl.load(e_ptr + out_rows, mask=mask, other=0.0).to(tl.float32)
            sig = tl.sigmoid(g)
            acc = dh * u * sig * (1 + g * (1 - sig))
            tl.store(c2_ptr + out_rows, (dh * g * sig).to(dtype), mask=mask)
        tl.store(c_ptr + out_rows, acc.to(dtype), mask=mask)


def _kernel_reason(*tensors: torch.Tensor) -> str | None:
    """None when the kernel serves these tensors, else why not ("off" when no GPU kernel is wanted)."""
    if not (ENABLED and triton is not None and all(t.is_cuda for t in tensors)):
        return "off"
    if tensors[0].dtype not in (torch.bfloat16, torch.float16) or any(t.dtype != tensors[0].dtype for t in tensors):
        return "dtypes " + " x ".join(str(t.dtype) for t in tensors)
    return None


def _check(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> None:
    if len(offsets) != b.shape[0] + 1 or offsets[0] != 0 or offsets[-1] != a.shape[0]:
        raise ValueError(f"grouped_mm: offsets {offsets[:4]}... do not cover {a.shape[0]} rows in {b.shape[0]} groups")


def _served(op: str, *tensors: torch.Tensor) -> bool:
    reason = _kernel_reason(*tensors)
    if reason not in (None, "off"):
        note_fallback(op, reason)
    return reason is None


def _launch(mode: int, a: torch.Tensor, b: torch.Tensor, offsets: list[int], a2=None, b2=None, e=None, two=False):
    rows, n = a.shape[0], b.shape[-1]
    outs = [torch.empty((rows, n), dtype=a.dtype, device=a.device) for _ in range(2 if two else 1)]
    block_m = _block_m(rows, b.shape[0])
    tiles = sum(-(-(hi - lo) // block_m) for lo, hi in zip(offsets, offsets[1:]))
    if tiles == 0:
        return outs
    if b2 is not None and b2.stride() != b.stride():  # the kernel walks both with one set of strides
        b, b2 = b.contiguous(), b2.contiguous()
    a = a.contiguous()
    a2 = a if a2 is None else a2.contiguous()
    e = outs[0] if e is None else e.contiguous()
    offs = device_offsets(offsets, a.device)

    def grid(meta):
        return tiles, triton.cdiv(n, meta["BLOCK_N"])

    _grouped_kernel[grid](a, b, a2, b if b2 is None else b2, e, outs[0], outs[-1], offs, b.shape[0], n, b.shape[1],
                          a.stride(0), b.stride(0), b.stride(1), b.stride(2), outs[0].stride(0),
                          MODE=mode, BLOCK_M=block_m)
    return outs


@torch.library.custom_op("orbit::grouped_mm", mutates_args=())
def grouped_mm(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``[M, K]`` rows sorted by group, ``[G, K, N]`` -> ``[M, N]``; ``offsets`` has ``G + 1`` entries."""
    _check(a, b, offsets)
    if not _served("grouped_mm", a, b):
        return grouped_mm_reference(a, b, offsets)
    return _launch(0, a, b, offsets)[0]


@grouped_mm.register_fake
def _(a, b, offsets):
    return a.new_empty((a.shape[0], b.shape[-1]))


def grouped_swiglu_reference(a, gate, up, offsets):
    return F.silu(grouped_mm_reference(a, gate, offsets)) * grouped_mm_reference(a, up, offsets)


@torch.library.custom_op("orbit::grouped_swiglu_in", mutates_args=())
def grouped_swiglu_in(a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """``silu(a @ gate[g]) * (a @ up[g])`` per group: both GEMMs and the SwiGLU in one kernel."""
    _check(a, gate, offsets)
    if not _served("grouped_swiglu_in", a, gate, up):
        return grouped_swiglu_reference(a, gate, up, offsets)
    return _launch(1, a, gate, offsets, b2=up)[0]


@grouped_swiglu_in.register_fake
def _(a, gate, up, offsets):
    return a.new_empty((a.shape[0], gate.shape[-1]))


def grouped_swiglu_grads_reference(a, gate, up, dh, offsets):
    g, u = grouped_mm_reference(a, gate, offsets), grouped_mm_reference(a, up, offsets)
    sig = torch.sigmoid(g)
    return dh * u * sig * (1 + g * (1 - sig)), dh * g * sig


@torch.library.custom_op("orbit::grouped_swiglu_grads", mutates_args=())
def grouped_swiglu_grads(a: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, dh: torch.Tensor,
                         offsets: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
    """d(a @ gate) and d(a @ up) of ``h = silu(a @ gate) * (a @ up)`` given ``dh``: the two GEMMs are
    recomputed and the SwiGLU's derivative is their epilogue."""
    _check(a, gate, offsets)
    if not _served("grouped_swiglu_grads", a, gate, up, dh):
        return grouped_swiglu_grads_reference(a, gate, up, dh, offsets)
    dg, du = _launch(2, a, gate, offsets, b2=up, e=dh, two=True)
    return dg, du


@grouped_swiglu_grads.register_fake
def _(a, gate, up, dh, offsets):
    return a.new_empty((a.shape[0], gate.shape[-1])), a.new_empty((a.shape[0], gate.shape[-1]))


@torch.library.custom_op("orbit::grouped_mm_sum", mutates_args=())
def grouped_mm_sum(a: torch.Tensor, b: torch.Tensor, a2: torch.Tensor, b2: torch.Tensor,
                   offsets: list[int]) -> torch.Tensor:
    """``a @ b[g] + a2 @ b2[g]`` per group, one accumulator (the expert MLP's input gradient)."""
    _check(a, b, offsets)
    if not _served("grouped_mm_sum", a, b, a2, b2):
        return grouped_mm_reference(a, b, offsets) + grouped_mm_reference(a2, b2, offsets)
    return _launch(3, a, b, offsets, a2=a2, b2=b2)[0]


@grouped_mm_sum.register_fake
def _(a, b, a2, b2, offsets):
    return a.new_empty((a.shape[0], b.shape[-1]))
