"""The SwiGLU product and the LoRA shrink of the down projection that reads it, in one kernel for
the decode step, beside its plain-torch reference.

At a few rows a layer's MLP runs ``silu_mul`` and then the down projection's shrink
``t = silu(gate) * up @ A[s]^T``: two launches in the step's chain of dependent kernels.
``orbit::silu_mul_shrink`` gives every (row, rank index) a program that forms the row's product
itself, a K step at a time, and takes its dot with one row of A; the programs of rank index 0 also
store the product, which the packed GEMV then reads. The product rounds as ``silu_mul``'s kernel
rounds it and ``t`` sums in fp32 as the shrink does. The engine hands ``t`` to the down
projection's shrink through ``lora.offer_shrink``.
"""

from __future__ import annotations

import torch

from orbit_kernels import _triton, lora, silu_mul
from orbit_kernels._triton import pdl_args, serves, tl, triton

ENABLED = True
"""Set False to run ``silu_mul`` and the shrink apart (benchmarks compare)."""
MAX_ROWS = 4
"""Rows a call may have: the rows the packed GEMV serves, where the saved launch is a large part
of the step (measured there only)."""
BLOCK_K = 2048
"""Columns a K step (a narrower row is one step)."""
ONE_STEP = True
"""Rows up to ``ONE_STEP_MAX`` columns in one K step of 8 warps, so that each program issues all its
loads at once (a step's loads wait on the one before); False: ``BLOCK_K`` columns a step, 4 warps."""
ONE_STEP_MAX = 8192


def silu_mul_shrink_reference(gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor,
                              row_slot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    y = silu_mul.silu_mul_reference(gate, up)
    return y, lora.shrink_reference(y.reshape(-1, y.shape[-1]), [a], row_slot)


if triton is not None:

    @triton.jit
    def _silu_mul_shrink_kernel(g_ptr, u_ptr, y_ptr, a_ptr, slot_ptr, t_ptr, cols, stride_g, stride_u, stride_as,
                                stride_ar, stride_tm, HAS_SLOTS: tl.constexpr, BLOCK_K: tl.constexpr,
                                EARLY: tl.constexpr = False, PDL: tl.constexpr = False):
        row, r = tl.program_id(0), tl.program_id(1)
        # gate and up come after the wait
        a_row, a_first = lora.a_row_first(a_ptr, slot_ptr, row, r, cols, stride_as, stride_ar, HAS_SLOTS, BLOCK_K,
                                          EARLY, PDL)
        acc = tl.zeros((BLOCK_K,), dtype=tl.float32)
        for k0 in range(0, cols, BLOCK_K):
            offs = k0 + tl.arange(0, BLOCK_K)
            mask = offs < cols
            g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
            u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
            silu = (g / (1.0 + tl.exp(-g))).to(y_ptr.dtype.element_ty).to(tl.float32)
            y = (silu * u).to(y_ptr.dtype.element_ty)
            if r == 0:
                tl.store(y_ptr + row * cols + offs, y, mask=mask)
            a = a_first
            if k0 > 0:
                a = tl.load(a_row + offs, mask=mask, other=0.0)
            acc += y.to(tl.float32) * a.to(tl.float32)
        tl.store(t_ptr + row * stride_tm + r, tl.sum(acc, axis=0))


def unserved_reason(gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    why = silu_mul.unserved_reason(gate, up)
    if why is not None:
        return why
    cols = gate.shape[-1]
    if gate.numel() // cols > MAX_ROWS:
        return f"{gate.numel() // cols} rows over {MAX_ROWS}"
    if gate.dtype == torch.float32:
        return "fp32 activations"
    if a.dim() != 3 or a.shape[2] != cols or a.shape[1] > lora.MAX_RANK or a.stride(-1) != 1:
        return f"A {tuple(a.shape)} for rows of {cols}"
    return None


@torch.library.custom_op("orbit::silu_mul_shrink", mutates_args=())
def silu_mul_shrink(gate: torch.Tensor, up: torch.Tensor, a: torch.Tensor,
                    row_slot: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    """``(y, t)``: ``y = silu(gate) * up`` and fp32 ``t [rows, r] = y @ a[s]^T`` for each row's
    slot ``s`` (inference only)."""
    if not serves("silu_mul_shrink", ENABLED and silu_mul.ENABLED, gate, lambda: unserved_reason(gate, up, a)):
        return silu_mul_shrink_reference(gate, up, a, row_slot)
    return launch(gate, up, a, row_slot)


@silu_mul_shrink.register_fake
def _(gate, up, a, row_slot):
    rows = gate.numel() // gate.shape[-1]
    return (torch.empty_like(gate, memory_format=torch.contiguous_format),
            gate.new_empty((rows, a.shape[1]), dtype=torch.float32))


def launch(gate, up, a, row_slot):
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    cols = gate.shape[-1]
    g, u = gate.reshape(-1, cols), up.reshape(-1, cols)  # views: rows may sit at any stride
    rows, r = g.shape[0], a.shape[1]
    y = torch.empty(gate.shape, dtype=gate.dtype, device=gate.device)
    t = torch.empty((rows, r), dtype=torch.float32, device=gate.device)
    block = triton.next_power_of_2(cols)
    block = block if ONE_STEP and block <= ONE_STEP_MAX else min(block, BLOCK_K)
    _silu_mul_shrink_kernel[(rows, r)](
        g, u, y, a, row_slot if row_slot is not None else t, t, cols, g.stride(0), u.stride(0), a.stride(0),
        a.stride(1), t.stride(0), HAS_SLOTS=row_slot is not None, BLOCK_K=block, num_warps=8 if block > 4096 else 4,
        EARLY=_triton.EARLY_READS, **pdl_args(gate))
    return y, t
