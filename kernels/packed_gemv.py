"""A few-row GEMV over packed weight codes, one kernel for int4, nvfp4 and fp8 block weights.

A decode step multiplies one to four activation rows by each weight, so the weight read is the
whole cost. The kernel reads the weight as int32 words of ``CODES`` codes (eight nibbles for
int4 and nvfp4, four bytes for fp8), in the checkpoint's own layout, and turns the codes into
floats with shifts and bit tricks in registers: no ``tl.dot`` (one row leaves a tensor-core tile
15/16 empty) and no reshape of the unpacked tile (a layout change through shared memory). The
activations of a K step come in one contiguous load, dealt out to the code positions by register
splits (``X_SPLIT``).

K is dealt out to ``SPLIT_K`` programs per output tile, because a decode-sized weight has too few
output tiles to keep every SM streaming. The split partial sums meet inside the same launch: each
program stores its fp32 partials, and the last program of a tile to arrive (an atomic counter)
adds them, writes the output and sets the tile's counter back to zero. The counters live in a
buffer per stream that launches share (``arrival_counters``), so a graphed decode step pays one
kernel per linear: not a GEMV, a sum and a cast, and no memset of fresh counters before each.

The references are the formats' dequantize functions (``dequant_int4``, ``dequant_nvfp4``,
``dequant_fp8_block``) followed by ``F.linear``; on the CPU those run instead.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from orbit_kernels import _triton, lora_groups
from orbit_kernels._triton import pdl_args, pdl_enter, tl, triton

ENABLED = True
"""Set False to force the references (benchmarks compare the two in one process)."""

MAX_ROWS = 4
"""Above this many rows the products stop being cheap beside the weight read; tl.dot kernels take over.
Measured again with one activation load per step (H200, int4, q/gate/down_proj summed): at 8 rows
this GEMV takes 47.2 us against the tiled GEMM's 38.4 (``packed_gemv_rows_h200.jsonl``,
``packed_gemm_rows_h200.jsonl``)."""
TARGET_PROGRAMS = 528
"""Four programs per SM of an H100 (132 SMs): enough loads in flight to cover HBM latency."""
BLOCK_N, BLOCK_W, NUM_WARPS = 8, 128, 4
"""Output rows and int32 words per program and K step, and its warps: the fastest of 18 settings
summed over q_proj, gate_proj and down_proj at one row (H200, Qwen3-1.7B shape;
``bench/packed_gemv_sweep.py``). Taking all eight codes of a word as one [BLOCK_N, BLOCK_W, 8]
tile instead measured 1.2-2.9x slower (``packed_gemv_sweep_3d_h200.jsonl``)."""
NUM_STAGES = 3
"""Software-pipeline stages of the K loop (Triton's default; a sweep setting)."""
FORMAT_CODES = {"int4": 0, "nvfp4": 1, "fp8": 2}
X_SPLIT = True
"""Load a K step's activations once, contiguously, and deal them out to the codes with register
splits; False: one strided load per code position, as before. int4 on an H200 with the default
tiles (``packed_gemv_x_split_h200.jsonl``, against False in the same run): 5-7% faster at one
row, 22-26% at four (q/k/v 11.21 -> 8.58 us, gate/up 29.14 -> 21.61, down 16.18 -> 12.61); fp8
within 3% either way. Scaling once per (row, scale group) of a step instead of once per word, on
top of this, was tried and removed: int4 3.5% faster summed over the four linears at one row, 2.7%
at four (down_proj 5% slower there), fp8 17-21% slower at four rows on three of the four
(``packed_gemv_group_scale_h200.jsonl``)."""
STRIDE_UNSPECIALIZED = True
"""Compile the kernel without Triton's divisibility specialization of the weight's row stride.
Specialized, Triton loads several words a thread and then moves every decoded code tile through
shared memory into the accumulator's layout (38 barriers in the kernel's PTX against 3 for int4
at one row, compiled for sm_90 by Triton 3.9); unspecialized, each thread loads one word a row,
already where the accumulator wants it. H200, summed over the engine's q/k/v, o, gate/up and down shapes, one process
(``packed_gemv_layouts_h200.jsonl``): int4 30.70 against 36.68 us at one row, 45.61 against
50.57 at four; fp8 55.05 against 57.24 and 74.04 against 76.02. False: the specialized build
(benchmarks compare)."""
ONE_ROW_BLOCK_W = True
"""At one row, 256 words a K step instead of ``BLOCK_W`` (the same sweep: int4 28.07 against
30.70 us summed; at four rows 256 words measured 49.60 against 45.61, so they keep ``BLOCK_W``)."""
IN_PLACE_NIBBLES = True
"""Decode int4 nibbles where they lie in the word (``code_at``): one AND-OR and a subtraction a
code, where shifting each nibble down first costs a shift and a bit-field extract more. H100, one
process, against False (``packed_gemv_in_place_h100.jsonl``, one row, 256 words): gate/up 8.88
against 10.87 us, down 9.47 against 10.43, o 3.22 against 3.33, q/k/v 5.94 against 5.36 (5.38 in
the run after). Decoding int4 + LoRA (``decode_throughput_gemv_in_place_h100.jsonl``): 592.8 and
606.9 tok/s (before and after) against 584.8 at batch 1, 1,785 and 1,832 against 1,752 at 4.
False: the shifting decode (benchmarks compare)."""
ONE_STEP = True
"""``plan``: at one row and below ``STREAM_BELOW_TILES`` int4 tiles, a program per K step. False:
``PREFETCH``'s plan there (benchmarks compare)."""
PREFETCH = True
"""Load each K step's words, scales and activations one step ahead, in registers, so that a program
iterating over K overlaps its loads with its arithmetic (Triton's pipeliner stages only loads that
feed a ``tl.dot``); where and with which tiles: ``plan``. H100, int4, Qwen3-1.7B shape, against
the rule before in one process (``packed_gemv_prefetch_h100.jsonl``, CUDA-graph replays of one
linear, before ``EARLY_READS``): at one row q/k/v 4.33 against 5.39 us, o 3.07 against 3.19, down
5.77 against 9.47; at four rows o 4.83 against 6.81, down 9.32 against 10.48, q/k/v 7.23 against
7.10. False: the rule before (benchmarks compare)."""
STREAM_BELOW_TILES = 1024
PREFETCH_TARGET_PROGRAMS = 264
NIBBLE = 0xF
"""The int4 code mask, passed at run time: as an immediate, ptxas rematerializes the five shifted
masks before every use (LOP3 takes one immediate). The K loop at one row, 256 words, compiled for
sm_90 by Triton 3.9: 649 SASS lines against 762 with the immediate, and 846 decoding shifted."""
ONE_ROW_TILES = True
"""``plan`` at one row, int4, from a sweep of 54 tile settings a linear on one H100 (rows of 4, 8 or
16 by 64, 128 or 256 words a K step, 2, 4 or 8 warps, with and without loads a step ahead;
``packed_gemv_tiles_h100.jsonl``, weights cycled past L2, launches under PDL):
- a linear of ``STREAM_BELOW_TILES`` 8-row tiles or more (gate/up, 12,288 x 2,048) in tiles of 16
  rows, 128 words a step and 2 warps: 7.11 against the plan's 8.82 us;
- a linear with more than 256 words of K (over 2,048 columns: down, 2,048 x 6,144) in tiles of 4
  rows over its whole K, 256 words a step, 4 warps: 4.58 against 5.96.
q/k/v and o keep ``ONE_STEP`` (the best settings there were within 4%: 3.09 against 3.19 and
2.22 against 2.31). Other models' shapes take the same rules, unmeasured. False: the plans
before (benchmarks compare)."""
LORA_AHEAD = True
"""The LoRA expand's factors read at the top of the kernel, not after the K loop: B (frozen during a
step) before the PDL wait with the first words when no row slots are read, else right after it;
``t`` right after the wait with the activations. So their memory round trip overlaps the
weight's instead of following the arithmetic on the way out. H100, decoding int4 + LoRA r16 at the
Qwen3-1.7B shape, on / off / on in one process (``decode_throughput_gemv_lora_ahead_h100.jsonl``):
767.8 / 753.2 / 767.0 tok/s at batch 1, 2,117 / 2,094 / 2,114 at 4. False: read after the loop
(benchmarks compare)."""
SHARED_COUNTERS = True
"""Set False to give every split launch fresh zeroed counters (a memset each; benchmarks compare)."""

if triton is not None:
    from orbit_kernels.lora import rows_delta, rows_delta_b, rows_delta_t

    @triton.jit
    def _decode(codes, FMT: tl.constexpr):
        if FMT == 0:
            # int4, offset by 8: OR the nibble into the mantissa of 2**23, subtract 2**23 + 8
            return (codes | 0x4B000000).to(tl.float32, bitcast=True) - 8388616.0
        elif FMT == 1:
            # e2m1: sign bit 3, exponent bits 2..1 (bias 1), mantissa bit 0; exponent 0 is 0 or 0.5
            mag = codes & 7
            exponent = mag >> 1
            mantissa = mag & 1
            bits = tl.where(exponent > 0, ((exponent + 126) << 23) | (mantissa << 22), mantissa * (126 << 23))
            return (bits | ((codes & 8) << 28)).to(tl.float32, bitcast=True)
        else:
            # e4m3: put exponent and mantissa where fp32 keeps them, then undo the bias (2**(127 - 7));
            # subnormal codes (exponent 0) are mantissa * 2**-9, computed apart so that a GPU that
            # flushes fp32 subnormals cannot zero them. (The NaN codes 0x7F / 0xFF, which no
            # quantizer writes, come out as +-480.)
            bits = ((codes & 0x7F) << 20) | ((codes & 0x80) << 24)
            normal = bits.to(tl.float32, bitcast=True) * 1.329227995784916e36
            sign = tl.where((codes & 0x80) != 0, -1.0, 1.0)
            return tl.where((codes & 0x78) == 0, sign * (codes & 7).to(tl.float32) * 0.001953125, normal)

    @triton.jit
    def deal8(xk, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """``xk [ROWS, 8 * BLOCK_W]`` dealt out by register splits to the eight code positions of
        a word: piece ``c`` holds columns ``8w + c`` (column 8w + 4a + 2b + c, split on a, b, c)."""
        s0, s1 = tl.split(tl.reshape(xk, (ROWS, BLOCK_W, 2, 2, 2)))
        s00, s01 = tl.split(s0)
        s10, s11 = tl.split(s1)
        x0, x4 = tl.split(s00)
        x2, x6 = tl.split(s01)
        x1, x5 = tl.split(s10)
        x3, x7 = tl.split(s11)
        return x0, x1, x2, x3, x4, x5, x6, x7

    @triton.jit
    def deal4(xk, ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """``deal8`` for four codes a word: piece ``c`` holds columns ``4w + c``."""
        s0, s1 = tl.split(tl.reshape(xk, (ROWS, BLOCK_W, 2, 2)))
        x0, x2 = tl.split(s0)
        x1, x3 = tl.split(s1)
        return x0, x1, x2, x3

    @triton.jit
    def code_at(words, nibble, c: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr, IN_PLACE: tl.constexpr):
        """Code ``c`` of every word, decoded to fp32. ``IN_PLACE`` (int4 only): the nibble is not
        shifted down. An exponent is ORed in above it that makes its lowest bit worth 1: nibble c
        sits at mantissa bits 4c..4c+3, so 2**(23 - 4c) + q comes out of one AND-OR, and
        subtracting 2**(23 - 4c) + 8 leaves q - 8 exactly. The mantissa holds nibbles 0-4; 5-7
        are shifted down 16 bits once (a shift every code can share)."""
        if FMT == 0 and IN_PLACE:
            if c < 5:
                at: tl.constexpr = c
                source = words
            else:
                at: tl.constexpr = c - 4
                source = words >> 16
            bits = (source & (nibble << (4 * at))) | ((150 - 4 * at) << 23)
            return bits.to(tl.float32, bitcast=True) - (2.0 ** (23 - 4 * at) + 8.0)
        return _decode((words >> (c * BITS)) & ((1 << BITS) - 1), FMT)

    @triton.jit
    def _code_product(tile, words, nibble, x, c: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr,
                      IN_PLACE: tl.constexpr):
        """``tile`` plus code ``c`` of every word times its activations ``x [ROWS, words]``."""
        w = code_at(words, nibble, c, BITS, FMT, IN_PLACE)
        return tile + w[None, :, :] * x.to(tl.float32)[:, None, :]

    @triton.jit
    def _four_codes(tile, words, nibble, xa, xb, xc, xd, FIRST: tl.constexpr, BITS: tl.constexpr, FMT: tl.constexpr,
                    IN_PLACE: tl.constexpr):
        """``_code_product`` for codes ``FIRST`` to ``FIRST + 3``, with their activations in order."""
        tile = _code_product(tile, words, nibble, xa, FIRST, BITS, FMT, IN_PLACE)
        tile = _code_product(tile, words, nibble, xb, FIRST + 1, BITS, FMT, IN_PLACE)
        tile = _code_product(tile, words, nibble, xc, FIRST + 2, BITS, FMT, IN_PLACE)
        return _code_product(tile, words, nibble, xd, FIRST + 3, BITS, FMT, IN_PLACE)

    @triton.jit
    def _weight_step(w_ptr, s_ptr, k0, offs_n, n_mask, stride_w, stride_s, CODES: tl.constexpr, GROUP: tl.constexpr,
                     SCALE_ROWS: tl.constexpr, BLOCK_W: tl.constexpr):
        """The words ``[BLOCK_N, BLOCK_W]`` and their fp32 scales of the K step at ``k0``."""
        offs_w = tl.arange(0, BLOCK_W)
        cols = k0 + offs_w * CODES  # a word never straddles two scale groups (GROUP % CODES == 0)
        words = tl.load(w_ptr + offs_n[:, None] * stride_w + (k0 // CODES + offs_w)[None, :], mask=n_mask[:, None],
                        other=0)
        scale = tl.load(s_ptr + (offs_n // SCALE_ROWS)[:, None] * stride_s + (cols // GROUP)[None, :],
                        mask=n_mask[:, None], other=0.0).to(tl.float32)
        return words, scale

    @triton.jit
    def _x_step(x_ptr, k0, rows, M, stride_xm, BLOCK_K: tl.constexpr):
        """The activations ``[ROWS, BLOCK_K]`` of the K step at ``k0``, in one contiguous load."""
        offs_k = tl.arange(0, BLOCK_K)
        return tl.load(x_ptr + rows[:, None] * stride_xm + (k0 + offs_k)[None, :],
                       mask=(rows[:, None] < M) & (offs_k < BLOCK_K)[None, :], other=0.0)

    @triton.jit
    def _next_step(words, scale, xk, x_ptr, w_ptr, s_ptr, k_next, K, offs_n, n_mask, rows, M, stride_xm, stride_w,
                   stride_s, CODES: tl.constexpr, GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr,
                   BLOCK_W: tl.constexpr):
        """The words, scales and activations of the K step at ``k_next``; past K, the ones given."""
        if k_next < K:
            words, scale = _weight_step(w_ptr, s_ptr, k_next, offs_n, n_mask, stride_w, stride_s, CODES, GROUP,
                                        SCALE_ROWS, BLOCK_W)
            xk = _x_step(x_ptr, k_next, rows, M, stride_xm, BLOCK_W * CODES)
        return words, scale, xk

    @triton.jit
    def _step_product(words, nibble, scale, xk, ROWS: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                      CODES: tl.constexpr, FMT: tl.constexpr, IN_PLACE: tl.constexpr):
        """One K step's ``[ROWS, BLOCK_N, BLOCK_W]`` products, scaled: every code of a word times its
        activation, summed over the word's codes, times the word's scale."""
        BITS: tl.constexpr = 32 // CODES
        tile = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
        if CODES == 8:
            x0, x1, x2, x3, x4, x5, x6, x7 = deal8(xk, ROWS, BLOCK_W)
            tile = _four_codes(tile, words, nibble, x0, x1, x2, x3, 0, BITS, FMT, IN_PLACE)
            tile = _four_codes(tile, words, nibble, x4, x5, x6, x7, 4, BITS, FMT, IN_PLACE)
        else:
            x0, x1, x2, x3 = deal4(xk, ROWS, BLOCK_W)
            tile = _four_codes(tile, words, nibble, x0, x1, x2, x3, 0, BITS, FMT, IN_PLACE)
        return tile * scale[None, :, :]

    @triton.jit(do_not_specialize=["stride_w"])  # see STRIDE_UNSPECIALIZED
    def _packed_gemv_kernel(x_ptr, w_ptr, s_ptr, gs_ptr, part_ptr, count_ptr, y_ptr, M, N, K, stride_xm, stride_w,
                            stride_s, stride_ym, t_ptr, b_ptr, slot_ptr, bias_ptr, scaling, R, stride_tm, stride_bn,
                            b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2, nibble,
                            FMT: tl.constexpr, ROWS: tl.constexpr, CODES: tl.constexpr,
                            GROUP: tl.constexpr, SCALE_ROWS: tl.constexpr, HAS_GLOBAL: tl.constexpr,
                            SPLIT_K: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr,
                            LORA: tl.constexpr, HAS_SLOTS: tl.constexpr, HAS_BIAS: tl.constexpr,
                            BLOCK_R: tl.constexpr, X_SPLIT: tl.constexpr, IN_PLACE: tl.constexpr = True,
                            PREFETCH: tl.constexpr = False, EARLY: tl.constexpr = False, PDL: tl.constexpr = False,
                            LORA_AHEAD: tl.constexpr = False):
        # Everything stays in the [BLOCK_N, BLOCK_W] layout of the loaded words: code c of every word
        # is taken at once, times the activations of column ``CODES * w + c``, and summed into a
        # [ROWS, BLOCK_N, BLOCK_W] accumulator; one reduction over words at the very end.
        BITS: tl.constexpr = 32 // CODES
        BLOCK_K: tl.constexpr = BLOCK_W * CODES
        pid_n, pid_k = tl.program_id(0), tl.program_id(1)
        offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
        offs_w = tl.arange(0, BLOCK_W)
        rows = tl.arange(0, ROWS)
        n_mask = offs_n < N
        # the row test is tensor-shaped: the Triton interpreter rejects a scalar in a mask
        x_mask = (rows[:, None] < M) & (offs_w[None, :] < BLOCK_W)
        acc = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
        k_first, k_step = pid_k * BLOCK_K, SPLIT_K * BLOCK_K
        if X_SPLIT:
            # The first step's words and scales are read before the wait (``EARLY_READS``): under
            # programmatic dependent launch these loads overlap the kernel before. The activations,
            # the LoRA factors and every write come after it.
            if not EARLY:
                pdl_enter(PDL)
            words, scale = _weight_step(w_ptr, s_ptr, k_first, offs_n, n_mask, stride_w, stride_s, CODES, GROUP,
                                        SCALE_ROWS, BLOCK_W)
            # ``LORA_AHEAD``: the expand's factors are read here, not after the K loop; B (frozen for
            # the step) with the words when no row slot has to be read first, t with the activations
            b_early: tl.constexpr = LORA_AHEAD and EARLY and not HAS_SLOTS
            lora_ranks = tl.where(pid_k == 0, R, 0)  # one split adds the update: the others read nothing
            if b_early:
                b_ahead = rows_delta_b(b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_bn, b_off1, b_off2, n1, n12,
                                       sbs0, sbs1, sbs2, HAS_SLOTS, BLOCK_R, lora_ranks)
            if EARLY:
                pdl_enter(PDL)
            if LORA_AHEAD and not b_early:
                b_ahead = rows_delta_b(b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_bn, b_off1, b_off2, n1, n12,
                                       sbs0, sbs1, sbs2, HAS_SLOTS, BLOCK_R, lora_ranks)
            if LORA_AHEAD:
                t_ahead = rows_delta_t(t_ptr, rows, offs_n, M, N, R, stride_tm, n1, n12, BLOCK_R, lora_ranks)
            xk = _x_step(x_ptr, k_first, rows, M, stride_xm, BLOCK_K)
            for k0 in range(k_first, K, k_step):
                if PREFETCH:  # the next step's loads go out before this step's arithmetic
                    ahead = _next_step(words, scale, xk, x_ptr, w_ptr, s_ptr, k0 + k_step, K, offs_n, n_mask, rows,
                                       M, stride_xm, stride_w, stride_s, CODES, GROUP, SCALE_ROWS, BLOCK_W)
                acc += _step_product(words, nibble, scale, xk, ROWS, BLOCK_N, BLOCK_W, CODES, FMT, IN_PLACE)
                if not PREFETCH:
                    ahead = _next_step(words, scale, xk, x_ptr, w_ptr, s_ptr, k0 + k_step, K, offs_n, n_mask, rows,
                                       M, stride_xm, stride_w, stride_s, CODES, GROUP, SCALE_ROWS, BLOCK_W)
                words, scale, xk = ahead
        else:
            pdl_enter(PDL)
            for k0 in range(k_first, K, k_step):
                words, scale = _weight_step(w_ptr, s_ptr, k0, offs_n, n_mask, stride_w, stride_s, CODES, GROUP,
                                            SCALE_ROWS, BLOCK_W)
                cols = k0 + offs_w * CODES
                tile = tl.zeros((ROWS, BLOCK_N, BLOCK_W), dtype=tl.float32)
                for c in tl.static_range(CODES):  # one strided load per code position
                    x = tl.load(x_ptr + rows[:, None] * stride_xm + (cols + c)[None, :], mask=x_mask, other=0.0)
                    tile = _code_product(tile, words, nibble, x, c, BITS, FMT, IN_PLACE)
                acc += tile * scale[None, :, :]
        acc = tl.sum(acc, axis=2)
        if HAS_GLOBAL:
            acc = acc / tl.load(gs_ptr).to(tl.float32)
        if LORA:
            if pid_k == 0:  # the LoRA update and the bias join one split's partials: the tile's sum has them once
                if LORA_AHEAD and X_SPLIT:
                    acc += scaling * tl.sum(t_ahead * b_ahead, axis=2)
                else:
                    acc += scaling * rows_delta(t_ptr, b_ptr, slot_ptr, rows, offs_n, M, N, R, stride_tm, stride_bn,
                                                b_off1, b_off2, n1, n12, sbs0, sbs1, sbs2, HAS_SLOTS, BLOCK_R)
                if HAS_BIAS:
                    acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        y_ptrs = y_ptr + rows[:, None] * stride_ym + offs_n[None, :]
        y_mask = (rows[:, None] < M) & n_mask[None, :]
        finish_split(acc, y_ptrs, y_mask, part_ptr, rows[:, None] * N + offs_n[None, :], ROWS * N, count_ptr, pid_n,
                     pid_k, SPLIT_K)

    _stride_specialized_kernel = triton.jit(_packed_gemv_kernel.fn)

    @triton.jit
    def finish_split(acc, y_ptrs, y_mask, part_ptr, offs, part_stride, count_ptr, tile, split_index,
                     SPLIT: tl.constexpr):
        """Store an output tile, or, with the reduction split over SPLIT programs, store this
        program's fp32 partials and let the tile's last arrival add all of them in a fixed order."""
        if SPLIT == 1:
            tl.store(y_ptrs, acc.to(y_ptrs.dtype.element_ty), mask=y_mask)
        else:
            tl.store(part_ptr + split_index * part_stride + offs, acc, mask=y_mask)
            # every thread's partials are written before the tile's counter moves (release), and
            # the last arrival sees all of them (acquire; .cg reads past the SM's own L1)
            tl.debug_barrier()
            arrived = tl.atomic_add(count_ptr + tile, 1, sem="acq_rel")
            if arrived == SPLIT - 1:
                total = tl.zeros_like(acc)
                for s in tl.static_range(SPLIT):
                    total += tl.load(part_ptr + s * part_stride + offs, mask=y_mask, other=0.0, cache_modifier=".cg")
                tl.store(y_ptrs, total.to(y_ptrs.dtype.element_ty), mask=y_mask)
                # every program of the tile has arrived: zero is what the next launch must find
                tl.atomic_xchg(count_ptr + tile, 0)


_COUNTERS: dict[tuple[str, int, int], torch.Tensor] = {}
_RETIRED: list[torch.Tensor] = []
"""Outgrown counter buffers: a captured CUDA graph may still point at one, so none is freed."""


_MADE_IN_CAPTURE: set[tuple[str, int, int]] = set()
"""Keys of counter buffers made while their stream was capturing a CUDA graph."""


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def arrival_counters(device: torch.device, tiles: int) -> torch.Tensor:
    """Zeroed int32 arrival counters for one split launch of ``tiles`` output tiles.

    Launches on one stream share a buffer: they run one after another, and each leaves its
    counters at zero (the last arrival of a tile resets it). Launches on different streams may run
    at once, so each stream has its own. Under graph capture the buffer is the capture stream's,
    and its address is baked into the graph.

    A buffer made during a capture comes from the graph's memory pool, and its zeroing is part of
    the graph: it holds whatever that memory held until the graph first replays. PyTorch hands
    out streams from a small pool, so a later stream can have a capture stream's id; the first
    launch outside a capture to get such a buffer zeroes it first. (A stale nonzero count makes
    the last arrival of a tile miss its turn, and the tile's output is never written.)
    """
    if not SHARED_COUNTERS:
        return torch.zeros(tiles, dtype=torch.int32, device=device)
    stream = torch.cuda.current_stream(device).stream_id if device.type == "cuda" else 0
    key = (device.type, device.index or 0, stream)
    buffer = _COUNTERS.get(key)
    if buffer is None or buffer.numel() < tiles:
        if buffer is not None:
            _RETIRED.append(buffer)
        buffer = _COUNTERS[key] = torch.zeros(max(tiles, 1024), dtype=torch.int32, device=device)
        if _capturing(device):
            _MADE_IN_CAPTURE.add(key)
        else:
            _MADE_IN_CAPTURE.discard(key)
    elif key in _MADE_IN_CAPTURE and not _capturing(device):  # the usual launch asks nothing more
        buffer.zero_()
        _MADE_IN_CAPTURE.discard(key)
    return buffer


FP8_BLOCK = 128
"""The block of compressed-tensors' FP8_BLOCK scheme, the one fp8 scheme Orbit loads."""


def layout(fmt: str, scale: torch.Tensor, in_features: int) -> tuple[int, int, int]:
    """(codes per int32 word, columns per scale, rows per scale) of a format as stored. fp8 blocks
    are the scheme's 128 x 128, not ``ceil(dim / scale columns)``: the two differ where a
    dimension is not a multiple of 128."""
    if fmt == "fp8":
        return 4, FP8_BLOCK, FP8_BLOCK
    return 8, in_features // scale.shape[-1], 1


def unserved_reason(fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, in_features: int) -> str | None:
    """Why the kernel cannot take this call of up to ``MAX_ROWS`` rows (None when it can)."""
    if x.dtype not in (torch.bfloat16, torch.float16):
        return f"activations are {x.dtype}"
    codes, group, _ = layout(fmt, scale, in_features)
    if in_features % (16 * codes) or group % codes:
        return f"in_features={in_features} or group={group} does not fit the kernel's {16 * codes}-column tiles"
    if not weight.is_contiguous():
        return "the packed weight is not contiguous"
    return None


def _split(tiles: int, k_words: int, block_w: int, target: int | None = None) -> int:
    split = max(1, min((target or TARGET_PROGRAMS) // tiles, k_words // block_w))
    return 1 << (split.bit_length() - 1)


class Plan(NamedTuple):
    block_w: int
    split: int
    prefetch: bool
    block_n: int = BLOCK_N
    warps: int = NUM_WARPS


def plan(fmt: str, rows: int, tiles: int, k_words: int) -> Plan:
    """Words a K step, programs a tile and whether to load a step ahead, for one call.

    int4 with fewer than ``STREAM_BELOW_TILES`` output tiles (the q/k/v, o and down projections of
    a 2,048-wide model) has few programs to hide memory behind, so it gets either of two plans.
    At one row, ``ONE_STEP`` (with ``_triton.PDL`` and ``EARLY_READS`` on): a program per K step
    of the widest tile, its whole weight slice loaded before the PDL wait, overlapping the kernel
    before. At two to four rows, ``PREFETCH``: a program per tile (``PREFETCH_TARGET_PROGRAMS``),
    several narrower K steps each, every step's loads issued a step ahead. With more tiles (gate/up) the waiting
    programs cover each other, and the rule before (one wide step, ``TARGET_PROGRAMS``) stays.

    H100, decoding int4 + LoRA r16 at the Qwen3-1.7B shape, one process
    (``decode_throughput_gemv_plans_h100.jsonl``): at batch 1, 646.9 and 658.4 tok/s (first and
    last run) with ``ONE_STEP`` against 623.3 with ``PREFETCH`` alone and 597.3 with the rule before
    and no early reads; at batch 4 ``ONE_STEP`` lost (1,708 against ``PREFETCH``'s 1,962 and the
    rule before's 1,866), so it is one row only. Bare int4: 784.4 / 786.8 against 760.6 and 746.6 at
    batch 1, ``PREFETCH`` 2,270 against 2,165 at 4.

    ``ONE_ROW_TILES`` comes first at one row: the two int4 shapes it names get their own tiles
    (``tiles`` counts ``BLOCK_N`` rows; the plan's ``block_n`` is the tile the launch uses)."""
    widest = 2 * BLOCK_W if ONE_ROW_BLOCK_W and rows == 1 else BLOCK_W
    fitting = lambda first, second: next(w for w in (first, second, 32, 16) if k_words % w == 0)  # noqa: E731
    if ONE_ROW_TILES and fmt == "int4" and rows == 1:
        if tiles >= STREAM_BELOW_TILES:
            return Plan(fitting(128, 64), 1, False, 16, 2)
        if k_words > 2 * BLOCK_W:
            return Plan(fitting(2 * BLOCK_W, BLOCK_W), 1, False, 4, 4)
    if fmt == "int4" and tiles < STREAM_BELOW_TILES:
        if ONE_STEP and _triton.PDL and _triton.EARLY_READS and rows == 1:
            block_w = fitting(widest, BLOCK_W)
            return Plan(block_w, k_words // block_w, False)
        if PREFETCH:
            block_w = fitting(64 if tiles >= 512 else 128, 32)
            split = _split(tiles, k_words, block_w, PREFETCH_TARGET_PROGRAMS)
            return Plan(block_w, split, k_words // block_w // split >= 2)
    block_w = fitting(widest, BLOCK_W)
    return Plan(block_w, _split(tiles, k_words, block_w), False)


class LoRAEpilogue(NamedTuple):
    """A LoRA update for ``packed_gemv`` to add to its output (``packed_lora``): ``t`` fp32
    ``[rows, groups * r]`` from the shrink, each group's ``B [slots, out_g, r]`` (their outputs laid
    end to end make the weight's rows), each row's slot or None, the scaling, and the linears' bias."""
    t: torch.Tensor
    bs: list[torch.Tensor]
    row_slot: torch.Tensor | None
    scaling: float
    bias: torch.Tensor | None


def epilogue_args(lora: LoRAEpilogue | None, y: torch.Tensor) -> tuple[tuple, dict]:
    """The kernel's LoRA arguments (unused placeholders when ``lora`` is None)."""
    if lora is None:
        return (y, y, y, y, 0.0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0), dict(LORA=False, HAS_SLOTS=False, HAS_BIAS=False,
                                                                        BLOCK_R=16)
    bs, r = lora.bs, lora.bs[0].shape[2]
    widths = [b.shape[1] for b in bs] + [0] * (3 - len(bs))
    offsets = lora_groups.offsets(bs)
    slot_strides = [b.stride(0) for b in bs] + [0] * (3 - len(bs))
    args = (lora.t, bs[0], y if lora.row_slot is None else lora.row_slot, y if lora.bias is None else lora.bias,
            lora.scaling, r, lora.t.stride(0), bs[0].stride(1), *offsets, widths[0], widths[0] + widths[1],
            *slot_strides)
    return args, dict(LORA=True, HAS_SLOTS=lora.row_slot is not None, HAS_BIAS=lora.bias is not None,
                      BLOCK_R=max(16, triton.next_power_of_2(r)))


def packed_gemv(fmt: str, x: torch.Tensor, weight: torch.Tensor, scale: torch.Tensor, in_features: int,
                global_scale: torch.Tensor | None = None, lora: LoRAEpilogue | None = None) -> torch.Tensor:
    """``x [..., in] @ W^T`` for up to ``MAX_ROWS`` rows (callers check ``unserved_reason`` first),
    plus ``lora``'s update and bias when given.

    ``weight`` as stored: int4 ``weight_packed`` int32 ``[out, in/8]``; nvfp4 ``weight_packed``
    uint8 ``[out, in/2]``; fp8 ``weight`` e4m3 ``[out, in]``. ``scale`` as stored (fp8: one per
    128x128 block); ``global_scale`` only for nvfp4.
    """
    out_features = weight.shape[0]
    rows = x.numel() // in_features
    flat = x.reshape(rows, in_features).contiguous()
    words = weight.view(torch.int32)
    codes, group, scale_rows = layout(fmt, scale, in_features)
    k_words = in_features // codes
    block_w, split, prefetch, block_n, warps = plan(fmt, rows, triton.cdiv(out_features, BLOCK_N), k_words)
    tiles = triton.cdiv(out_features, block_n)
    row_bucket = 1 << max(rows - 1, 0).bit_length()
    y = torch.empty((rows, out_features), dtype=x.dtype, device=x.device)
    part = count = y  # read only when K is split: then fp32 partials and per-tile arrival counters
    if split > 1:
        part = torch.empty((split, row_bucket, out_features), dtype=torch.float32, device=x.device)
        count = arrival_counters(x.device, tiles)
    lora_args, lora_flags = epilogue_args(lora, y)
    kernel = _packed_gemv_kernel if STRIDE_UNSPECIALIZED else _stride_specialized_kernel
    kernel[(tiles, split)](
        flat, words, scale, scale if global_scale is None else global_scale, part, count, y, rows, out_features,
        in_features, flat.stride(0), words.stride(0), scale.stride(0), y.stride(0), *lora_args, NIBBLE,
        FMT=FORMAT_CODES[fmt], ROWS=row_bucket, CODES=codes, GROUP=group, SCALE_ROWS=scale_rows,
        HAS_GLOBAL=global_scale is not None, SPLIT_K=split, BLOCK_N=block_n, BLOCK_W=block_w, **lora_flags,
        X_SPLIT=X_SPLIT, IN_PLACE=IN_PLACE_NIBBLES, PREFETCH=prefetch and X_SPLIT, EARLY=_triton.EARLY_READS,
        LORA_AHEAD=LORA_AHEAD and lora is not None and X_SPLIT,
        num_warps=warps, num_stages=NUM_STAGES, **pdl_args(y))
    return y.view(*x.shape[:-1], out_features)
