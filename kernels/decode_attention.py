"""Decode attention that reads only each row's live keys (split-K, "flash decoding"), beside its reference.

One query token per row attends to keys ``0..length`` of that row's cache slot. The reference
(``decode_attention_reference``, also the CPU path) is SDPA under a boolean mask over every cached
position a step may read; inside a CUDA graph that is the cache's whole capacity. Here the keys of
a row are dealt out in chunks of ``CHUNK`` to programs of a first kernel, which stop at the row's
length and keep an online softmax per query head of the KV head's group; a second kernel merges the
chunks. Grouped-query attention reads each KV head once for its whole query group.

A program's loop runs to the row's length, not over the whole chunk behind a branch, so Triton can
pipeline its loads. The chunk shrinks when there are few rows, so that a batch-1 step still spreads
its keys over many SMs (``launch_config``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to force the reference (tests and benchmarks compare the two in one process)."""
TUNED = True
"""Set False for the launch of the round before (chunks of 256 keys, 4 warps, no pipelining)."""
MERGE_UNROLLED = True
"""Merge up to 16 chunks in straight-line code, every partial read at once (else one chunk's reads
after another's, in a loop). H100, one process (``decode_throughput_merge_unrolled_h100.jsonl``):
int4 + LoRA 29,286 and 29,479 tok/s against 28,838 at 256 rows, 9,642 and 9,614 against 9,551 at
32, within noise at 1 and 4; bf16 + LoRA within 1% at every batch."""
ONE_PASS = True
"""A launch of one chunk per (row, KV head) writes the output itself, ``acc / l`` as the merge
computes it for one chunk, and the merge kernel is not launched; ``launch_config`` takes such a
launch for few rows and short caches (False: the merge always runs, and those calls split as
before). One H100, decoding at 192 keys of 288, on / off / on in one process
(``decode_throughput_one_pass_attention_h100.jsonl``): int4 + LoRA 2,091 / 2,057 / 2,085 tok/s at
4 rows and 3,359 / 3,293 / 3,387 at 8; bare int4 2,372 / 2,294 / 2,370 at 4 and 4,709 / 4,522 /
4,694 at 8; bf16 + LoRA 1,636 / 1,611 / 1,636 at 4; within 1% at 16 rows; at one row +0.8% with
LoRA and +2% bare on int4, within noise on bf16."""


@dataclass(frozen=True)
class Config:
    chunk: int = 256
    """Keys per program of the first kernel; the row's keys past its length are skipped."""
    block_n: int = 64
    warps: int = 4
    stages: int = 1


OVERRIDE: Config | None = None
"""One launch for every call, in place of ``launch_config``'s choice (benchmarks sweep it)."""


def launch_config(rows: int, kv_heads: int, capacity: int) -> Config:
    """The launch for a step of ``rows`` rows over a cache of ``capacity`` positions.

    From ``bench/decode_attention_sweep.py`` on one H200 (``decode_attention_sweep_h200.jsonl``; 16
    query and 8 KV heads of 128, every layer's cache its own, us per layer): with 128 (row, KV head)
    pairs or more, long chunks in narrow blocks, pipelined, beat the launch before by 7% at 256 rows
    and 17% at 32 (12.35 against 14.65 at 192 keys). With fewer, shorter chunks spread a row over
    more SMs: at one row, 5.53 against 8.42 us at 192 keys (capacity 288) and 11.86 against 15.60
    at 1,984 keys (capacity 2,080).

    With fewer than 128 pairs and a short cache, one chunk of 512 keys per (row, KV head), in
    blocks of 64 and three stages, then beats the split launch and its merge (``ONE_PASS``; one
    H100, ``decode_attention_sweep_one_pass_h100.jsonl`` and ``..._rows_h100.jsonl``, us per layer
    at 192 keys of 288): 4.61 against 5.12 at one row, 5.20 against 6.26 at 4, 5.89 against 7.74
    at 8, 7.01 against 10.31 at 15. At 448 keys of 512 it wins at 4 rows (9.06 against 9.48) and
    loses at one (8.76 against 7.20): a row's few pairs then read too many keys each, so below 32
    pairs it takes caches of up to 288 positions only.
    """
    if OVERRIDE is not None:
        return OVERRIDE
    if not TUNED:
        return Config()
    pairs = rows * kv_heads
    if pairs >= 128:
        return Config(256, 32, 2, 3)
    if ONE_PASS and capacity <= (512 if pairs >= 32 else 288):
        return Config(512, 64, 4, 3)  # one chunk: the chunk kernel stores the output, no merge
    return Config(64, 64, 4, 2) if capacity <= 512 else Config(128, 64, 4, 3)


def decode_attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """q [rows, heads, dim]; k, v [rows, kv_heads, capacity, dim]; row ``i`` sees keys ``0..lengths[i]``.
    Returns [rows, heads, dim]."""
    rows, heads, dim = q.shape
    kv_heads = k.shape[1]
    mask = (torch.arange(k.shape[2], device=q.device)[None, :] <= lengths[:, None])[:, None, None, :]
    grouped = q.reshape(rows, kv_heads, heads // kv_heads, dim)
    out = F.scaled_dot_product_attention(grouped, k.to(q.dtype), v.to(q.dtype), attn_mask=mask)
    return out.reshape(rows, heads, dim)


if triton is not None:

    @triton.jit
    def _chunk_kernel(q_ptr, k_ptr, v_ptr, len_ptr, m_ptr, l_ptr, acc_ptr, scale, stride_qr, stride_qh,
                      stride_kr, stride_kh, stride_kn, stride_vr, stride_vh, stride_vn, out_ptr, stride_or, stride_oh,
                      GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, DIM: tl.constexpr, CHUNK: tl.constexpr,
                      BLOCK_N: tl.constexpr, SPLITS: tl.constexpr, DIRECT: tl.constexpr, IEEE: tl.constexpr,
                      PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row, kv_head, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
        length = tl.load(len_ptr + row)  # the last key this row may read
        offs_g = tl.arange(0, GROUP_PAD)
        offs_d = tl.arange(0, DIM)
        g_mask = offs_g < GROUP
        q = tl.load(q_ptr + row * stride_qr + (kv_head * GROUP + offs_g)[:, None] * stride_qh + offs_d[None, :],
                    mask=g_mask[:, None], other=0.0)
        m = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        l = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        acc = tl.zeros((GROUP_PAD, DIM), dtype=tl.float32)
        start = split * CHUNK
        end = tl.minimum(start + CHUNK, length + 1)  # a chunk past the row's length runs no iteration
        k_base = k_ptr + row * stride_kr + kv_head * stride_kh
        v_base = v_ptr + row * stride_vr + kv_head * stride_vh
        for n0 in range(start, end, BLOCK_N):
            offs_n = n0 + tl.arange(0, BLOCK_N)
            n_mask = offs_n < end
            k = tl.load(k_base + offs_n[:, None] * stride_kn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            if IEEE:  # fp32 activations: no TF32 rounding of the scores
                s = tl.dot(q, tl.trans(k.to(q.dtype)), input_precision="ieee") * scale
            else:
                s = tl.dot(q, tl.trans(k.to(q.dtype))) * scale
            s = tl.where(n_mask[None, :], s, float("-inf"))
            m_new = tl.maximum(m, tl.max(s, axis=1))
            alpha = tl.exp(m - m_new)
            p = tl.exp(s - m_new[:, None])
            l = l * alpha + tl.sum(p, axis=1)
            v = tl.load(v_base + offs_n[:, None] * stride_vn + offs_d[None, :], mask=n_mask[:, None], other=0.0)
            if IEEE:
                acc = acc * alpha[:, None] + tl.dot(p, v.to(q.dtype), input_precision="ieee")
            else:
                acc = acc * alpha[:, None] + tl.dot(p.to(q.dtype), v.to(q.dtype))
            m = m_new
        if DIRECT:  # the only chunk: the merge of one partial is acc / l (keep 0, take 1), so store that
            ptrs = out_ptr + row * stride_or + (kv_head * GROUP + offs_g)[:, None] * stride_oh + offs_d[None, :]
            tl.store(ptrs, (acc / tl.where(g_mask, l, 1.0)[:, None]).to(out_ptr.dtype.element_ty),
                     mask=g_mask[:, None])
            return
        part = (row * tl.num_programs(1) + kv_head) * SPLITS + split
        tl.store(m_ptr + part * GROUP + offs_g, m, mask=g_mask)
        tl.store(l_ptr + part * GROUP + offs_g, l, mask=g_mask)
        tl.store(acc_ptr + (part * GROUP + offs_g)[:, None] * DIM + offs_d[None, :], acc, mask=g_mask[:, None])

    @triton.jit
    def _merge_one(m_ptr, l_ptr, acc_ptr, index, m_run, total, out, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr,
                   DIM: tl.constexpr):
        """The running max, normalizer and output with partial ``index`` merged in (each partial is
        read once: ``.cg`` keeps it out of L1)."""
        offs_g = tl.arange(0, GROUP_PAD)
        g_mask = offs_g < GROUP
        m = tl.load(m_ptr + index * GROUP + offs_g, mask=g_mask, other=float("-inf"), cache_modifier=".cg")
        l = tl.load(l_ptr + index * GROUP + offs_g, mask=g_mask, other=0.0, cache_modifier=".cg")
        acc = tl.load(acc_ptr + (index * GROUP + offs_g)[:, None] * DIM + tl.arange(0, DIM)[None, :],
                      mask=g_mask[:, None], other=0.0, cache_modifier=".cg")
        m_new = tl.maximum(m_run, m)
        # a chunk past the row's length holds m = -inf and contributes nothing (nor turns -inf - -inf into NaN)
        keep = tl.where(m_run > float("-inf"), tl.exp(m_run - m_new), 0.0)
        take = tl.where(m > float("-inf"), tl.exp(m - m_new), 0.0)
        return m_new, total * keep + take * l, out * keep[:, None] + take[:, None] * acc

    @triton.jit
    def _merge_kernel(m_ptr, l_ptr, acc_ptr, out_ptr, stride_or, stride_oh, GROUP: tl.constexpr,
                      GROUP_PAD: tl.constexpr, DIM: tl.constexpr, SPLITS: tl.constexpr, UNROLL: tl.constexpr,
                      PDL: tl.constexpr = False):
        # the chunks merged in split order in one pass; with UNROLL (``MERGE_UNROLLED``), up to 16 of
        # them in straight-line code, so that every partial's reads go out at once
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row, kv_head = tl.program_id(0), tl.program_id(1)
        offs_g = tl.arange(0, GROUP_PAD)
        ptrs = out_ptr + row * stride_or + (kv_head * GROUP + offs_g)[:, None] * stride_oh + tl.arange(0, DIM)[None, :]
        g_mask = offs_g < GROUP
        base = (row * tl.num_programs(1) + kv_head) * SPLITS
        m_run = tl.full((GROUP_PAD,), float("-inf"), dtype=tl.float32)
        total = tl.zeros((GROUP_PAD,), dtype=tl.float32)
        out = tl.zeros((GROUP_PAD, DIM), dtype=tl.float32)
        if UNROLL and SPLITS <= 16:
            for split in tl.static_range(SPLITS):
                m_run, total, out = _merge_one(m_ptr, l_ptr, acc_ptr, base + split, m_run, total, out, GROUP,
                                               GROUP_PAD, DIM)
        else:
            for split in range(SPLITS):
                m_run, total, out = _merge_one(m_ptr, l_ptr, acc_ptr, base + split, m_run, total, out, GROUP,
                                               GROUP_PAD, DIM)
        out = out / tl.where(g_mask, total, 1.0)[:, None]
        tl.store(ptrs, out.to(out_ptr.dtype.element_ty), mask=g_mask[:, None])


def unserved_reason(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> str | None:
    """Why the kernels cannot take this call (None: they can)."""
    if q.dim() != 3 or k.dim() != 4 or v.shape != k.shape:
        return f"q {tuple(q.shape)}, k {tuple(k.shape)} are not [rows, heads, dim] / [rows, kv_heads, capacity, dim]"
    if q.shape[-1] not in (64, 128, 256):
        return f"head_dim {q.shape[-1]} (the kernel takes 64, 128 or 256)"
    if q.shape[1] % k.shape[1]:
        return f"{q.shape[1]} query heads over {k.shape[1]} KV heads"
    if q.stride(-1) != 1 or k.stride(-1) != 1 or v.stride(-1) != 1:
        return "head_dim is not contiguous"
    if q.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        return f"activations are {q.dtype}"
    return None


def _served(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> bool:
    return serves("decode_attention", ENABLED, q, lambda: unserved_reason(q, k, v))


def launch(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor,
           config: Config | None = None) -> torch.Tensor:
    """The two kernels (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    rows, heads, dim = q.shape
    kv_heads, capacity = k.shape[1], k.shape[2]
    c = config or launch_config(rows, kv_heads, capacity)
    group = heads // kv_heads
    group_pad = max(16, triton.next_power_of_2(group))  # tl.dot wants at least 16 rows
    splits = triton.cdiv(capacity, c.chunk)
    direct = ONE_PASS and splits == 1
    out = torch.empty((rows, heads, dim), dtype=q.dtype, device=q.device)
    if direct:  # no partials: the kernel never touches these pointers
        m = l = acc = out
    else:
        parts = rows * kv_heads * splits * group
        m = torch.empty(parts, dtype=torch.float32, device=q.device)
        l = torch.empty(parts, dtype=torch.float32, device=q.device)
        acc = torch.empty((parts, dim), dtype=torch.float32, device=q.device)
    _chunk_kernel[(rows, kv_heads, splits)](
        q, k, v, lengths, m, l, acc, 1.0 / math.sqrt(dim), q.stride(0), q.stride(1), k.stride(0), k.stride(1),
        k.stride(2), v.stride(0), v.stride(1), v.stride(2), out, out.stride(0), out.stride(1), GROUP=group,
        GROUP_PAD=group_pad, DIM=dim, CHUNK=c.chunk, BLOCK_N=c.block_n, SPLITS=splits, DIRECT=direct,
        IEEE=q.dtype == torch.float32, num_warps=c.warps, num_stages=c.stages, **pdl_args(q))
    if direct:
        return out
    _merge_kernel[(rows, kv_heads)](m, l, acc, out, out.stride(0), out.stride(1), GROUP=group, GROUP_PAD=group_pad,
                                    DIM=dim, SPLITS=splits, UNROLL=MERGE_UNROLLED, num_warps=4, **pdl_args(out))
    return out


@torch.library.custom_op("orbit::decode_attention", mutates_args=())
def decode_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """One query per row over its keys ``0..lengths[row]`` (no autograd: inference only)."""
    if _served(q, k, v):
        return launch(q, k, v, lengths)
    return decode_attention_reference(q, k, v, lengths)


@decode_attention.register_fake
def _(q, k, v, lengths):
    return torch.empty_like(q)
