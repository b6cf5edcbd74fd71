"""The SwiGLU product ``silu(gate) * up`` as one Triton kernel for inference, beside its reference.

The reference (``F.silu(gate) * up``, also the CPU path and the path whenever autograd needs a
graph) is two elementwise kernels and a ``[rows, intermediate]`` intermediate; in a graphed decode
step that is one launch per layer more than needed. ``orbit::silu_mul`` reads gate and up where
they lie: two tensors, or two column slices of one fused gate/up output (``models.projections``),
so rows may sit at any stride. It computes silu in fp32, rounds it to the input dtype, then
multiplies and rounds again, as the reference does; the two differ only where the fp32
exponentials differ in the last bits.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to force the reference (benchmarks compare the two in one process)."""
BLOCK = 1024


def silu_mul_reference(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


if triton is not None:

    @triton.jit
    def _silu_mul_kernel(g_ptr, u_ptr, y_ptr, cols, stride_g, stride_u, stride_y, BLOCK: tl.constexpr,
                         PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row, block = tl.program_id(0), tl.program_id(1)
        offs = block * BLOCK + tl.arange(0, BLOCK)
        mask = offs < cols
        dtype = g_ptr.dtype.element_ty
        g = tl.load(g_ptr + row * stride_g + offs, mask=mask, other=0.0).to(tl.float32)
        u = tl.load(u_ptr + row * stride_u + offs, mask=mask, other=0.0).to(tl.float32)
        silu = (g / (1.0 + tl.exp(-g))).to(dtype).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (silu * u).to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """``t`` as [rows, cols] without a copy, or None."""
    if t.stride(-1) != 1:
        return None
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return None


def unserved_reason(gate: torch.Tensor, up: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if gate.shape != up.shape or gate.dtype != up.dtype or gate.device != up.device:
        return f"gate {tuple(gate.shape)} {gate.dtype} and up {tuple(up.shape)} {up.dtype} differ"
    if gate.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations are {gate.dtype}"
    if _rows(gate) is None or _rows(up) is None:
        return "gate or up is not rows of contiguous features"
    return None


def launch(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    g, u = _rows(gate), _rows(up)
    out = torch.empty(g.shape, dtype=gate.dtype, device=gate.device)
    if g.numel():
        _silu_mul_kernel[(g.shape[0], triton.cdiv(g.shape[1], BLOCK))](
            g, u, out, g.shape[1], g.stride(0), u.stride(0), out.stride(0), BLOCK=BLOCK, num_warps=4, **pdl_args(out))
    return out.view(gate.shape)


@torch.library.custom_op("orbit::silu_mul", mutates_args=())
def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``silu(gate) * up`` (no autograd: inference only)."""
    if serves("silu_mul", ENABLED, gate, lambda: unserved_reason(gate, up)):
        return launch(gate, up)
    return silu_mul_reference(gate, up)


@silu_mul.register_fake
def _(gate, up):
    return torch.empty_like(gate, memory_format=torch.contiguous_format)
