"""A decode step's whole attention in one kernel, beside its reference: the q/k path of ``qk_rope``
(Qwen3's q and k norms, rope, the new key and value stored in the cache) and the split-K attention
of ``decode_attention``, chunks and merge. Apart, those are three kernels a layer in a chain that
waits on each: at one row each costs a few microseconds of launch and tail for kilobytes of work.

A program takes one chunk of one (row, KV head), as ``decode_attention``'s first kernel does, and
norms and rotates its query group itself (a few hundred values). The program whose chunk holds the
row's new position also norms and rotates the new key, stores it and the value in the cache, and
attends to them from registers: no program reads that position from memory, so none waits on
another's write. The chunks meet behind an arrival counter per (row, KV head), as the packed GEMV's
split K does: the last program to arrive merges the partials in split order, writes the output and
sets the counter back to zero for the next launch.

The reference is the two ops' references in a row (``decode_qk_reference``, then
``decode_attention_reference``); where the kernel cannot serve a call, the two ops run instead.
"""

from __future__ import annotations

import math

import torch

from orbit_kernels import decode_attention as attention, qk_rope
from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to run ``orbit::decode_qk_`` and ``orbit::decode_attention`` apart (benchmarks compare)."""


def decode_attention_step_reference(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v,
                                    write_pos) -> torch.Tensor:
    """q [rows, 1, heads, dim], k and v [rows, 1, kv_heads, dim] as projected; cos/sin [rows, 1, dim];
    cache_k/v [rows, kv_heads, capacity, dim]. Stores the new key and value at ``write_pos`` and
    returns each row's attention over its keys ``0..write_pos`` as [rows, heads, dim]."""
    q = qk_rope.decode_qk_reference(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos)
    return attention.decode_attention_reference(q[:, :, 0], cache_k, cache_v, write_pos)


if triton is not None:
    from orbit_kernels.decode_attention import attend_chunk, merge_splits, store_partials
    from orbit_kernels.qk_rope import norm_rope

    @triton.jit
    def _whole(x1, x2):
        """``[n, HALF]`` halves laid end to end as ``[n, 2 * HALF]``."""
        both = tl.permute(tl.join(x1, x2), (0, 2, 1))
        return tl.reshape(both, (x1.shape[0], 2 * x1.shape[1]))

    @triton.jit
    def _step_kernel(q_ptr, k_ptr, v_ptr, qw_ptr, kw_ptr, cos_ptr, sin_ptr, ck_ptr, cv_ptr, pos_ptr, m_ptr, l_ptr,
                     acc_ptr, count_ptr, out_ptr, eps, scale, sq_r, sq_h, sk_r, sk_h, sv_r, sv_h, sc_r,
                     sck_r, sck_h, sck_p, scv_r, scv_h, scv_p, so_r, so_h, NORM: tl.constexpr,
                     GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, HALF: tl.constexpr, CHUNK: tl.constexpr,
                     BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, IEEE: tl.constexpr, UNROLL: tl.constexpr,
                     PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        DIM: tl.constexpr = 2 * HALF
        pos = tl.load(pos_ptr + row)  # the new key's position: the cache holds keys 0..pos - 1
        offs_g = tl.arange(0, GROUP_PAD)
        offs_h = tl.arange(0, HALF)[None, :]
        g_mask = (offs_g < GROUP)[:, None]
        c_ptrs, s_ptrs = cos_ptr + row * sc_r + offs_h, sin_ptr + row * sc_r + offs_h
        q_ptrs = q_ptr + row * sq_r + (kv_head * GROUP + offs_g)[:, None] * sq_h + offs_h
        q1, q2 = norm_rope(q_ptrs, qw_ptr + offs_h, c_ptrs, s_ptrs, g_mask & (offs_h < HALF), eps, NORM, HALF)
        q = _whole(q1, q2)
        # the new key and value, read and rotated by every program before its loop (a few hundred bytes,
        # so the owner's reads overlap its loop); only the owner stores and attends to them
        k1, k2 = norm_rope(k_ptr + row * sk_r + kv_head * sk_h + offs_h, kw_ptr + offs_h, c_ptrs, s_ptrs, offs_h < HALF,
                           eps, NORM, HALF)
        k1, k2 = k1.to(ck_ptr.dtype.element_ty), k2.to(ck_ptr.dtype.element_ty)
        offs_d = tl.arange(0, DIM)[None, :]
        value = tl.load(v_ptr + row * sv_r + kv_head * sv_h + offs_d).to(cv_ptr.dtype.element_ty)
        start = split * CHUNK
        k_base = ck_ptr + row * sck_r + kv_head * sck_h
        v_base = cv_ptr + row * scv_r + kv_head * scv_h
        m, l, acc = attend_chunk(q, k_base, v_base, start, tl.minimum(start + CHUNK, pos), sck_p, scv_p, scale,
                                 GROUP_PAD, DIM, BLOCK_N, IEEE)
        # whether this chunk holds the new position, tensor-shaped (the interpreter takes no scalar mask)
        owner = pos // CHUNK - split
        tl.store(k_base + pos * sck_p + offs_h, k1, mask=offs_h * 0 == owner)
        tl.store(k_base + pos * sck_p + HALF + offs_h, k2, mask=offs_h * 0 == owner)
        tl.store(v_base + pos * scv_p + offs_d, value, mask=offs_d * 0 == owner)
        # as the chunk kernel would read them back: the cache's dtype, then the activations'
        s = tl.sum(q.to(tl.float32) * _whole(k1, k2).to(q.dtype).to(tl.float32), axis=1) * scale
        owns = offs_g * 0 == owner
        m_new = tl.where(owns, tl.maximum(m, s), m)
        alpha = tl.where(owns, tl.exp(m - m_new), 1.0)
        p = tl.where(owns, tl.exp(s - m_new), 0.0)
        l = l * alpha + p
        if not IEEE:  # the chunk kernel multiplies the values by p in the activation dtype
            p = p.to(q.dtype).to(tl.float32)
        acc = acc * alpha[:, None] + p[:, None] * value.to(q.dtype).to(tl.float32)
        m = m_new
        out_ptrs = out_ptr + row * so_r + (kv_head * GROUP + offs_g)[:, None] * so_h + tl.arange(0, DIM)[None, :]
        if SPLITS == 1:
            tl.store(out_ptrs, (acc / tl.where(offs_g < GROUP, l, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=g_mask)
        else:
            pair = row * tl.num_programs(1) + kv_head
            store_partials(m_ptr, l_ptr, acc_ptr, pair * SPLITS + split, m, l, acc, GROUP, GROUP_PAD, DIM)
            # every thread's partials are written before the pair's counter moves (release), and the
            # last arrival sees all of them (acquire)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + pair, 1, sem="acq_rel")
            if arrived == SPLITS - 1:
                merge_splits(m_ptr, l_ptr, acc_ptr, pair * SPLITS, out_ptrs, GROUP, GROUP_PAD, DIM, SPLITS,
                             UNROLL)
                tl.atomic_xchg(count_ptr + pair, 0)  # every chunk has arrived: zero for the next launch


def unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v) -> str | None:
    """Why the kernel cannot take this call (None: it can): either op's reason."""
    return (qk_rope.unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v)
            or attention.unserved_reason(q[:, 0], cache_k, cache_v))


def launch(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos,
           config: attention.Config | None = None) -> torch.Tensor:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    from orbit_kernels.packed_gemv import arrival_counters

    rows, _, heads, dim = q.shape
    kv_heads, capacity = cache_k.shape[1], cache_k.shape[2]
    c = config or attention.launch_config(rows, kv_heads, capacity)
    group = heads // kv_heads
    splits = triton.cdiv(capacity, c.chunk)
    parts = rows * kv_heads * splits * group if splits > 1 else 1
    m = torch.empty(parts, dtype=torch.float32, device=q.device)
    l = torch.empty(parts, dtype=torch.float32, device=q.device)
    acc = torch.empty((parts, dim), dtype=torch.float32, device=q.device)
    count = arrival_counters(q.device, rows * kv_heads) if splits > 1 else m
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    norm = q_weight is not None
    _step_kernel[(rows, kv_heads, splits)](
        q, k, v, q_weight if norm else q, k_weight if norm else q, cos, sin, cache_k, cache_v, write_pos, m, l, acc,
        count, out, eps, 1.0 / math.sqrt(dim), q.stride(0), q.stride(2), k.stride(0), k.stride(2), v.stride(0),
        v.stride(2), cos.stride(0), cache_k.stride(0), cache_k.stride(1), cache_k.stride(2), cache_v.stride(0),
        cache_v.stride(1), cache_v.stride(2), out.stride(0), out.stride(1), NORM=norm, GROUP=group,
        GROUP_PAD=max(16, triton.next_power_of_2(group)), HALF=dim // 2, CHUNK=c.chunk, BLOCK_N=c.block_n,
        SPLITS=splits, IEEE=q.dtype == torch.float32, UNROLL=attention.MERGE_UNROLLED,
        num_warps=c.warps, num_stages=c.stages, **pdl_args(q))
    return out


@torch.library.custom_op("orbit::decode_attention_step_", mutates_args=("cache_k", "cache_v"))
def decode_attention_step_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_weight: torch.Tensor | None,
                           k_weight: torch.Tensor | None, eps: float, cos: torch.Tensor, sin: torch.Tensor,
                           cache_k: torch.Tensor, cache_v: torch.Tensor, write_pos: torch.Tensor) -> torch.Tensor:
    """``decode_attention_step_reference`` in one kernel where it serves; else ``orbit::decode_qk_`` and
    ``orbit::decode_attention`` (each its kernel or its reference; inference only)."""
    if serves("decode_attention_step_", ENABLED, q,
              lambda: unserved_reason(q, k, v, q_weight, k_weight, cos, sin, cache_k, cache_v)):
        return launch(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos)
    q = qk_rope.decode_qk_(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos)
    return attention.decode_attention(q[:, :, 0], cache_k, cache_v, write_pos)


@decode_attention_step_.register_fake
def _(q, k, v, q_weight, k_weight, eps, cos, sin, cache_k, cache_v, write_pos):
    return q.new_empty((q.shape[0], q.shape[2], q.shape[3]))
