"""Rotary embedding as one Triton kernel for inference, beside its plain-torch reference.

The reference (``apply_rope_reference``, also the CPU path and the training path) is seven kernels
per call: two casts of the tables, a negation, a concatenation, two products and a sum. A decode
step calls it twice per layer. ``orbit::rope`` does it in one pass, rounding each product and the
sum to the activation dtype as the reference's ops do. Under the Triton interpreter the two agree
bit for bit; on an H200 some bf16 elements differ by one rounding step (GPU test).
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import serves, tl, triton

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


if triton is not None:

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, heads, seq, sxb, sxh, sxs, scb, scs, sob, soh, sos,
                     HALF: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        s = pid % seq
        h = (pid // seq) % heads
        b = pid // (seq * heads)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        dtype = out_ptr.dtype.element_ty
        x_row = x_ptr + b * sxb + h * sxh + s * sxs
        x1 = tl.load(x_row + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        c_row, s_row = cos_ptr + b * scb + s * scs, sin_ptr + b * scb + s * scs
        c1 = tl.load(c_row + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        c2 = tl.load(c_row + HALF + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s1 = tl.load(s_row + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s2 = tl.load(s_row + HALF + offs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        # round each product and the sum as the reference's separate ops in the activation dtype do
        out1 = (x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)
        out2 = (x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)
        o_row = out_ptr + b * sob + h * soh + s * sos
        tl.store(o_row + offs, out1.to(dtype), mask=mask)
        tl.store(o_row + HALF + offs, out2.to(dtype), mask=mask)


def unserved_reason(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if x.dim() != 4 or cos.dim() != 3 or cos.shape[0] != x.shape[0] or cos.shape[1] != x.shape[2]:
        return f"x {tuple(x.shape)} with tables {tuple(cos.shape)} is not [batch, heads, seq, dim] / [batch, seq, dim]"
    if x.shape[-1] % 2:
        return f"odd head_dim {x.shape[-1]}"
    if x.stride(-1) != 1 or cos.stride(-1) != 1 or cos.stride() != sin.stride():
        return "head_dim is not contiguous, or cos and sin are laid out differently"
    return None


def _served(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> bool:
    return serves("rope", ENABLED, x, lambda: unserved_reason(x, cos, sin))


def launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    batch, heads, seq, dim = x.shape
    out = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device).transpose(1, 2)
    half = dim // 2
    _rope_kernel[(batch * heads * seq,)](x, cos, sin, out, heads, seq, x.stride(0), x.stride(1), x.stride(2),
                                         cos.stride(0), cos.stride(1), out.stride(0), out.stride(1), out.stride(2),
                                         HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1)
    return out


@torch.library.custom_op("orbit::rope", mutates_args=())
def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """``x * cos + rotate_half(x) * sin`` (no autograd: inference only)."""
    if _served(x, cos, sin):
        return launch(x, cos, sin)
    return apply_rope_reference(x, cos, sin)


@rope.register_fake
def _(x, cos, sin):
    return torch.empty_like(x)
