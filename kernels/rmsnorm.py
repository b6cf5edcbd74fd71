"""RMSNorm as one Triton kernel for inference, beside its plain-torch reference.

The reference (``rms_norm_reference``, also the CPU path and the path whenever autograd needs a
graph) launches seven elementwise and reduction kernels; a decode step runs four norms per layer,
so in a graphed step the norms alone were about a fifth of all launches. ``orbit::rms_norm`` is one
dispatch point (``torch.library.custom_op`` + ``register_fake``). It normalizes in fp32, rounds to
the input dtype, then multiplies by the weight and rounds to the promoted dtype, as the reference
does, so the two differ only in the order of the fp32 sum of squares.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import serves, tl, triton

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, w_ptr, y_ptr, cols, stride_x, stride_y, eps, BLOCK: tl.constexpr):
        row = tl.program_id(0)
        offs = tl.arange(0, BLOCK)
        mask = offs < cols
        x = tl.load(x_ptr + row * stride_x + offs, mask=mask, other=0.0).to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=0) / cols + eps)
        normed = (x * scale).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        tl.store(y_ptr + row * stride_y + offs, (w * normed).to(y_ptr.dtype.element_ty), mask=mask)


def unserved_reason(x: torch.Tensor, weight: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if x.shape[-1] != weight.numel():
        return f"weight of {weight.numel()} for rows of {x.shape[-1]}"
    if x.shape[-1] > 16384:
        return f"rows of {x.shape[-1]} exceed one block of 16384"
    if x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations are {x.dtype}"
    return None


def _served(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return weight.is_cuda and serves("rms_norm", ENABLED, x, lambda: unserved_reason(x, weight))


@torch.library.custom_op("orbit::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """``weight * (x / rms(x))`` over the last dimension (no autograd: inference only)."""
    if not _served(x, weight):
        return rms_norm_reference(x, weight, eps)
    cols = x.shape[-1]
    flat = x.reshape(-1, cols)
    if flat.stride(-1) != 1:
        flat = flat.contiguous()
    out = torch.empty(flat.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if flat.shape[0]:
        _rms_norm_kernel[(flat.shape[0],)](flat, weight, out, cols, flat.stride(0), out.stride(0), eps,
                                           BLOCK=triton.next_power_of_2(cols), num_warps=4 if cols <= 4096 else 8)
    return out.view(*x.shape[:-1], cols)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
