"""A tiled GEMM over packed weight codes (int4, nvfp4, fp8 block), in both orientations that adapter
training needs, and the whole-word dequantization the format ops use above it:

* ``forward``:  ``y[M, out] = x[M, in] @ W^T`` (the linear);
* ``backward``: ``dx[M, in] = dy[M, out] @ W`` (its input gradient; the base is frozen, so no dW);
* ``dequantize``: the dense weight, bit-equal to the formats' torch references.

Each GEMM program loads a ``[BLOCK_N, BLOCK_K]`` tile of ``W`` as the stored int32 words, decodes
it in registers (``packed_gemv._decode``, the same bit tricks), scales it, rounds it to the
activation dtype and feeds it to ``tl.dot`` (fp32 accumulation). The dense weight is never
written. The tile holds what the dequantize-then-cuBLAS reference multiplies by, so the two
differ only in summation order; nvfp4's global scale is divided out of the fp32 accumulator.

A decode-sized batch has too few output tiles to occupy the GPU, so the reduction is split over
``SPLIT`` programs per tile whose fp32 partials meet in the same launch, as in the GEMV: the last
program of a tile to arrive (an atomic counter) adds them in a fixed order, so results do not
depend on timing.

Where it runs is measured, not assumed (``MAX_ROWS``): the GEMM decodes every weight tile once per
row tile, while ``dequantize`` decodes it once and cuBLAS runs at full tensor-core rate, so above a
few rows dequantize + cuBLAS wins on an H200.

The references are the formats' dequantize functions followed by ``F.linear`` (forward) or a
matmul (backward); on the CPU those run instead.
"""

from __future__ import annotations

import os
from typing import NamedTuple

import torch

from orbit_kernels import packed_gemv as gemv
from orbit_kernels._triton import capability_major, pdl_args, pdl_enter, tl, triton

ENABLED = True
"""Set False to force the references (benchmarks compare the two in one process)."""
MAX_ROWS = {"int4": 16, "fp8": 0, "nvfp4": 0}
"""Up to this many rows the format ops run this GEMM (the input gradient, and the forward without
``X_SPLIT``); above,
the format's dequantization then cuBLAS, which measured faster on an H200 at the Qwen3-1.7B shape
(``bench/results/packed_gemm_h200.jsonl``, summed over q, k, gate and down_proj). int4 at 8
rows: GEMM 48.7 us forward / 46.4 backward, dequantize + cuBLAS 50.0 / 48.1; at 32 rows the GEMM
is 11% slower, at 256 2.1x, at 8192 2.8x (bf16 cuBLAS 91 / 265 us against the GEMM's 245 / 749
for q / gate_proj). fp8 and nvfp4 lose at every row count: the decode costs more per weight
there. A tile decoded in the GEMM is decoded once per row tile, a dequantized weight once.

Two other ways of unpacking were tried and removed (commit 6c53c3c): one ``tl.dot`` per code
position over the loaded words (no reshape), and loading each column's own word (repeats from L1)
and shifting it by its own amount; and reduction splits of 8 to 32. At 16-256 rows none beat
this kernel or dequantize + cuBLAS, and every int4 GEMM stayed 1.5-3.4x slower than bf16 cuBLAS
(``packed_gemm_unpack_h200.jsonl``, ``packed_gemm_per_code_splits_h200.jsonl``,
``packed_gemm_tiles_splits_h200.jsonl``)."""
X_SPLIT = True
"""Forward: one ``tl.dot`` per code position on the words as loaded, the activations of a K step
in one contiguous load dealt out to the code positions by register splits (as the GEMV reads
them), instead of unfolding the decoded words into a ``[BLOCK_N, BLOCK_K]`` tile (a layout
change through shared memory). H200, int4, q/gate/down_proj at the Qwen3-1.7B shape
(``packed_gemm_x_split_h200.jsonl``, one process): 16 rows 7.74 / 12.48 / 12.53 us against the
unfolding GEMM's 9.22 / 15.64 / 14.92; 32 rows 9.30 / 13.93 / 15.51 against dequantize + cuBLAS's
9.58 / 15.52 / 17.93; at 64 rows dequantize + cuBLAS wins again (44.3 us summed against 52.0). bf16
cuBLAS stays ahead at every row count (25.98 us summed at 16 rows, 26.97 at 32). (The per-code
dots tried in 6c53c3c loaded each code position's activations with a strided global load.)"""
X_SPLIT_MAX_ROWS = {"int4": 32, "fp8": 0, "nvfp4": 0}
"""With ``X_SPLIT``, the forward runs this GEMM up to this many rows (``MAX_ROWS`` stays the input
gradient's, and the forward's without it)."""
TARGET_PROGRAMS = 264
"""Split the reduction until about this many programs run: two per SM of an H100 (132 SMs)."""
NARROW_TILES = True
"""The x-split forward in 64-column tiles, its reduction split until about four programs per SM
run (``packed_gemv.TARGET_PROGRAMS``); False: 128-column tiles and ``TARGET_PROGRAMS``. H200,
int4, q/gate/down_proj, one process (``packed_gemm_x_split_splits_h200.jsonl``, each split
measured): 16 rows 6.96 / 10.17 / 11.52 us (split 8 / 4 / 16, what this rule picks) against
7.77 / 12.42 / 12.52 with 128 columns; 32 rows 7.77 / 11.91 / 13.24 against 9.27 / 13.89 / 15.50.
bf16 cuBLAS: 5.78 / 8.94 / 11.37 and 6.18 / 9.25 / 11.66. Decoding, int4 + LoRA r16, against
False in the same process (``decode_throughput_gemm_narrow_tiles_h200.jsonl``): 3,185 tok/s
against 2,963 at batch 8, 5,587 against 5,340 at 16, 9,533 against 9,003 at 32."""


INT4_PAIRS = True
"""The x-split forward on int4 (a K step inside one scale group) turns two codes of a word into a
bf16 or fp16 pair with a shift, one LOP3 and one packed FMA (``_pairs_of``: the nibbles ORed into the
mantissa of 128.0, or 1024.0 for fp16, then 136 or 1032 taken off), multiplies the raw codes on
the tensor cores and scales each K step's fp32 dot by its group scale. The decode before it took a
shift, a mask, an OR, an fp32 subtraction, a multiply by the scale and a rounding to the
activation dtype per code.
Numerically the product is the GEMV's: codes times scale unrounded, where dequantize-then-matmul
rounds each weight to the activation dtype. One H100, q/gate/down/o_proj summed, against the decode
before with its tiles (``packed_gemm_int4_pairs_rows_h100.jsonl``): 30.18 against 35.05 us at 8
rows, 33.10 against 36.77 at 16, 41.87 against 44.97 at 32; decoding int4 + LoRA r16 on / off / on
in one process (``decode_throughput_int4_pairs_h100.jsonl``): 3,315 / 3,072 / 3,305 tok/s at
batch 8, 5,980 / 5,763 / 5,960 at 16, 9,566 / 9,568 / 9,540 at 32. Off under Triton's
interpreter, which runs no inline PTX. False: the decode before (benchmarks compare)."""


class Tiles(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    swap: bool = False
    x_split: bool = False


def tiles_for(rows: int, forward: bool, pairs: bool = False, inner: int = 0) -> Tiles:
    """The tile setting for ``rows`` activation rows: the fastest of a sweep summed over q_proj,
    gate_proj and down_proj at the Qwen3-1.7B shape, per direction and row count (H200,
    ``bench/results/packed_gemm_sweep_h200.jsonl``; rows 8 from an earlier sweep of 16-row tiles).
    ``pairs`` (``INT4_PAIRS`` serves the call): 16-row tiles, not swapped, two stages; 128 output
    columns where the reduction is over 4,096 wide (down_proj) at 16 rows or fewer (one H100,
    ``packed_gemm_int4_pairs_h100.jsonl``)."""
    if forward and X_SPLIT and pairs and rows <= 32:
        return Tiles(16, 128 if inner > 4096 and rows <= 16 else 64, 128, 4, 2, False, True)
    if forward and X_SPLIT and rows <= 32:  # the x-split sweeps (``X_SPLIT``, ``NARROW_TILES``)
        return Tiles(16 if rows <= 16 else 32, 64 if NARROW_TILES else 128, 128, 4, 4, True, True)
    if rows <= 16:
        return Tiles(16, 128, 128, 4, 4, forward)
    if rows <= 64:
        return Tiles(32, 128, 128, 4, 4, True) if forward else Tiles(64, 128, 64, 4, 3)
    if rows <= 256:
        return Tiles(64, 128, 128, 4, 3) if forward else Tiles(128, 128, 64, 4, 3, True)
    return Tiles(128, 128, 64, 4, 3, True)


if triton is not None:
    from orbit_kernels.lora import rows_delta_by_rank

    @triton.jit
    def _word_scales(s_ptr, offs_n, offs_w, k0, n_mask, stride_s, CODES: tl.constexpr, GROUP: tl.constexpr,
                     SCALE_ROWS: tl.constexpr, ROW_SCALE: tl.constexpr):
        """fp32 scales of rows ``offs_n`` for the words ``offs_w`` of the K tile at ``k0``: ``[rows, 1]``
        when the tile lies inside one scale group, else ``[rows, words]`` (a word never straddles
        two groups: GROUP % CODES == 0)."""
        if ROW_SCALE:
            scale = tl.load(s_ptr + (offs_n // SCALE_ROWS) * stride_s + k0 // GROUP, mask=n_mask, other=0.0)
            scale = scale[:, None]
        else:
            scale = tl.load(s_ptr + (offs_n // SCALE_ROWS)[:, None] * stride_s + (offs_w * CODES // GROUP)[None, :],
                            mask=n_mask[:, None], other=0.0)
        return scale.to(tl.float32)

    @triton.jit
    def _weight_tile(w_ptr, s_ptr, gs_ptr, offs_n, k0, n_mask, stride_w, stride_s, FMT: tl.constexpr,
                     CODES: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, ROW_SCALE: tl.constexpr,
                     HAS_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, dtype: tl.constexpr):
        # W[offs_n, k0 : k0 + BLOCK_K] decoded and scaled, in ``dtype``. The words are loaded as they
        # lie ([BLOCK_N, BLOCK_K / CODES], what the software pipeline stages in shared memory), their
        # codes unfolded along a third axis and merged into columns: word w, code c is column
        # CODES * w + c.
        BITS: tl.constexpr = 32 // CODES
        BLOCK_W: tl.constexpr = BLOCK_K // CODES
        offs_w = k0 // CODES + tl.arange(0, BLOCK_W)
        words = tl.load(w_ptr + offs_n[:, None] * stride_w + offs_w[None, :], mask=n_mask[:, None], other=0)
        shifts = tl.arange(0, CODES) * BITS
        value = gemv._decode((words[:, :, None] >> shifts[None, None, :]) & ((1 << BITS) - 1), FMT)
        scale = _word_scales(s_ptr, offs_n, offs_w, k0, n_mask, stride_s, CODES, GROUP, SCALE_ROWS,
                             ROW_SCALE)[:, :, None]
        if HAS_GLOBAL:  # nvfp4's reference divides the scale first (IEEE division, as torch divides)
            scale = tl.math.div_rn(scale, tl.load(gs_ptr).to(tl.float32))
        value = value * scale
        return tl.reshape(value, (BLOCK_N, BLOCK_K)).to(dtype)

    @triton.jit
    def _raw_dot(acc, w, x, SWAP: tl.constexpr):
        """``acc`` plus the weight tile ``w [BLOCK_O, BLOCK_W]`` times ``x [BLOCK_M, BLOCK_W]``,
        the decoded tile as wgmma's register operand when ``SWAP`` (``acc`` is then transposed)."""
        if SWAP:
            acc = tl.dot(w, tl.trans(x), acc)
        else:
            acc = tl.dot(x, tl.trans(w), acc)
        return acc

    @triton.jit
    def _code_dot(acc, words, scale, x, c: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, SWAP: tl.constexpr):
        # code c of every loaded word, decoded and scaled in the words' own layout (no reshape),
        # times its activations ``x [BLOCK_M, BLOCK_W]`` (columns ``CODES * w + c``)
        w = (gemv._decode((words >> (c * BITS)) & ((1 << BITS) - 1), FMT) * scale).to(x.dtype)
        return _raw_dot(acc, w, x, SWAP)

    @triton.jit
    def _four_code_dots(acc, words, scale, xa, xb, xc, xd, FIRST: tl.constexpr, BITS: tl.constexpr,
                        FMT: tl.constexpr, SWAP: tl.constexpr):
        acc = _code_dot(acc, words, scale, xa, FIRST, BITS, FMT, SWAP)
        acc = _code_dot(acc, words, scale, xb, FIRST + 1, BITS, FMT, SWAP)
        acc = _code_dot(acc, words, scale, xc, FIRST + 2, BITS, FMT, SWAP)
        return _code_dot(acc, words, scale, xd, FIRST + 3, BITS, FMT, SWAP)

    @triton.jit
    def _pairs_of(words, BF16: tl.constexpr):
        """Codes 0 and 4 of every word (bits 0-3 and 16-19) as ``q - 8`` in the activation dtype,
        exactly: ``(w & 0x000F000F) | magic`` is the pair (m + q0, m + q4) with m = 128.0 in bf16
        (1024.0 in fp16), whose lowest mantissa bit is worth 1; one packed FMA takes m + 8 off."""
        if BF16:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 t, m, o, one, off; mov.b32 m, 0x000F000F; mov.b32 o, 0x43004300; "
                "lop3.b32 t, $2, m, o, 0xEA; mov.b32 one, 0x3F803F80; mov.b32 off, 0xC308C308; "
                "fma.rn.bf16x2 t, t, one, off; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [words], dtype=(tl.bfloat16, tl.bfloat16), is_pure=True, pack=1)
        else:
            pair = tl.inline_asm_elementwise(
                "{ .reg .b32 t, m, o, one, off; mov.b32 m, 0x000F000F; mov.b32 o, 0x64006400; "
                "lop3.b32 t, $2, m, o, 0xEA; mov.b32 one, 0x3C003C00; mov.b32 off, 0xE408E408; "
                "fma.rn.f16x2 t, t, one, off; mov.b32 {$0, $1}, t; }",
                "=h,=h,r", [words], dtype=(tl.float16, tl.float16), is_pure=True, pack=1)
        return pair

    @triton.jit
    def _int4_pair_step(acc, words, scale, a, BLOCK_M: tl.constexpr, BLOCK_W: tl.constexpr, SWAP: tl.constexpr):
        """``acc`` plus one K step (inside one scale group) of the raw codes times the activations,
        scaled once: ``scale`` is the tile's ``[rows, 1]`` group scales."""
        BF16: tl.constexpr = a.dtype == tl.bfloat16
        a0, a1, a2, a3, a4, a5, a6, a7 = gemv.deal8(a, BLOCK_M, BLOCK_W)
        w0, w4 = _pairs_of(words, BF16)
        w1, w5 = _pairs_of(words >> 4, BF16)
        w2, w6 = _pairs_of(words >> 8, BF16)
        w3, w7 = _pairs_of(words >> 12, BF16)
        step = tl.zeros_like(acc)
        step = _raw_dot(step, w0, a0, SWAP)
        step = _raw_dot(step, w1, a1, SWAP)
        step = _raw_dot(step, w2, a2, SWAP)
        step = _raw_dot(step, w3, a3, SWAP)
        step = _raw_dot(step, w4, a4, SWAP)
        step = _raw_dot(step, w5, a5, SWAP)
        step = _raw_dot(step, w6, a6, SWAP)
        step = _raw_dot(step, w7, a7, SWAP)
        if SWAP:
            acc += step * scale
        else:
            acc += step * tl.trans(scale)
        return acc

    @triton.jit
    def _packed_gemm_kernel(a_ptr, w_ptr, s_ptr, gs_ptr, c_ptr, part_ptr, count_ptr, M, N, K, stride_am, stride_w,
                            stride_s, stride_cm, t_ptr, b_ptr, slot_ptr, bias_ptr, scaling, R, stride_tm, stride_bn,
                            b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2, LORA: tl.constexpr, HAS_SLOTS: tl.constexpr,
                            HAS_BIAS: tl.constexpr, FMT: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr,
                            SCALE_ROWS: tl.constexpr, ROW_SCALE: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                            FORWARD: tl.constexpr, SPLIT: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                            BLOCK_K: tl.constexpr, GROUP_M: tl.constexpr, SWAP: tl.constexpr,
                            X_SPLIT: tl.constexpr, PAIRS: tl.constexpr = False, PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        # W is [N, K] as stored. forward: C[M, N] = A[M, K] W^T, reducing over K in BLOCK_K steps;
        # backward: C[M, K] = A[M, N] W, reducing over N in BLOCK_N steps. SWAP computes C^T
        # instead (W^T... as the dot's first operand): Hopper's wgmma takes its first operand from
        # registers, where the decoded tile is, and its second from shared memory, where the
        # activation tile is staged; the other way round the decoded tile must be stored first.
        dtype = a_ptr.dtype.element_ty
        if FORWARD:
            BLOCK_O: tl.constexpr = BLOCK_N
            out_cols = N
        else:
            BLOCK_O: tl.constexpr = BLOCK_K
            out_cols = K
        pid, pid_s = tl.program_id(0), tl.program_id(1)
        # output tiles in groups of GROUP_M row tiles, so programs running together share weight tiles in L2
        tiles_m, tiles_o = tl.cdiv(M, BLOCK_M), tl.cdiv(out_cols, BLOCK_O)
        group_size = GROUP_M * tiles_o
        first_m = (pid // group_size) * GROUP_M
        rows_in_group = tl.minimum(tiles_m - first_m, GROUP_M)
        pid_m = first_m + (pid % group_size) % rows_in_group
        pid_o = (pid % group_size) // rows_in_group
        offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_o = pid_o * BLOCK_O + tl.arange(0, BLOCK_O)
        m_mask = offs_m < M
        o_mask = offs_o < out_cols
        if SWAP:
            acc = tl.zeros((BLOCK_O, BLOCK_M), dtype=tl.float32)
        else:
            acc = tl.zeros((BLOCK_M, BLOCK_O), dtype=tl.float32)
        if FORWARD and X_SPLIT:
            # one dot per code position on the words as loaded; the activations of the step come
            # in one contiguous load and are dealt out to the code positions in registers
            BITS: tl.constexpr = 32 // CODES
            BLOCK_W: tl.constexpr = BLOCK_K // CODES
            for k0 in range(pid_s * BLOCK_K, K, SPLIT * BLOCK_K):
                offs_w = k0 // CODES + tl.arange(0, BLOCK_W)
                words = tl.load(w_ptr + offs_o[:, None] * stride_w + offs_w[None, :], mask=o_mask[:, None], other=0)
                scale = _word_scales(s_ptr, offs_o, offs_w, k0, o_mask, stride_s, CODES, GROUP, SCALE_ROWS, ROW_SCALE)
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + (k0 + tl.arange(0, BLOCK_K))[None, :],
                            mask=m_mask[:, None], other=0.0)
                if PAIRS:  # int4, the step inside one scale group: ``scale`` is [rows, 1]
                    acc = _int4_pair_step(acc, words, scale, a, BLOCK_M, BLOCK_W, SWAP)
                elif CODES == 8:
                    a0, a1, a2, a3, a4, a5, a6, a7 = gemv.deal8(a, BLOCK_M, BLOCK_W)
                    acc = _four_code_dots(acc, words, scale, a0, a1, a2, a3, 0, BITS, FMT, SWAP)
                    acc = _four_code_dots(acc, words, scale, a4, a5, a6, a7, 4, BITS, FMT, SWAP)
                else:
                    a0, a1, a2, a3 = gemv.deal4(a, BLOCK_M, BLOCK_W)
                    acc = _four_code_dots(acc, words, scale, a0, a1, a2, a3, 0, BITS, FMT, SWAP)
        elif FORWARD:
            for k0 in range(pid_s * BLOCK_K, K, SPLIT * BLOCK_K):
                offs_k = k0 + tl.arange(0, BLOCK_K)
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_k[None, :], mask=m_mask[:, None], other=0.0)
                w = _weight_tile(w_ptr, s_ptr, gs_ptr, offs_o, k0, o_mask, stride_w, stride_s, FMT, CODES, GROUP,
                                 SCALE_ROWS, ROW_SCALE, False, BLOCK_N, BLOCK_K, dtype)
                if SWAP:
                    acc = tl.dot(w, tl.trans(a), acc)
                else:
                    acc = tl.dot(a, tl.trans(w), acc)
        else:
            k0 = pid_o * BLOCK_K
            for n0 in range(pid_s * BLOCK_N, N, SPLIT * BLOCK_N):
                offs_n = n0 + tl.arange(0, BLOCK_N)
                n_mask = offs_n < N
                a = tl.load(a_ptr + offs_m[:, None] * stride_am + offs_n[None, :], mask=m_mask[:, None] & n_mask[None, :],
                            other=0.0)
                w = _weight_tile(w_ptr, s_ptr, gs_ptr, offs_n, k0, n_mask, stride_w, stride_s, FMT, CODES, GROUP,
                                 SCALE_ROWS, ROW_SCALE, False, BLOCK_N, BLOCK_K, dtype)
                if SWAP:
                    acc = tl.dot(tl.trans(w), tl.trans(a), acc)
                else:
                    acc = tl.dot(a, w, acc)
        if SWAP:
            acc = tl.trans(acc)
        if HAS_GLOBAL:
            acc = acc / tl.load(gs_ptr).to(tl.float32)
        if LORA:  # forward only (``packed_lora``)
            if pid_s == 0:  # the LoRA update and the bias join one split's partials: the tile's sum has them once
                acc += scaling * rows_delta_by_rank(t_ptr, b_ptr, slot_ptr, offs_m, offs_o, M, N, R, stride_tm,
                                                    stride_bn, b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2, HAS_SLOTS)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_o, mask=o_mask, other=0.0).to(tl.float32)[None, :]
        c_ptrs = c_ptr + offs_m[:, None] * stride_cm + offs_o[None, :]
        c_mask = m_mask[:, None] & o_mask[None, :]
        gemv.finish_split(acc, c_ptrs, c_mask, part_ptr, offs_m[:, None] * out_cols + offs_o[None, :], M * out_cols,
                          count_ptr, pid, pid_s, SPLIT)

    @triton.jit
    def _dequant_tiles_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, N, stride_w, stride_s, stride_o, FMT: tl.constexpr,
                              CODES: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr,
                              ROW_SCALE: tl.constexpr, HAS_GLOBAL: tl.constexpr, BLOCK_N: tl.constexpr,
                              BLOCK_K: tl.constexpr):
        offs_n = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        k0 = tl.program_id(1) * BLOCK_K
        n_mask = offs_n < N
        w = _weight_tile(w_ptr, s_ptr, gs_ptr, offs_n, k0, n_mask, stride_w, stride_s, FMT, CODES, GROUP, SCALE_ROWS,
                         ROW_SCALE, HAS_GLOBAL, BLOCK_N, BLOCK_K, out_ptr.dtype.element_ty)
        offs_k = k0 + tl.arange(0, BLOCK_K)
        tl.store(out_ptr + offs_n[:, None] * stride_o + offs_k[None, :], w, mask=n_mask[:, None])

    @triton.jit
    def _dequant_weights_kernel(w_ptr, s_ptr, gs_ptr, out_ptr, rows, cols, stride_w, stride_s, stride_o,
                                FMT: tl.constexpr, CODES: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr,
                                HAS_GLOBAL: tl.constexpr, BLOCK_R: tl.constexpr, BLOCK_C: tl.constexpr):
        # one thread per weight, for shapes the whole-word tiles do not fit; the same arithmetic
        BITS: tl.constexpr = 32 // CODES
        offs_r = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
        offs_c = tl.program_id(1) * BLOCK_C + tl.arange(0, BLOCK_C)
        mask = (offs_r[:, None] < rows) & (offs_c[None, :] < cols)
        words = tl.load(w_ptr + offs_r[:, None] * stride_w + offs_c[None, :] // CODES, mask=mask, other=0)
        value = gemv._decode((words >> ((offs_c[None, :] % CODES) * BITS)) & ((1 << BITS) - 1), FMT)
        scale = tl.load(s_ptr + (offs_r[:, None] // SCALE_ROWS) * stride_s + offs_c[None, :] // GROUP, mask=mask,
                        other=0.0).to(tl.float32)
        if HAS_GLOBAL:
            scale = tl.math.div_rn(scale, tl.load(gs_ptr).to(tl.float32))  # IEEE division, as torch divides
        tl.store(out_ptr + offs_r[:, None] * stride_o + offs_c[None, :], (value * scale).to(out_ptr.dtype.element_ty),
                 mask=mask)


MIN_BLOCK_K = 32


def forward_max_rows(fmt: str) -> int:
    """Up to how many rows the format's forward runs this GEMM (above: dequantize, then cuBLAS)."""
    return X_SPLIT_MAX_ROWS[fmt] if X_SPLIT else MAX_ROWS[fmt]


def dense_above(fmt: str) -> int:
    """Above this many rows the format's forward dequantizes the weight and calls cuBLAS on a GPU
    (at or below, the few-row GEMV or this GEMM, where they serve the shape)."""
    return max(gemv.MAX_ROWS if gemv.ENABLED else 0, forward_max_rows(fmt) if ENABLED else 0)


def shape_reason(fmt: str, weight: torch.Tensor, scale: torch.Tensor, in_features: int) -> str | None:
    """Why the kernels here cannot decode this weight (None when they can)."""
    codes, group, _ = gemv.layout(fmt, scale, in_features)
    if in_features % MIN_BLOCK_K or group % codes:
        return f"in_features={in_features} or group={group} does not fit the {MIN_BLOCK_K}-column tiles"
    if not weight.is_contiguous():
        return "the packed weight is not contiguous"
    return None


def unserved_reason(fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, in_features: int) -> str | None:
    """Why the GEMM cannot take this call (None when it can)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations are {x.dtype}"
    return shape_reason(fmt, weight, scale, in_features)


def _split(tiles: int, steps: int, target: int = TARGET_PROGRAMS) -> int:
    """Programs per output tile: up to ``target`` in all, each keeping two reduction steps."""
    split = max(1, min(target // tiles, steps // 2))
    return 1 << (split.bit_length() - 1)


def _pairs(fmt: str, group: int, block_k: int, a: torch.Tensor) -> bool:
    """Whether the x-split forward decodes int4 in pairs (``INT4_PAIRS``): a K step inside one scale
    group, on a GPU with packed bf16 FMAs (compute capability 8.0 or later; not under the
    interpreter)."""
    return (INT4_PAIRS and fmt == "int4" and group % block_k == 0 and a.is_cuda
            and os.environ.get("TRITON_INTERPRET") != "1" and capability_major(a.device) >= 8)


def packed_gemm(fmt: str, a: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, in_features: int,
                global_scale: torch.Tensor | None = None, forward: bool = True,
                tiles: Tiles | None = None, split: int | None = None,
                lora: gemv.LoRAEpilogue | None = None) -> torch.Tensor:
    """``a @ W^T`` (``forward``; ``a [..., in]``) or ``a @ W`` (``a [..., out]``), callers having
    checked ``unserved_reason``. Tensors as stored, as for ``packed_gemv.packed_gemv``; the forward
    adds ``lora``'s update and bias when given. ``tiles`` and ``split`` override the defaults
    (benchmarks sweep them)."""
    assert lora is None or forward, "the LoRA epilogue is the forward's"
    out_features = weight.shape[0]
    inner, outer = (in_features, out_features) if forward else (out_features, in_features)
    rows = a.numel() // inner
    flat = a.reshape(rows, inner).contiguous()
    words = weight.view(torch.int32)
    codes, group, scale_rows = gemv.layout(fmt, scale, in_features)
    pairs = forward and _pairs(fmt, group, 128, a)  # x-split K steps are 128 or 256 columns
    t = tiles or tiles_for(rows, forward, pairs and in_features % 128 == 0, inner)
    block_k = next(b for b in (t.block_k, 64, 32) if in_features % b == 0)
    block_o = t.block_n if forward else block_k
    out_tiles = triton.cdiv(rows, t.block_m) * triton.cdiv(outer, block_o)
    steps = triton.cdiv(inner, block_k if forward else t.block_n)
    x_split_tiles = t.x_split and forward
    split = split or _split(out_tiles, steps,
                            gemv.TARGET_PROGRAMS if x_split_tiles and NARROW_TILES else TARGET_PROGRAMS)
    c = torch.empty((rows, outer), dtype=a.dtype, device=a.device)
    part = count = c  # read only when the reduction is split: fp32 partials and per-tile arrival counters
    if split > 1:
        part = torch.empty((split, rows, outer), dtype=torch.float32, device=a.device)
        count = gemv.arrival_counters(a.device, out_tiles)
    lora_args, lora_flags = gemv.epilogue_args(lora, c)
    lora_flags.pop("BLOCK_R")  # the GEMM's expand goes one rank at a time
    x_split = x_split_tiles and block_k // codes >= 16
    _packed_gemm_kernel[(out_tiles, split)](
        flat, words, scale, scale if global_scale is None else global_scale, c, part, count, rows, out_features,
        in_features, flat.stride(0), words.stride(0), scale.stride(0), c.stride(0), *lora_args, **lora_flags,
        FMT=gemv.FORMAT_CODES[fmt],
        CODES=codes, GROUP=group, SCALE_ROWS=scale_rows, ROW_SCALE=group % block_k == 0,
        HAS_GLOBAL=global_scale is not None, FORWARD=forward, SPLIT=split, BLOCK_M=t.block_m, BLOCK_N=t.block_n,
        BLOCK_K=block_k, GROUP_M=8, SWAP=t.swap, X_SPLIT=x_split, PAIRS=x_split and pairs and group % block_k == 0,
        num_warps=t.warps, num_stages=t.stages, **pdl_args(c))
    return c.view(*a.shape[:-1], outer)


DEQUANT_TILE = (32, 128)
"""Rows and columns each program of ``dequantize`` writes (whole-word tiles)."""


def dequant_reason(weight: torch.Tensor) -> str | None:
    """Why ``dequantize`` cannot read this weight (None when it can)."""
    if not weight.is_contiguous() or weight.shape[-1] * weight.element_size() % 4:
        return "the packed weight is not contiguous whole int32 words"
    return None


def dequantize(fmt: str, weight: torch.Tensor, scale: torch.Tensor, global_scale: torch.Tensor | None,
               in_features: int, dtype: torch.dtype, out: torch.Tensor | None = None) -> torch.Tensor:
    """The dense ``[out, in]`` weight in ``dtype`` with the references' arithmetic (bit-equal to
    them): decoded from whole words as the GEMM decodes its tiles, or, for a shape those tiles do
    not fit, one thread per weight. Into ``out`` ([rows, in_features], rows contiguous) when given.
    Callers check ``dequant_reason``."""
    rows = weight.shape[0]
    words = weight.view(torch.int32)
    codes, group, scale_rows = gemv.layout(fmt, scale, in_features)
    if out is None:
        out = torch.empty((rows, in_features), dtype=dtype, device=weight.device)
    global_or_any = scale if global_scale is None else global_scale
    common = dict(FMT=gemv.FORMAT_CODES[fmt], CODES=codes, GROUP=group, SCALE_ROWS=scale_rows,
                  HAS_GLOBAL=global_scale is not None)
    if shape_reason(fmt, weight, scale, in_features) is not None:
        block_r, block_c = 16, 256
        _dequant_weights_kernel[(triton.cdiv(rows, block_r), triton.cdiv(in_features, block_c))](
            words, scale, global_or_any, out, rows, in_features, words.stride(0), scale.stride(0), out.stride(0),
            BLOCK_R=block_r, BLOCK_C=block_c, **common)
        return out
    block_n = DEQUANT_TILE[0]
    block_k = next(b for b in (DEQUANT_TILE[1], 64, 32) if in_features % b == 0)
    _dequant_tiles_kernel[(triton.cdiv(rows, block_n), in_features // block_k)](
        words, scale, global_or_any, out, rows, words.stride(0), scale.stride(0), out.stride(0),
        ROW_SCALE=group % block_k == 0, BLOCK_N=block_n, BLOCK_K=block_k, num_warps=4, **common)
    return out
