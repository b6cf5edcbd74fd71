"""A decode step's whole query/key path in one kernel, beside its reference: Qwen3's per-head
RMSNorm of q and k, rope on both, and the new key and value stored in the KV cache at each row's
position. Unfused that is four kernels a layer (the q norm, the k norm, rope of q, and
``rope_kv_write_``): 112 of the 626 kernels of a batch-1 Qwen3-1.7B step, each a few microseconds
of launch and tail for a few kilobytes of work. One program takes one (row, head): the query heads
first, then the KV heads. Every product and sum rounds as the unfused kernels round them (the norm
as ``orbit::rms_norm``, rope as ``orbit::rope``), so the two differ only in the order of the fp32
sum of squares. Models without q/k norms (Llama, Qwen2) take the same kernel without the norm.
"""

from __future__ import annotations

import torch

from orbit_kernels import _triton
from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton
from orbit_kernels.rmsnorm import rms_norm_reference
from orbit_kernels.rope import apply_rope_reference, rope_kv_write_reference, rotate_with, rows_at, table_halves

ENABLED = True
"""Set False to run the four unfused kernels (benchmarks compare the two in one process)."""
GATHER_TABLES = True
"""A decode step hands the kernel the whole rope tables and each row reads its rows at its write
position. False: the step gathers every row's rows first, two torch kernels (benchmarks compare)."""
EARLY_TABLES = True
"""Under PDL with ``EARLY_READS``, read the q/k norm weights, the row's rope table rows and its
write position before the wait, the projections after it. H100, decoding int4 + LoRA r16 at the
Qwen3-1.7B shape in one process (``decode_throughput_early_tables_gamma_h100.jsonl``): 776.0 and
779.8 tok/s (first and last run) against 766.5 with it off at batch 1, 2,174 and 2,178 against
2,157 at 4. False: every read after the wait (benchmarks compare)."""
PREFILL = True
"""A prefill's q/k path in the same kernel (``prefill_qk_``): the q and k norms, rope of both and the
keys and values written at cache positions ``0..T-1``, where the prefill ran two norms, two rope
kernels and two copies into the cache a layer. False: those six (benchmarks compare)."""
PREFILL_TILES = True
"""A prefill program takes ``PREFILL_TOKENS`` tokens of one head with ``PREFILL_WARPS`` warps. A
program per (token, head) of one warp, as the decode kernel runs, took 26.6 ms of a 256-row x
128-token prefill's 222 ms of kernels on an H100 (0.95 ms a layer for about 0.5 GB read and
written; ``decode_graph_replay_profile_prefill_256_h100.txt``). One H100, the Qwen3-1.7B heads,
per call (``bench/prefill_qk.py``, ``prefill_qk_h100.jsonl``): 206.6 us against 947.6 at 256 x 128
tokens, 2.11 against 4.80 at 1 x 128 (8 tokens and 4 warps measured within 1%). Decoding 256 rows
after 128-token prompts (``decode_throughput_prefill_tiles_h100.jsonl``, first and last all-on runs
against it off): int4 + LoRA 30,443 and 30,384 tok/s against 29,567, bf16 + LoRA 35,125 and
35,515 against 34,721; batch 1 within noise. False: the launch before (benchmarks compare)."""
PREFILL_TOKENS, PREFILL_WARPS = 16, 4


def decode_qk_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                        k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                        cache_k: torch.Tensor, cache_v: torch.Tensor, write_pos: torch.Tensor) -> torch.Tensor:
    """q [rows, 1, heads, dim], k and v [rows, 1, kv_heads, dim] as projected; cos/sin [rows, 1, dim],
    or the whole tables [positions, dim], each row taking its row at ``write_pos``; cache_k/v [rows,
    kv_heads, capacity, dim]. Writes the rotated key and the value at ``write_pos`` and returns the
    normed, rotated q as [rows, heads, 1, dim]."""
    cos, sin = rows_at(cos, sin, write_pos)
    if q_weight is not None:
        q, k = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    rope_kv_write_reference(k, v, cos, sin, cache_k, cache_v, write_pos)
    return apply_rope_reference(q, cos, sin)


if triton is not None:

    @triton.jit
    def _frozen_halves(w_ptr, c_ptrs, s_ptrs, offs, mask, like_ptr, NORM: tl.constexpr, HALF: tl.constexpr):
        """A head's norm weight halves (ones without ``NORM``; over ``offs``, the head's first half) and
        the rope table halves at ``c_ptrs`` / ``s_ptrs`` (one row, or a block of tokens' rows)."""
        w_mask = offs < HALF
        if NORM:
            w1 = tl.load(w_ptr + offs, mask=w_mask, other=0.0).to(tl.float32)
            w2 = tl.load(w_ptr + HALF + offs, mask=w_mask, other=0.0).to(tl.float32)
        else:
            w1 = tl.zeros_like(offs).to(tl.float32) + 1.0
            w2 = w1
        c1, c2, s1, s2 = table_halves(c_ptrs, s_ptrs, mask, like_ptr, HALF)
        return w1, w2, c1, c2, s1, s2

    @triton.jit
    def _norm_rope(x_ptrs, w1, w2, c1, c2, s1, s2, mask, eps, NORM: tl.constexpr, HALF: tl.constexpr):
        """A head's two halves (``x_ptrs`` the first half's: one token's, or a block of tokens' along
        the first axis) normed (when NORM) and rotated, in the activation dtype's roundings."""
        dtype = x_ptrs.dtype.element_ty
        x1 = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
        x2 = tl.load(x_ptrs + HALF, mask=mask, other=0.0).to(tl.float32)
        if NORM:
            squares = tl.sum(x1 * x1, axis=-1, keep_dims=True) + tl.sum(x2 * x2, axis=-1, keep_dims=True)
            scale = tl.rsqrt(squares / (2 * HALF) + eps)
            x1 = (w1 * (x1 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
            x2 = (w2 * (x2 * scale).to(dtype).to(tl.float32)).to(dtype).to(tl.float32)
        return rotate_with(x1, x2, c1, c2, s1, s2, x_ptrs)

    @triton.jit
    def _decode_qk_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, out_ptr, ck_ptr, cv_ptr, pos_ptr,
                          eps, heads, kv_heads, sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sc_r, so_r, so_h,
                          sck_r, sck_h, sck_p, scv_r, scv_h, scv_p,
                          NORM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, GATHER: tl.constexpr,
                          PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """``GATHER``: cos/sin are the whole tables, a row's rope rows the ones at its write position."""
        if not EARLY:
            pdl_enter(PDL)  # first: nothing before it may touch memory
        pid = tl.program_id(0)
        row, head = pid // (heads + kv_heads), pid % (heads + kv_heads)
        offs = tl.arange(0, BLOCK)
        mask = offs < HALF
        # ``EARLY_TABLES``: the norm weights (frozen), the rope tables' rows and the write position
        # (set between steps, never by the kernel just before) come before the wait; the projected
        # q, k and v, which the kernel before writes, after it
        pos = tl.load(pos_ptr + row)
        if GATHER:
            c_row, s_row = cos_ptr + pos * sc_r, sin_ptr + pos * sc_r
        else:
            c_row, s_row = cos_ptr + row * sc_r, sin_ptr + row * sc_r
        if head < heads:
            w1, w2, c1, c2, s1, s2 = _frozen_halves(qw_ptr, c_row + offs, s_row + offs, offs, mask, q_ptr, NORM, HALF)
        else:
            w1, w2, c1, c2, s1, s2 = _frozen_halves(kw_ptr, c_row + offs, s_row + offs, offs, mask, q_ptr, NORM, HALF)
        if EARLY:
            pdl_enter(PDL)
        if head < heads:
            out1, out2 = _norm_rope(q_ptr + row * sq_r + head * sq_h + offs, w1, w2, c1, c2, s1, s2, mask, eps,
                                    NORM, HALF)
            dst = out_ptr + row * so_r + head * so_h
            tl.store(dst + offs, out1, mask=mask)
            tl.store(dst + HALF + offs, out2, mask=mask)
        else:
            kv = head - heads
            out1, out2 = _norm_rope(k_ptr + row * sk_r + kv * sk_h + offs, w1, w2, c1, c2, s1, s2, mask, eps, NORM,
                                    HALF)
            dst = ck_ptr + row * sck_r + kv * sck_h + pos * sck_p
            tl.store(dst + offs, out1.to(ck_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF + offs, out2.to(ck_ptr.dtype.element_ty), mask=mask)
            full = tl.arange(0, 2 * BLOCK)
            full_mask = full < 2 * HALF
            value = tl.load(v_ptr + row * sv_r + kv * sv_h + full, mask=full_mask, other=0.0)
            tl.store(cv_ptr + row * scv_r + kv * scv_h + pos * scv_p + full, value.to(cv_ptr.dtype.element_ty),
                     mask=full_mask)

    @triton.jit
    def _prefill_qk_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, out_ptr, ck_ptr, cv_ptr, eps, tokens,
                           heads, sq_t, sq_h, sk_t, sk_h, sv_t, sv_h, sc_b, sc_t, so_b, so_h, so_t,
                           sck_b, sck_h, sck_p, scv_b, scv_h, scv_p,
                           NORM: tl.constexpr, HALF: tl.constexpr, BLOCK: tl.constexpr, TOKENS: tl.constexpr,
                           PDL: tl.constexpr = False, EARLY: tl.constexpr = False):
        """A prefill: program (block of ``TOKENS`` consecutive tokens, head, cache row); token ``p`` of
        cache row ``b`` is row ``b * tokens + p`` of q, k and v, written at position ``p``."""
        if not EARLY:
            pdl_enter(PDL)  # first: nothing before it may touch memory
        pos = tl.program_id(0) * TOKENS + tl.arange(0, TOKENS)
        head, b = tl.program_id(1), tl.program_id(2)
        offs = tl.arange(0, BLOCK)
        mask = (pos < tokens)[:, None] & (offs < HALF)[None, :]
        row = (b * tokens + pos)[:, None]
        table = b * sc_b + pos[:, None] * sc_t + offs[None, :]
        # the norm weights (frozen) and the rope rows before the wait, the projections after it, as in decode
        if head < heads:
            w1, w2, c1, c2, s1, s2 = _frozen_halves(qw_ptr, cos_ptr + table, sin_ptr + table, offs, mask, q_ptr,
                                                    NORM, HALF)
        else:
            w1, w2, c1, c2, s1, s2 = _frozen_halves(kw_ptr, cos_ptr + table, sin_ptr + table, offs, mask, q_ptr,
                                                    NORM, HALF)
        if EARLY:
            pdl_enter(PDL)
        if head < heads:
            out1, out2 = _norm_rope(q_ptr + row * sq_t + head * sq_h + offs[None, :], w1, w2, c1, c2, s1, s2, mask,
                                    eps, NORM, HALF)
            dst = out_ptr + b * so_b + head * so_h + pos[:, None] * so_t + offs[None, :]
            tl.store(dst, out1, mask=mask)
            tl.store(dst + HALF, out2, mask=mask)
        else:
            kv = head - heads
            out1, out2 = _norm_rope(k_ptr + row * sk_t + kv * sk_h + offs[None, :], w1, w2, c1, c2, s1, s2, mask, eps,
                                    NORM, HALF)
            dst = ck_ptr + b * sck_b + kv * sck_h + pos[:, None] * sck_p + offs[None, :]
            tl.store(dst, out1.to(ck_ptr.dtype.element_ty), mask=mask)
            tl.store(dst + HALF, out2.to(ck_ptr.dtype.element_ty), mask=mask)
            for half in tl.static_range(2):
                value = tl.load(v_ptr + row * sv_t + kv * sv_h + half * HALF + offs[None, :], mask=mask, other=0.0)
                tl.store(cv_ptr + b * scv_b + kv * scv_h + pos[:, None] * scv_p + half * HALF + offs[None, :],
                         value.to(cv_ptr.dtype.element_ty), mask=mask)


def _heads_reason(q: torch.Tensor, q_weight: torch.Tensor | None, k_weight: torch.Tensor | None) -> str | None:
    """What the kernel cannot take in the heads' shape or their norm weights (None: nothing)."""
    if q.shape[-1] % 2:
        return f"odd head_dim {q.shape[-1]}"
    if (q_weight is None) != (k_weight is None) or any(
            w is not None and (w.dtype != q.dtype or not w.is_contiguous()) for w in (q_weight, k_weight)):
        return "the q and k norm weights are not both there in the activation dtype"
    return None


def unserved_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                    k_weight: torch.Tensor | None, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                    cache_v: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if q.dim() != 4 or q.shape[1] != 1 or k.shape[1] != 1 or v.shape != k.shape:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} are not one decode token per row"
    if not (cos.dim() == 2 or cos.dim() == 3 and cos.shape[1] == 1):
        return f"cos {tuple(cos.shape)} is neither a row's [1, dim] for each row nor a [positions, dim] table"
    why = _heads_reason(q, q_weight, k_weight)
    if why is not None:
        return why
    if any(t.stride(-1) != 1 for t in (q, k, v, cos, cache_k, cache_v)) or cos.stride() != sin.stride():
        return "head_dim is not contiguous, or cos and sin are laid out differently"
    return None


def launch(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    rows, _, heads, dim = q.shape
    kv_heads, half = k.shape[2], dim // 2
    out = torch.empty((rows, 1, heads, dim), dtype=q.dtype, device=q.device)
    norm = q_weight is not None
    _decode_qk_kernel[(rows * (heads + kv_heads),)](
        q, k, v, q_weight if norm else q, k_weight if norm else q, cos, sin, out, cache_k, cache_v, write_pos, eps,
        heads, kv_heads, q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0), v.stride(2), cos.stride(0),
        out.stride(0), out.stride(2), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0),
        cache_v.stride(1), cache_v.stride(2), NORM=norm, HALF=half, BLOCK=triton.next_power_of_2(half),
        GATHER=cos.dim() == 2, num_warps=1, EARLY=EARLY_TABLES and _triton.EARLY_READS, **pdl_args(out))
    return out.transpose(1, 2)


def served(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v) -> bool:
    return serves("decode_qk_", ENABLED, q,
                  lambda: unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v))


@torch.library.custom_op("orbit::decode_qk_", mutates_args=("cache_k", "cache_v"))
def decode_qk_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
               k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
               cache_v: torch.Tensor, write_pos: torch.Tensor) -> torch.Tensor:
    """``decode_qk_reference`` in one kernel where it serves (inference only)."""
    if served(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v):
        return launch(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos).contiguous()
    return decode_qk_reference(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos).contiguous()


@decode_qk_.register_fake
def _(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos):
    return q.new_empty((q.shape[0], q.shape[2], 1, q.shape[3]))



def prefill_qk_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                         k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                         cache_k: torch.Tensor, cache_v: torch.Tensor) -> torch.Tensor:
    """q [batch, T, heads, dim], k and v [batch, T, kv_heads, dim] as projected; cos/sin [batch, T,
    dim] (a batch of one broadcasts); cache_k/v [batch, kv_heads, capacity, dim], the prefill's cache
    rows. Writes the rotated keys and the values at positions ``0..T-1`` and returns the normed,
    rotated q as [batch, heads, T, dim]."""
    if q_weight is not None:
        q, k = rms_norm_reference(q, q_weight, eps), rms_norm_reference(k, k_weight, eps)
    q, k, v = q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2)
    q, k = apply_rope_reference(q, cos, sin), apply_rope_reference(k, cos, sin)
    cache_k[:, :, : k.shape[2]] = k.to(cache_k.dtype)
    cache_v[:, :, : v.shape[2]] = v.to(cache_v.dtype)
    return q


def _token_rows(t: torch.Tensor) -> bool:
    """Whether ``t`` [batch, T, heads, dim] steps evenly over its batch * T tokens."""
    return t.stride(-1) == 1 and (t.shape[0] == 1 or t.stride(0) == t.shape[1] * t.stride(1))


def prefill_unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v) -> str | None:
    """Why the kernel cannot take this prefill (None: it can)."""
    if q.dim() != 4 or k.dim() != 4 or v.shape != k.shape or q.shape[:2] != k.shape[:2]:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} are not [batch, T, heads, dim]"
    why = _heads_reason(q, q_weight, k_weight)
    if why is not None:
        return why
    if cos.dim() != 3 or cos.shape[0] not in (1, q.shape[0]) or cos.shape[1] != q.shape[1] or cos.stride() != sin.stride():
        return f"cos {tuple(cos.shape)} is not [batch, T, dim] rows laid out as sin's"
    if not all(_token_rows(t) for t in (q, k, v)) or any(t.stride(-1) != 1 for t in (cos, cache_k, cache_v)):
        return "q, k or v do not step evenly over the tokens, or head_dim is not contiguous"
    if cache_k.shape[0] != q.shape[0] or cache_k.shape[2] < q.shape[1]:
        return f"a cache of {tuple(cache_k.shape)} for {q.shape[0]} rows of {q.shape[1]} tokens"
    return None


def launch_prefill(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, tokens_per_program: int | None = None,
                   warps: int | None = None) -> torch.Tensor:
    """The kernel on a prefill (no dispatch checks: tests call it directly, also under the interpreter)."""
    batch, tokens, heads, dim = q.shape
    kv_heads, half = k.shape[2], dim // 2
    out = torch.empty((batch, heads, tokens, dim), dtype=q.dtype, device=q.device)
    norm = q_weight is not None
    block = tokens_per_program or (PREFILL_TOKENS if PREFILL_TILES else 1)
    warps = warps or (PREFILL_WARPS if PREFILL_TILES else 1)
    _prefill_qk_kernel[(triton.cdiv(tokens, block), heads + kv_heads, batch)](
        q, k, v, q_weight if norm else q, k_weight if norm else q, cos, sin, out, cache_k, cache_v, eps, tokens,
        heads, q.stride(1), q.stride(2), k.stride(1), k.stride(2), v.stride(1), v.stride(2),
        cos.stride(0) if cos.shape[0] > 1 else 0, cos.stride(1), out.stride(0), out.stride(1), out.stride(2),
        cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0), cache_v.stride(1),
        cache_v.stride(2), NORM=norm, HALF=half, BLOCK=triton.next_power_of_2(half), TOKENS=block,
        num_warps=warps, EARLY=EARLY_TABLES and _triton.EARLY_READS, **pdl_args(out))
    return out


@torch.library.custom_op("orbit::prefill_qk_", mutates_args=("cache_k", "cache_v"))
def prefill_qk_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor, cache_k: torch.Tensor,
                cache_v: torch.Tensor) -> torch.Tensor:
    """``prefill_qk_reference`` in one kernel where it serves (inference only)."""
    if serves("prefill_qk_", ENABLED and PREFILL, q,
              lambda: prefill_unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v)):
        return launch_prefill(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v)
    return prefill_qk_reference(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v).contiguous()


@prefill_qk_.register_fake
def _(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[1], q.shape[3]))
