"""Rotary embedding as one Triton kernel for inference, beside its plain-torch reference.

The reference (``apply_rope_reference``, also the CPU path and the training path) is seven kernels
per call: two casts of the tables, a negation, a concatenation, two products and a sum. A decode
step calls it twice per layer. ``orbit::rope`` does it in one pass, rounding each product and the
sum to the activation dtype as the reference's ops do. Under the Triton interpreter the two agree
bit for bit; on an H200 some bf16 elements differ by one rounding step (GPU test).

``orbit::rope_kv_write_`` is the decode step's key path in one kernel: it rotates each row's new
key and stores it, and the row's new value, straight into the KV cache at the row's position.
Unrolled, that is a rope kernel and two indexed writes per layer (each index_put several
microseconds even for one row).
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import serves, tl, triton

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""
KV_WRITE_ENABLED = True
"""Set False to run ``rope_kv_write_`` as its reference: a rope kernel and two indexed writes."""
MULTI_ROW = True
"""Set False for one row a program at any row count, as before (benchmarks compare)."""


def rows_at(cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Each decode row's ``[1, dim]`` rope rows, from the whole ``[positions, dim]`` tables (rows
    already gathered, ``[rows, 1, dim]``, pass through)."""
    if cos.dim() != 2:
        return cos, sin
    return cos[positions][:, None], sin[positions][:, None]


def apply_rope_reference(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: [batch, heads, seq, head_dim]; cos/sin: [batch, seq, head_dim]."""
    cos, sin = cos.unsqueeze(1).to(x.dtype), sin.unsqueeze(1).to(x.dtype)
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


if triton is not None:

    @triton.jit
    def rotate_halves(x1, x2, c_ptrs, s_ptrs, mask, like_ptr, HALF: tl.constexpr):
        """Rope of a head's two fp32 halves, with the tables' halves at ``c_ptrs`` / ``s_ptrs``:
        each product and the sum rounded to the dtype ``like_ptr`` points at, as the reference's
        separate ops in that dtype round them."""
        c1, c2, s1, s2 = table_halves(c_ptrs, s_ptrs, mask, like_ptr, HALF)
        return rotate_with(x1, x2, c1, c2, s1, s2, like_ptr)

    @triton.jit
    def table_halves(c_ptrs, s_ptrs, mask, like_ptr, HALF: tl.constexpr):
        """The cos and sin halves of a row, rounded to the activation dtype, as fp32."""
        dtype = like_ptr.dtype.element_ty
        c1 = tl.load(c_ptrs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        c2 = tl.load(c_ptrs + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s1 = tl.load(s_ptrs, mask=mask, other=0.0).to(dtype).to(tl.float32)
        s2 = tl.load(s_ptrs + HALF, mask=mask, other=0.0).to(dtype).to(tl.float32)
        return c1, c2, s1, s2

    @triton.jit
    def rotate_with(x1, x2, c1, c2, s1, s2, like_ptr):
        """``rotate_halves`` with the table halves already loaded."""
        dtype = like_ptr.dtype.element_ty
        out1 = ((x1 * c1).to(dtype).to(tl.float32) + (-x2 * s1).to(dtype).to(tl.float32)).to(dtype)
        out2 = ((x2 * c2).to(dtype).to(tl.float32) + (x1 * s2).to(dtype).to(tl.float32)).to(dtype)
        return out1, out2

    @triton.jit
    def _rope_kernel(x_ptr, cos_ptr, sin_ptr, out_ptr, n_rows, heads, seq, sxb, sxh, sxs, scb, scs, sob, soh, sos,
                     HALF: tl.constexpr, BLOCK: tl.constexpr, ROWS: tl.constexpr):
        # ROWS (batch, head, position) rows a program: a prefill has hundreds of thousands
        r = tl.program_id(0) * ROWS + tl.arange(0, ROWS)
        s = r % seq
        h = (r // seq) % heads
        b = r // (seq * heads)
        offs = tl.arange(0, BLOCK)
        mask = (r < n_rows)[:, None] & (offs < HALF)[None, :]
        x_row = (x_ptr + b * sxb + h * sxh + s * sxs)[:, None] + offs[None, :]
        x1 = tl.load(x_row, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_row + HALF, mask=mask, other=0.0).to(tl.float32)
        c_row = (cos_ptr + b * scb + s * scs)[:, None] + offs[None, :]
        s_row = (sin_ptr + b * scb + s * scs)[:, None] + offs[None, :]
        out1, out2 = rotate_halves(x1, x2, c_row, s_row, mask, out_ptr, HALF)
        o_row = (out_ptr + b * sob + h * soh + s * sos)[:, None] + offs[None, :]
        tl.store(o_row, out1, mask=mask)
        tl.store(o_row + HALF, out2, mask=mask)


if triton is not None:

    @triton.jit
    def _rope_kv_write_kernel(k_ptr, v_ptr, cos_ptr, sin_ptr, ck_ptr, cv_ptr, pos_ptr, heads,
                              skb, skh, svb, svh, scb, sc_b, sc_h, sc_p, sv_b, sv_h, sv_p,
                              HALF: tl.constexpr, BLOCK: tl.constexpr):
        pid = tl.program_id(0)
        h, b = pid % heads, pid // heads
        pos = tl.load(pos_ptr + b)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        k_row = k_ptr + b * skb + h * skh
        x1 = tl.load(k_row + offs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(k_row + HALF + offs, mask=mask, other=0.0).to(tl.float32)
        out1, out2 = rotate_halves(x1, x2, cos_ptr + b * scb + offs, sin_ptr + b * scb + offs, mask, k_ptr, HALF)
        ck_row = ck_ptr + b * sc_b + h * sc_h + pos * sc_p
        tl.store(ck_row + offs, out1.to(ck_ptr.dtype.element_ty), mask=mask)
        tl.store(ck_row + HALF + offs, out2.to(ck_ptr.dtype.element_ty), mask=mask)
        v_row = v_ptr + b * svb + h * svh
        cv_row = cv_ptr + b * sv_b + h * sv_h + pos * sv_p
        full = tl.arange(0, 2 * BLOCK)
        full_mask = full < 2 * HALF
        v = tl.load(v_row + full, mask=full_mask, other=0.0)
        tl.store(cv_row + full, v.to(cv_ptr.dtype.element_ty), mask=full_mask)


def rope_kv_write_reference(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                            cache_k: torch.Tensor, cache_v: torch.Tensor, write_pos: torch.Tensor) -> None:
    """k, v: [rows, kv_heads, 1, dim]; cos/sin: [rows, 1, dim]; cache_k/v: [rows, kv_heads, capacity, dim]."""
    rows = torch.arange(k.shape[0], device=k.device)
    cache_k[rows, :, write_pos] = apply_rope_reference(k, cos, sin)[:, :, 0].to(cache_k.dtype)
    cache_v[rows, :, write_pos] = v[:, :, 0].to(cache_v.dtype)


def kv_unserved_reason(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, cache_k: torch.Tensor,
                       cache_v: torch.Tensor) -> str | None:
    if k.dim() != 4 or k.shape[2] != 1 or v.shape != k.shape or cos.dim() != 3 or cos.shape[1] != 1:
        return f"k {tuple(k.shape)} is not one decode token per row"
    if k.shape[-1] % 2:
        return f"odd head_dim {k.shape[-1]}"
    if any(t.stride(-1) != 1 for t in (k, v, cos, cache_k, cache_v)):
        return "head_dim is not contiguous"
    return None


def launch_kv_write(k, v, cos, sin, cache_k, cache_v, write_pos) -> None:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    rows, heads, _, dim = k.shape
    half = dim // 2
    _rope_kv_write_kernel[(rows * heads,)](
        k, v, cos, sin, cache_k, cache_v, write_pos, heads, k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        cos.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0), cache_v.stride(1),
        cache_v.stride(2), HALF=half, BLOCK=triton.next_power_of_2(half), num_warps=1)


@torch.library.custom_op("orbit::rope_kv_write_", mutates_args=("cache_k", "cache_v"))
def rope_kv_write_(k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                   cache_v: torch.Tensor, write_pos: torch.Tensor) -> None:
    """Store ``rope(k)`` and ``v`` of each row's decode token at ``write_pos`` in its cache row."""
    if serves("rope_kv_write_", ENABLED and KV_WRITE_ENABLED, k, lambda: kv_unserved_reason(k, v, cos, cache_k, cache_v)) and \
            cos.stride() == sin.stride():
        launch_kv_write(k, v, cos, sin, cache_k, cache_v, write_pos)
    else:
        rope_kv_write_reference(k, v, cos, sin, cache_k, cache_v, write_pos)


@rope_kv_write_.register_fake
def _(k, v, cos, sin, cache_k, cache_v, write_pos):
    return None


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


def launch(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, rows_per_program: int | None = None) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    batch, heads, seq, dim = x.shape
    out = torch.empty((batch, seq, heads, dim), dtype=x.dtype, device=x.device).transpose(1, 2)
    half, rows = dim // 2, batch * heads * seq
    block = triton.next_power_of_2(half)
    if rows_per_program is None:  # one row a program for a decode step; a prefill's rows in tiles
        rows_per_program = 1
        while MULTI_ROW and rows_per_program * block < 1024 and rows >= 2048 * rows_per_program:
            rows_per_program *= 2
    warps = max(1, min(4, rows_per_program * block // 256))
    _rope_kernel[(triton.cdiv(rows, rows_per_program),)](
        x, cos, sin, out, rows, heads, seq, x.stride(0), x.stride(1), x.stride(2), cos.stride(0), cos.stride(1),
        out.stride(0), out.stride(1), out.stride(2), HALF=half, BLOCK=block, ROWS=rows_per_program, num_warps=warps)
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
