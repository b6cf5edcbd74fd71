"""RMSNorm as one Triton kernel for inference, beside its plain-torch reference.

The reference (``rms_norm_reference``, also the CPU path and the path whenever autograd needs a
graph) launches seven elementwise and reduction kernels; a decode step runs four norms per layer,
so in a graphed step the norms alone were about a fifth of all launches. ``orbit::rms_norm`` is one
dispatch point (``torch.library.custom_op`` + ``register_fake``). It normalizes in fp32, rounds to
the input dtype, then multiplies by the weight and rounds to the promoted dtype, as the reference
does, so the two differ only in the order of the fp32 sum of squares. ``orbit::add_rms_norm`` also
takes the residual add before the norm (``h = x + delta``, then the norm of ``h``): the engine's
forward joins each sublayer's residual add to the norm that follows it, one launch instead of two.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""
ADD_FUSED = True
"""Set False to run ``add_rms_norm`` as an add and then the norm kernel (benchmarks compare)."""
MULTI_ROW = True
"""Set False for one row a program at any row count, as before (benchmarks compare)."""


def rms_norm_reference(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


if triton is not None:

    @triton.jit
    def _rms_norm_kernel(x_ptr, d_ptr, h_ptr, w_ptr, y_ptr, n_rows, cols, inner, stride_outer, stride_inner, stride_y,
                         eps, RESIDUAL: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr,
                         PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        # input row r sits at (r // inner) * stride_outer + (r % inner) * stride_inner: the heads of
        # a column slice (q or k of a fused q/k/v output) are read in place. ROWS rows a program:
        # a prefill's q/k norms have hundreds of thousands of rows of a head's width
        rows = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        offs = tl.arange(0, BLOCK)
        mask = (rows < n_rows)[:, None] & (offs < cols)[None, :]
        x_rows = x_ptr + (rows // inner) * stride_outer + (rows % inner) * stride_inner
        x = tl.load(x_rows[:, None] + offs[None, :], mask=mask, other=0.0).to(tl.float32)
        y_offs = rows[:, None] * stride_y + offs[None, :]
        if RESIDUAL:  # h = x + d (rows laid out as y's), rounded as the unfused add rounds: the new residual
            d = tl.load(d_ptr + y_offs, mask=mask, other=0.0).to(tl.float32)
            h = (x + d).to(h_ptr.dtype.element_ty)
            tl.store(h_ptr + y_offs, h, mask=mask)
            x = h.to(tl.float32)
        scale = tl.rsqrt(tl.sum(x * x, axis=1) / cols + eps)
        normed = (x * scale[:, None]).to(x_ptr.dtype.element_ty).to(tl.float32)
        w = tl.load(w_ptr + offs, mask=offs < cols, other=0.0).to(tl.float32)
        tl.store(y_ptr + y_offs, (w[None, :] * normed).to(y_ptr.dtype.element_ty), mask=mask)


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
    return launch(x, weight, eps)


@rms_norm.register_fake
def _(x, weight, eps):
    return x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def launch(x: torch.Tensor, weight: torch.Tensor, eps: float, rows_per_program: int | None = None) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    cols = x.shape[-1]
    rows = x.numel() // cols
    src, inner, stride_outer, stride_inner = row_layout(x)
    out = torch.empty((rows, cols), dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if rows:
        block = _block(rows, cols, rows_per_program)
        _rms_norm_kernel[(triton.cdiv(rows, block["ROWS"]),)](
            src, src, src, weight, out, rows, cols, inner, stride_outer, stride_inner, out.stride(0), eps,
            RESIDUAL=False, **block, **pdl_args(out))
    return out.view(*x.shape[:-1], cols)


def _block(rows: int, cols: int, rows_per_program: int | None = None) -> dict:
    """The whole row in one block; rows shorter than 2,048 share a program, up to 2,048 values a
    program, once there are enough rows to give each SM several programs anyway."""
    block = triton.next_power_of_2(cols)
    if rows_per_program is None:
        rows_per_program = 1
        while MULTI_ROW and rows_per_program * block < 2048 and rows >= 2048 * rows_per_program:
            rows_per_program *= 2
    return dict(BLOCK=block, ROWS=rows_per_program, num_warps=4 if rows_per_program * block <= 4096 else 8)


def launch_add(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor, eps: float,
               rows_per_program: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """``add_rms_norm``'s kernel (no dispatch checks)."""
    cols = x.shape[-1]
    flat_x, flat_d = x.reshape(-1, cols).contiguous(), delta.reshape(-1, cols).contiguous()
    h = torch.empty_like(flat_x)
    out = torch.empty(flat_x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    rows = flat_x.shape[0]
    if rows:
        block = _block(rows, cols, rows_per_program)
        _rms_norm_kernel[(triton.cdiv(rows, block["ROWS"]),)](flat_x, flat_d, h, weight, out, rows, cols, 1, cols, 0,
                                                             cols, eps, RESIDUAL=True, **block, **pdl_args(out))
    return h.view(x.shape), out.view(x.shape)


def add_rms_norm_reference(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    h = x + delta
    return h, rms_norm_reference(h, weight, eps)


@torch.library.custom_op("orbit::add_rms_norm", mutates_args=())
def add_rms_norm(x: torch.Tensor, delta: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``(h, rms_norm(h))`` with ``h = x + delta``: a residual add and the norm after it in one
    kernel (no autograd: inference only). Both outputs round as the unfused ops do."""
    if not _served(x, weight) or delta.shape != x.shape or delta.dtype != x.dtype:
        return add_rms_norm_reference(x, delta, weight, eps)
    if not ADD_FUSED:
        h = x + delta
        return h, launch(h, weight, eps)
    return launch_add(x, delta, weight, eps)


@add_rms_norm.register_fake
def _(x, delta, weight, eps):
    return torch.empty_like(x), x.new_empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype))


def row_layout(x: torch.Tensor) -> tuple[torch.Tensor, int, int, int]:
    """(tensor, inner rows, outer stride, inner stride) that reach every row of ``x``: rows laid
    at one stride, or ``[..., heads, cols]`` whose leading dimensions merge (a column slice of a
    wider output), or else a contiguous copy."""
    cols = x.shape[-1]
    if x.stride(-1) == 1:
        for shape in [(-1, cols)] + ([(-1, x.shape[-2], cols)] if x.dim() >= 3 else []):
            try:  # a view exists exactly when the dimensions merge
                grid = x.view(shape)
            except RuntimeError:
                continue
            if grid.dim() == 2:
                return grid, 1, grid.stride(0), 0
            return grid, grid.shape[1], grid.stride(0), grid.stride(1)
    flat = x.reshape(-1, cols).contiguous()
    return flat, 1, flat.stride(0), 0

