"""The packed-weight Triton kernels on the CPU, under Triton's interpreter, against the torch
references: the same checks the GPU tests make, at small shapes, so CI sees a broken kernel.

The interpreter runs in numpy (fp16 activations, no bf16) and ignores the tile and warp settings
that matter for speed; what it checks is the arithmetic: decoding, scales, masks, the split
reduction and its arrival counters.
"""

from __future__ import annotations

import os

import pytest
import torch

from orbit_kernels import packed_gemm, packed_gemv
from orbit_kernels._triton import triton
from orbit_kernels.fp_formats import dequant
from orbit_kernels.int4 import dequant_int4
from tests.test_kernels import _format_weights, _packed

pytestmark = pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                                reason="needs triton, under its interpreter (no GPU)")

FORMATS = ["int4", "fp8", "nvfp4"]


def _reference(fmt: str, args: tuple, global_scale, cols: int, dtype: torch.dtype) -> torch.Tensor:
    if fmt == "int4":
        return dequant_int4(*args, (args[0].shape[0], cols), dtype)
    return dequant(fmt, *args, global_scale, dtype)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows, cols", [(40, 256), (33, 160), (30, 208)])
def test_dequantize_is_the_reference_bit_for_bit(fmt, rows, cols):
    """Whole-word tiles, and at 208 columns (int4: 200, groups of 8) one thread per weight."""
    if fmt == "int4" and cols == 208:
        args, global_scale, cols = _packed(rows, 200, 8), None, 200
    else:
        args, global_scale, _ = _format_weights(fmt, rows, cols, "cpu")
    for dtype in (torch.float32, torch.float16):
        got = packed_gemm.dequantize(fmt, *args, global_scale, cols, dtype)
        assert torch.equal(got, _reference(fmt, args, global_scale, cols, dtype))


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("forward", [True, False])
def test_packed_gemm_both_ways_equals_the_reference(fmt, forward):
    """Default and swept tiles, split and not, swapped and not, and (forward) one dot per code
    position with the activations dealt out in registers."""
    rows, cols = 96, 384  # 96 outputs leave a partial 64-row tile; 384 inputs are three 128-column tiles
    args, global_scale, dense = _format_weights(fmt, rows, cols, "cpu")
    torch.manual_seed(0)
    for m in (3, 20):
        a = torch.randn(m, cols if forward else rows, dtype=torch.float16)
        reference = a.float() @ (dense.t() if forward else dense)
        for tiles, split in ((None, None), (packed_gemm.Tiles(16, 32, 64, 4, 2), 2),
                             (packed_gemm.Tiles(16, 64, 32, 4, 2, True), 1),
                             (packed_gemm.Tiles(16, 32, 128, 4, 2, True, True), 2),
                             (packed_gemm.Tiles(16, 64, 128, 4, 2, False, True), 1)):
            got = packed_gemm.packed_gemm(fmt, a, *args, cols, global_scale, forward=forward, tiles=tiles,
                                          split=split).float()
            torch.testing.assert_close(got, reference, atol=3e-3 * reference.abs().max().item(), rtol=1e-2)
    assert not packed_gemv.arrival_counters(a.device, 1).any()  # left at zero for the next launch


_TARGETS = packed_gemv.PREFETCH_TARGET_PROGRAMS, packed_gemv.TARGET_PROGRAMS
GEMV_VARIANTS = {  # X_SPLIT, IN_PLACE_NIBBLES, ONE_STEP, PREFETCH, PREFETCH_TARGET_PROGRAMS, TARGET_PROGRAMS
    "default": (True, True, True, True, *_TARGETS),
    "one row, a program a K step, a split of three": (True, True, True, True, *_TARGETS),
    "int4 a step ahead, two steps a program": (True, True, False, True, 8, packed_gemv.TARGET_PROGRAMS),
    "a step at a time, two steps a program": (True, True, False, False, packed_gemv.PREFETCH_TARGET_PROGRAMS, 8),
    "shifting decode": (True, False, True, True, *_TARGETS),
    "strided activations": (False, True, True, True, *_TARGETS),
}


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("variant", sorted(GEMV_VARIANTS))
def test_packed_gemv_with_a_split_reduction_equals_the_reference(fmt, variant, monkeypatch):
    """Both ways of reading the activations (one load a step dealt out by register splits, and a
    strided load per code position), both int4 decodes (in place, shifted down), and int4's plans:
    a program per K step (a split of three too), loads a step ahead over several steps a program."""
    names = ("X_SPLIT", "IN_PLACE_NIBBLES", "ONE_STEP", "PREFETCH", "PREFETCH_TARGET_PROGRAMS", "TARGET_PROGRAMS")
    for name, value in zip(names, GEMV_VARIANTS[variant]):
        monkeypatch.setattr(packed_gemv, name, value)
    # few output tiles: K is split over programs that meet through the counters
    rows, cols = 64, 384 if variant.endswith("three") else 2048
    args, global_scale, dense = _format_weights(fmt, rows, cols, "cpu")
    x = torch.randn(1 if variant.startswith("one row") else 3, cols, dtype=torch.float16)
    reference = x.float() @ dense.t()
    words = cols // packed_gemv.layout(fmt, args[1], cols)[0]
    plan = packed_gemv.plan(fmt, x.shape[0], -(-rows // packed_gemv.BLOCK_N), words)
    steps = words // plan.block_w // plan.split
    if variant.endswith("three"):  # int4: 48 words in steps of 16
        assert fmt != "int4" or plan[:3] == (16, 3, False)
    elif variant.startswith("int4 a step ahead"):  # the other formats keep the rule before
        assert plan.prefetch == (fmt == "int4") and (steps >= 2 or fmt != "int4")
    elif variant.startswith("a step at a time"):
        assert not plan.prefetch and steps >= 2
    else:
        assert plan.split > 1
    for _ in range(2):  # the counters are shared between launches: the first must leave them at zero
        got = packed_gemv.packed_gemv(fmt, x, *args, cols, global_scale).float()
        torch.testing.assert_close(got, reference, atol=3e-3 * reference.abs().max().item(), rtol=1e-2)
    assert not packed_gemv.arrival_counters(x.device, 1).any()


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("shape", ["many tiles", "long K"])
def test_packed_gemv_one_row_tiles_equal_the_reference(fmt, shape, monkeypatch):
    """One row's own tiles (``ONE_ROW_TILES``): an int4 linear of many output tiles in 16-row tiles
    (a ragged last one), and one of a long K in 4-row tiles over its whole K; the other formats keep
    their plans."""
    if shape == "many tiles":  # the gate/up-sized rule, at a size the interpreter runs quickly
        monkeypatch.setattr(packed_gemv, "STREAM_BELOW_TILES", 4)
        rows, cols = 72, 256
    else:
        rows, cols = 36, 4096
    args, global_scale, dense = _format_weights(fmt, rows, cols, "cpu")
    x = torch.randn(1, cols, dtype=torch.float16)
    words = cols // packed_gemv.layout(fmt, args[1], cols)[0]
    plan = packed_gemv.plan(fmt, 1, -(-rows // packed_gemv.BLOCK_N), words)
    if fmt == "int4":
        assert (plan.block_n, plan.split, plan.warps) == ((16, 1, 2) if shape == "many tiles" else (4, 1, 4))
    else:
        assert (plan.block_n, plan.warps) == (packed_gemv.BLOCK_N, packed_gemv.NUM_WARPS)
    reference = x.float() @ dense.t()
    got = packed_gemv.packed_gemv(fmt, x, *args, cols, global_scale).float()
    torch.testing.assert_close(got, reference, atol=3e-3 * reference.abs().max().item(), rtol=1e-2)


@pytest.mark.parametrize("rows", [5, 40, 70])
@pytest.mark.parametrize("rank, slots", [(16, 1), (8, 2), (4, 3)])
def test_lora_tile_kernels_equal_row_by_row_fp32(rows, rank, slots):
    """Stacked slots, each row keeping its own slot's columns, with and without an inner split."""
    from orbit_kernels import lora_tiles
    from tests.test_kernels import _lora_fp32

    torch.manual_seed(rows + rank)
    x = torch.randn(rows, 300, dtype=torch.float16)
    a, b = torch.randn(slots, rank, 300) * 0.05, torch.randn(slots, 130, rank) * 0.05
    for row_slot in (None, torch.randint(0, slots, (rows,))):
        use_a, use_b = (a, b) if row_slot is not None else (a[:1], b[:1])
        y = torch.randn(rows, 130, dtype=torch.float16)
        want = _lora_fp32(y, x, use_a, use_b, row_slot, 2.0)
        for split in (1, 3):
            got = y.clone()
            lora_tiles.launch_tiles(got, x, use_a, use_b, row_slot, 2.0, split=split)
            # t is rounded to fp16 once, as the reference rounds it; the rest accumulates in fp32
            torch.testing.assert_close(got.float(), want, atol=2e-3, rtol=2 ** -9)


def test_sampling_kernel_draws_the_softmax_and_its_logprobs():
    """Frequencies of 600 draws against softmax(logits / T) (the GPU test takes 200,000), and each
    draw's log-probability against torch's log-softmax; the same seed gives the same draws."""
    from tests.test_kernels import check_race_sampler

    check_race_sampler("cpu", rows=600, block_v=512)


def test_rope_kv_write_kernel_is_the_reference_bit_for_bit():
    """The decode key path: rotated keys and values land at each row's position of its cache row
    (a row-slice of a bigger cache, as the engine passes it), and nothing else is written."""
    from orbit_kernels.rope import launch_kv_write, rope_kv_write_reference

    torch.manual_seed(0)
    rows, heads, capacity, dim = 5, 2, 12, 16
    k = torch.randn(rows, 1, heads, dim, dtype=torch.float16).transpose(1, 2)  # as the attention's view
    v = torch.randn(rows, 1, heads, dim, dtype=torch.float16).transpose(1, 2)
    cos, sin = torch.randn(rows, 1, dim), torch.randn(rows, 1, dim)
    write_pos = torch.tensor([0, 11, 3, 3, 7])
    want_k = torch.randn(rows + 2, heads, capacity, dim, dtype=torch.float16)
    want_v = torch.randn(rows + 2, heads, capacity, dim, dtype=torch.float16)
    got_k, got_v = want_k.clone(), want_v.clone()
    rope_kv_write_reference(k, v, cos, sin, want_k[:rows], want_v[:rows], write_pos)
    launch_kv_write(k, v, cos, sin, got_k[:rows], got_v[:rows], write_pos)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)
    # k and v as column slices of one fused q/k/v output, as the engine's fused projection gives them
    qkv = torch.randn(rows, 1, 4 * heads * dim, dtype=torch.float16)
    k, v = (qkv[..., start:start + heads * dim].view(rows, 1, heads, dim).transpose(1, 2)
            for start in (2 * heads * dim, 3 * heads * dim))
    rope_kv_write_reference(k, v, cos, sin, want_k[:rows], want_v[:rows], write_pos)
    launch_kv_write(k, v, cos, sin, got_k[:rows], got_v[:rows], write_pos)
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_rms_norm_kernel_reads_rows_in_place_and_equals_the_reference():
    """Contiguous rows, and the heads of a column slice of a wider output (Qwen3's q/k norm on a
    fused q/k/v projection), which the kernel reads without a copy."""
    from orbit_kernels.rmsnorm import launch, rms_norm_reference, row_layout

    torch.manual_seed(0)
    w = torch.rand(64) + 0.5
    wide = torch.randn(3, 1, 6 * 64) * 3
    heads = wide[..., 64:4 * 64].view(3, 1, 3, 64)
    assert row_layout(heads)[1:] == (3, 6 * 64, 64)  # no copy
    for x in (torch.randn(5, 64) * 3, heads, heads.transpose(0, 2)):
        for rows_per_program in (None, 2, 4):  # several rows a program, as a prefill's head norms take them
            torch.testing.assert_close(launch(x, w, 1e-6, rows_per_program), rms_norm_reference(x, w, 1e-6),
                                       atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("rows", [3, 12, 40])
@pytest.mark.parametrize("slots", [1, 2])
def test_grouped_lora_kernels_equal_row_by_row_fp32(rows, slots):
    """Three linears of one input (q/k/v-like widths 130, 70, 70) in one launch of each kernel,
    the row kernels and the tile kernels: each output gets its own linear's update only."""
    from orbit_kernels import lora, lora_tiles
    from tests.test_kernels import _lora_fp32

    torch.manual_seed(rows + slots)
    rank, width = 8, 300
    x = torch.randn(rows, width, dtype=torch.float16)
    stacked_a = torch.randn(slots, 3 * rank, width) * 0.05  # as the engine may store them: one buffer
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(3)]
    bs = [torch.randn(slots, n, rank) * 0.05 for n in (130, 70, 70)]
    row_slot = torch.randint(0, slots, (rows,)) if slots > 1 else None
    ys = [torch.randn(rows, n, dtype=torch.float16) for n in (130, 70, 70)]
    wants = [_lora_fp32(y, x, a, b, row_slot, 2.0) for y, a, b in zip(ys, as_, bs)]
    for launch in (lora.launch_groups, lora_tiles.launch_tile_groups):
        got = [y.clone() for y in ys]
        launch(got, x, as_, bs, row_slot, 2.0)
        for g, want in zip(got, wants):
            torch.testing.assert_close(g.float(), want, atol=2e-3, rtol=2 ** -9)


@pytest.mark.parametrize("slots", [1, 2])
def test_dense_lora_linear_writes_the_update_then_adds_the_product(slots):
    """``orbit::dense_lora_linear``'s kernels (the tile expand writing the update into a fresh output,
    then ``addmm_`` adding the base product onto it) and its unfused reference, each against fp32,
    for a q/k/v-like group of three widths and for one linear: every output column gets its own
    linear's update, every row its own slot's."""
    from orbit_kernels import dense_lora
    from tests.test_kernels import _lora_fp32

    torch.manual_seed(slots)
    rows, width, rank = 40, 96, 8
    x = torch.randn(rows, width, dtype=torch.float16)
    stacked_a = torch.randn(slots, 3 * rank, width) * 0.05
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(3)]
    bs = [torch.randn(slots, n, rank) * 0.05 for n in (130, 70, 70)]
    weight = (torch.randn(270, width) * 0.1).to(torch.float16)
    row_slot = torch.randint(0, slots, (rows,)) if slots > 1 else None
    for linears in (3, 1):
        out = sum(b.shape[1] for b in bs[:linears])
        product = x.float() @ weight[:out].float().t()
        want = torch.cat([_lora_fp32(y, x, a, b, row_slot, 2.0) for y, a, b in
                          zip(product.split([b.shape[1] for b in bs[:linears]], dim=1), as_, bs)], dim=1)
        for impl in (dense_lora.launch, dense_lora.dense_lora_reference):
            got = impl(x, weight[:out], as_[:linears], bs[:linears], row_slot, 2.0)
            assert got.shape == (rows, out) and got.dtype == x.dtype
            torch.testing.assert_close(got.float(), want, atol=4e-3, rtol=2 ** -8)


def test_silu_mul_kernel_reads_column_slices_and_equals_the_reference():
    """Gate and up as two tensors, and as the two halves of one fused gate/up output."""
    from orbit_kernels.silu_mul import BLOCK, launch, silu_mul_reference

    torch.manual_seed(0)
    fused = torch.randn(3, 2, 2 * (BLOCK + 40), dtype=torch.float16) * 4  # a ragged second block
    halves = fused.split(BLOCK + 40, dim=-1)
    for gate, up in (halves, (halves[0].contiguous(), halves[1].contiguous())):
        torch.testing.assert_close(launch(gate, up), silu_mul_reference(gate, up), atol=1e-3, rtol=2 ** -9)


def test_add_rms_norm_kernel_equals_the_unfused_add_and_norm():
    from orbit_kernels.rmsnorm import add_rms_norm_reference, launch_add

    torch.manual_seed(0)
    x, delta = torch.randn(4, 1, 96, dtype=torch.float16) * 3, torch.randn(4, 1, 96, dtype=torch.float16)
    w = (torch.rand(96) + 0.5).to(torch.float16)
    want_h, want_normed = add_rms_norm_reference(x, delta, w, 1e-6)
    for rows_per_program in (None, 4):
        h, normed = launch_add(x, delta, w, 1e-6, rows_per_program)
        assert torch.equal(h, want_h)  # the residual rounds as the unfused add does
        torch.testing.assert_close(normed, want_normed, atol=1e-3, rtol=2 ** -9)


@pytest.mark.parametrize("unrolled", [True, False])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_over_any_chunking_equals_the_reference(dtype, unrolled, monkeypatch):
    """Each row's keys up to its length, in chunks ending mid-block, in one chunk, or past the length;
    the chunks merged in straight-line code or in a loop."""
    from orbit_kernels import decode_attention as attention

    monkeypatch.setattr(attention, "MERGE_UNROLLED", unrolled)
    torch.manual_seed(0)
    rows, heads, kv_heads, capacity, dim = 3, 4, 2, 40, 64
    q = torch.randn(rows, heads, dim).to(dtype)
    k = torch.randn(rows + 1, kv_heads, capacity, dim).to(dtype)[:rows]  # a row slice, as the engine passes
    v = torch.randn(rows + 1, kv_heads, capacity, dim).to(dtype)[:rows]
    lengths = torch.tensor([0, capacity - 1, 17])
    want = attention.decode_attention_reference(q.float(), k.float(), v.float(), lengths)
    for config in (attention.Config(), attention.Config(16, 16), attention.Config(32, 16), attention.Config(8, 16)):
        got = attention.launch(q, k, v, lengths, config).float()
        torch.testing.assert_close(got, want, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_decode_attention_in_one_pass_is_the_merged_chunk_bit_for_bit(dtype, monkeypatch):
    """One chunk per (row, KV head): the chunk kernel's own output store against its partials merged
    by the merge kernel, rows ending at the first key, mid-block and at the capacity."""
    from orbit_kernels import decode_attention as attention

    torch.manual_seed(1)
    rows, heads, kv_heads, capacity, dim = 3, 6, 2, 40, 64
    q = torch.randn(rows, heads, dim).to(dtype)
    k, v = (torch.randn(rows, kv_heads, capacity, dim).to(dtype) for _ in range(2))
    lengths = torch.tensor([0, 17, capacity - 1])
    config = attention.Config(64, 16)  # one chunk covers the capacity
    merged = {}
    for one_pass in (False, True):
        monkeypatch.setattr(attention, "ONE_PASS", one_pass)
        merged[one_pass] = attention.launch(q, k, v, lengths, config)
    assert torch.equal(merged[True], merged[False])
    want = attention.decode_attention_reference(q.float(), k.float(), v.float(), lengths)
    torch.testing.assert_close(merged[True].float(), want, atol=2e-3 if dtype == torch.float16 else 1e-5, rtol=1e-3)



@pytest.mark.parametrize("norm", [True, False])
def test_decode_qk_reading_weights_and_tables_early_changes_no_bit(norm, monkeypatch):
    """``qk_rope.EARLY_TABLES`` only moves the frozen reads (norm weights, rope rows, positions)
    ahead of the projections: q and the cache writes equal the kernel that reads them after."""
    from orbit_kernels import qk_rope

    torch.manual_seed(3)
    rows, heads, kv_heads, dim, capacity = 3, 4, 2, 16, 9
    q, k, v = (torch.randn(rows, 1, n, dim, dtype=torch.float16) * 3 for n in (heads, kv_heads, kv_heads))
    weights = [(torch.rand(dim) + 0.5).to(torch.float16) for _ in range(2)] if norm else [None, None]
    cos, sin = torch.randn(rows, 1, dim), torch.randn(rows, 1, dim)
    write_pos = torch.tensor([0, 8, 3])
    runs = []
    for early in (True, False):
        monkeypatch.setattr(qk_rope, "EARLY_TABLES", early)
        cache_k, cache_v = torch.zeros(rows, kv_heads, capacity, dim, dtype=torch.float16), torch.zeros(
            rows, kv_heads, capacity, dim, dtype=torch.float16)
        runs.append((qk_rope.launch(q, k, v, *weights, 1e-6, cos, sin, cache_k, cache_v, write_pos), cache_k, cache_v))
    assert runs[0][1].abs().sum() > 0
    for got, want in zip(runs[0], runs[1]):
        assert torch.equal(got, want)


def test_add_norm_shrink_reading_its_weight_early_changes_no_bit(monkeypatch):
    """``norm_shrink.EARLY_GAMMA`` reads the norm weight with A: the same residual, normed rows and t."""
    from orbit_kernels import norm_shrink

    torch.manual_seed(4)
    rows, cols, rank = 2, 160, 8
    x, delta = torch.randn(rows, cols, dtype=torch.float16), torch.randn(rows, cols, dtype=torch.float16)
    weight = (torch.rand(cols) + 0.5).to(torch.float16)
    as_ = [torch.randn(1, rank, cols) * 0.1 for _ in range(3)]
    runs = []
    for early in (True, False):
        monkeypatch.setattr(norm_shrink, "EARLY_GAMMA", early)
        runs.append(norm_shrink.launch(x, delta, weight, 1e-6, as_, None))
    for got, want in zip(*runs):
        assert torch.equal(got, want)

@pytest.mark.parametrize("with_slots", [False, True])
def test_embed_norm_shrink_equals_the_add_kernel_on_looked_up_rows(with_slots):
    """``launch_embed`` reads each row's token row of the table itself: bit for bit what the add
    kernel computes on the looked-up rows plus zero, and its op on the CPU is the reference
    (lookup, norm, then an fp32 shrink row by row)."""
    from orbit_kernels import norm_shrink

    torch.manual_seed(7)
    vocab, cols, rank, slots = 50, 160, 8, 2
    table = torch.randn(vocab, cols, dtype=torch.float16)
    ids = torch.tensor([[7], [0], [49]])
    weight = (torch.rand(cols) + 0.5).to(torch.float16)
    as_ = [torch.randn(slots, rank, cols) * 0.1 for _ in range(3)]
    row_slot = torch.tensor([1, 0, 1]) if with_slots else None
    looked_up = table[ids]
    got = norm_shrink.launch_embed(ids, table, weight, 1e-6, as_, row_slot)
    want = norm_shrink.launch(looked_up, torch.zeros_like(looked_up), weight, 1e-6, as_, row_slot)
    assert got[0].shape == got[1].shape == (3, 1, cols) and torch.equal(got[0], looked_up)
    for a, b in zip(got, want):
        assert torch.equal(a, b)
    x, normed, t = norm_shrink.embed_rms_norm_shrink(ids, table, weight, 1e-6, as_, row_slot)
    assert torch.equal(x, looked_up)
    torch.testing.assert_close(normed, got[1], atol=2e-3, rtol=2 ** -9)
    for i in range(3):
        s = 0 if row_slot is None else int(row_slot[i])
        torch.testing.assert_close(t[i], torch.cat([normed[i, 0].float() @ a[s].t() for a in as_]), atol=1e-4, rtol=1e-4)


def test_rope_kernel_over_row_tiles_is_the_reference_bit_for_bit():
    """One row a program (a decode step) and tiles of rows (a prefill), on the attention's
    transposed view, a ragged last tile included."""
    from orbit_kernels.rope import apply_rope_reference, launch

    torch.manual_seed(0)
    batch, seq, heads, dim = 2, 5, 3, 16
    x = torch.randn(batch, seq, heads, dim, dtype=torch.float16).transpose(1, 2)
    cos, sin = torch.randn(batch, seq, dim), torch.randn(batch, seq, dim)
    want = apply_rope_reference(x, cos, sin)
    for rows_per_program in (None, 1, 4, 8):
        assert torch.equal(launch(x, cos, sin, rows_per_program), want)


@pytest.mark.parametrize("norm", [True, False])
def test_decode_qk_kernel_equals_the_unfused_reference(norm):
    """Qwen3's q/k norms (or none), rope on both, the key and value stored at each row's position:
    q, k and v as column views of one fused q/k/v output, the cache a row slice of a bigger one."""
    from orbit_kernels.qk_rope import decode_qk_reference, launch

    torch.manual_seed(0)
    rows, heads, kv_heads, dim, capacity = 3, 4, 2, 16, 9
    qkv = torch.randn(rows, 1, (heads + 2 * kv_heads) * dim, dtype=torch.float16) * 3
    q = qkv[..., :heads * dim].view(rows, 1, heads, dim)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(rows, 1, kv_heads, dim)
    v = qkv[..., (heads + kv_heads) * dim:].view(rows, 1, kv_heads, dim)
    weights = [(torch.rand(dim) + 0.5).to(torch.float16) for _ in range(2)] if norm else [None, None]
    cos, sin = torch.randn(rows, 1, dim), torch.randn(rows, 1, dim)
    write_pos = torch.tensor([0, 8, 3])
    want_k = torch.randn(rows + 2, kv_heads, capacity, dim, dtype=torch.float16)
    want_v = torch.randn(rows + 2, kv_heads, capacity, dim, dtype=torch.float16)
    got_k, got_v = want_k.clone(), want_v.clone()
    want_q = decode_qk_reference(q, k, v, *weights, 1e-6, cos, sin, want_k[:rows], want_v[:rows], write_pos)
    got_q = launch(q, k, v, *weights, 1e-6, cos, sin, got_k[:rows], got_v[:rows], write_pos)
    assert got_q.shape == want_q.shape == (rows, heads, 1, dim)
    # the fp32 sum of squares in another order: at most a rounding step of the normed value
    close = dict(atol=2e-3, rtol=2 ** -9) if norm else dict(atol=0, rtol=0)
    torch.testing.assert_close(got_q, want_q, **close)
    torch.testing.assert_close(got_k, want_k, **close)
    assert torch.equal(got_v, want_v)


@pytest.mark.parametrize("early", [True, False])
def test_decode_qk_kernel_reading_the_whole_tables_equals_it_on_gathered_rows(early, monkeypatch):
    """Given the whole rope tables, each row reads its rows at its write position: the same q and
    cache writes, bit for bit, as with the rows gathered first, and the reference agrees."""
    from orbit_kernels import qk_rope

    monkeypatch.setattr(qk_rope, "EARLY_TABLES", early)
    torch.manual_seed(5)
    rows, heads, kv_heads, dim, capacity = 3, 4, 2, 16, 9
    q, k, v = (torch.randn(rows, 1, n, dim, dtype=torch.float16) * 3 for n in (heads, kv_heads, kv_heads))
    weights = [(torch.rand(dim) + 0.5).to(torch.float16) for _ in range(2)]
    cos_table, sin_table = torch.randn(capacity, dim), torch.randn(capacity, dim)
    write_pos = torch.tensor([0, 8, 3])
    runs = []
    for cos, sin in ((cos_table, sin_table), (cos_table[write_pos][:, None], sin_table[write_pos][:, None])):
        cache_k, cache_v = (torch.zeros(rows, kv_heads, capacity, dim, dtype=torch.float16) for _ in range(2))
        runs.append((qk_rope.launch(q, k, v, *weights, 1e-6, cos, sin, cache_k, cache_v, write_pos), cache_k, cache_v))
    assert runs[0][1].abs().sum() > 0
    for got, want in zip(*runs):
        assert torch.equal(got, want)
    cache_k, cache_v = (torch.zeros(rows, kv_heads, capacity, dim, dtype=torch.float16) for _ in range(2))
    want_q = qk_rope.decode_qk_reference(q, k, v, *weights, 1e-6, cos_table, sin_table, cache_k, cache_v, write_pos)
    torch.testing.assert_close(runs[0][0], want_q, atol=2e-3, rtol=2 ** -9)
    torch.testing.assert_close(runs[0][1], cache_k, atol=2e-3, rtol=2 ** -9)


def test_counted_sampler_keys_each_call_by_base_plus_counter_and_steps_it():
    """``launch(counted=True)`` on ``[base, counter]`` draws what the seeded kernel draws at
    ``base + counter`` and steps the counter once a call; the op's CPU path (the reference) steps it too."""
    from orbit_kernels import sampling

    torch.manual_seed(6)
    logits = (torch.randn(40, 600) * 2).to(torch.float16)
    state = torch.tensor([1000, 7])
    first = sampling.launch(logits, 0.8, state, block_v=512, counted=True)
    assert state.tolist() == [1000, 8]
    second = sampling.launch(logits, 0.8, state, block_v=512, counted=True)
    assert state.tolist() == [1000, 9]
    for got, seed in ((first, 1007), (second, 1008)):
        want = sampling.launch(logits, 0.8, torch.tensor([seed]), block_v=512)
        assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])
    assert not torch.equal(first[0], second[0])
    tokens, logprobs = sampling.sample_race_(logits, 0.8, state)
    assert state.tolist() == [1000, 10]
    want = torch.log_softmax(logits.float() / 0.8, -1).gather(-1, tokens[:, None])[:, 0]
    torch.testing.assert_close(logprobs, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("fmt", FORMATS)
@pytest.mark.parametrize("rows, slots, widths, bias", [(1, 1, (64, 32, 32), False), (3, 2, (64, 32, 32), True),
                                                        (2, 2, (128,), True), (12, 2, (64, 32, 32), True),
                                                        (20, 3, (128,), False)])
def test_packed_kernels_with_the_lora_epilogue_equal_row_by_row_fp32(fmt, rows, slots, widths, bias):
    """A fused q/k/v-like group and a single linear, through the GEMV (up to 4 rows) and the packed
    GEMM (12 and 20 rows): every output gets its own linear's update, for its row's slot, once,
    with K split over programs (the update joins one split's partials)."""
    from orbit_kernels import packed_lora
    from tests.test_kernels import _lora_fp32

    torch.manual_seed(rows + slots)
    cols, rank = 2048, 8
    args, global_scale, dense = _format_weights(fmt, sum(widths), cols, "cpu")
    assert packed_gemv._split(-(-sum(widths) // packed_gemv.BLOCK_N), cols // packed_gemv.layout(fmt, args[1], cols)[0],
                              packed_gemv.BLOCK_W) > 1
    x = torch.randn(rows, cols, dtype=torch.float16)
    stacked_a = torch.randn(slots, len(widths) * rank, cols) * 0.02  # the engine's slot bank: one buffer
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(len(widths))]
    bs = [torch.randn(slots, n, rank) * 0.05 for n in widths]
    row_slot = torch.randint(0, slots, (rows,)) if slots > 1 else None
    b = torch.randn(sum(widths), dtype=torch.float16) if bias else None
    base = x.float() @ dense.t() + (0 if b is None else b.float())
    want = torch.cat([_lora_fp32(part, x, a, bb, row_slot, 2.0)
                      for part, a, bb in zip(base.split(widths, dim=-1), as_, bs)], dim=-1)
    got = packed_lora.launch(x, *args, global_scale, b, fmt, cols, as_, bs, row_slot, 2.0).float()
    torch.testing.assert_close(got, want, atol=3e-3 * want.abs().max().item(), rtol=1e-2)
    assert not packed_gemv.arrival_counters(x.device, 1).any()


@pytest.mark.parametrize("rows, slots", [(1, 1), (3, 2)])
def test_gemv_reading_the_lora_factors_ahead_changes_no_bit(rows, slots, monkeypatch):
    """``packed_gemv.LORA_AHEAD`` moves only the expand's loads (B before the PDL wait when no row
    slots are read, t with the activations): the output equals the kernel that reads both after
    its K loop, bit for bit, with one adapter and with a slot per row."""
    from orbit_kernels import packed_lora

    torch.manual_seed(rows)
    cols, rank, widths = 2048, 8, (64, 32, 32)
    args, global_scale, _ = _format_weights("int4", sum(widths), cols, "cpu")
    x = torch.randn(rows, cols, dtype=torch.float16)
    as_ = [torch.randn(slots, rank, cols) * 0.02 for _ in widths]
    bs = [torch.randn(slots, n, rank) * 0.05 for n in widths]
    row_slot = torch.randint(0, slots, (rows,)) if slots > 1 else None
    outputs = []
    for ahead in (True, False):
        monkeypatch.setattr(packed_gemv, "LORA_AHEAD", ahead)
        outputs.append(packed_lora.launch(x, *args, global_scale, None, "int4", cols, as_, bs, row_slot, 2.0))
    assert outputs[0].abs().max() > 0
    assert torch.equal(outputs[0], outputs[1])


@pytest.mark.parametrize("rows, groups, with_slots", [(1, 3, False), (3, 2, True), (4, 1, False)])
def test_add_norm_shrink_kernel_equals_the_add_norm_and_row_by_row_shrink(rows, groups, with_slots):
    """The fused kernel against ``add_rms_norm``'s reference for the new residual and the normed
    rows, and against an fp32 product row by row for ``t``, each row with its own slot's A; the
    groups' A are views of one stacked tensor, as the engine's fused q/k/v keeps them."""
    from orbit_kernels import norm_shrink
    from orbit_kernels.rmsnorm import add_rms_norm_reference

    torch.manual_seed(rows + groups)
    cols, rank, slots = 160, 8, 3
    x, delta = torch.randn(rows, cols, dtype=torch.float16), torch.randn(rows, cols, dtype=torch.float16)
    weight = (torch.rand(cols) + 0.5).to(torch.float16)
    stacked = torch.randn(groups, slots, rank, cols) * 0.1
    as_ = [stacked[g] for g in range(groups)]
    row_slot = torch.randint(0, slots, (rows,)) if with_slots else None
    h, normed, t = norm_shrink.launch(x, delta, weight, 1e-6, as_, row_slot)
    want_h, want_normed = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(normed, want_normed, atol=2e-3, rtol=2e-3)  # the sum of squares' order
    for i in range(rows):
        s = 0 if row_slot is None else int(row_slot[i])
        want = torch.cat([normed[i].float() @ a[s].t() for a in as_])
        torch.testing.assert_close(t[i], want, atol=1e-4, rtol=1e-4)


def test_an_offered_shrink_serves_only_its_own_call():
    """Inside ``offer_shrink``, the shrink of the offered input by the offered factors returns the
    offered ``t``; a call with another input, other factors or other slots still computes its own."""
    from orbit_kernels import lora

    torch.manual_seed(0)
    x, other = torch.randn(2, 64, dtype=torch.float16), torch.randn(2, 64, dtype=torch.float16)
    a = torch.randn(2, 4, 64) * 0.1
    as_, row_slot = [a[:1]], None
    offered = torch.full((2, 4), 7.0)
    with lora.offer_shrink(x, as_, row_slot, offered):
        assert lora.shrink(x, [a[:1]], None) is offered  # a new view of the same factors
        for call in ((other, [a[:1]], None), (x, [a[1:]], None), (x, [a], torch.tensor([1, 0]))):
            got = lora.shrink(*call)
            assert not torch.equal(got, offered)
            slots = call[2] if call[2] is not None else torch.zeros(2, dtype=torch.long)
            want = torch.stack([call[0][i].float() @ call[1][0][slots[i]].t() for i in range(2)])
            torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    assert not torch.equal(lora.shrink(x, as_, row_slot), offered)  # the offer ends with the context


@pytest.mark.parametrize("rows, fused_columns, with_slots", [(1, True, False), (3, False, True), (4, True, True)])
def test_silu_mul_shrink_kernel_equals_silu_mul_and_row_by_row_shrink(rows, fused_columns, with_slots):
    """The fused kernel against ``silu_mul``'s reference for the product and an fp32 product row by
    row for ``t``, over more K steps than one (a width of 2.5 steps) and in one step, with gate and
    up as column slices of one fused output as the engine's gate/up GEMV leaves them."""
    from orbit_kernels import silu_shrink
    from orbit_kernels.silu_mul import silu_mul_reference

    torch.manual_seed(rows)
    cols, rank, slots = 80, 8, 3
    if fused_columns:
        both = torch.randn(rows, 2 * cols, dtype=torch.float16)
        gate, up = both[:, :cols], both[:, cols:]
    else:
        gate, up = torch.randn(rows, cols, dtype=torch.float16), torch.randn(rows, cols, dtype=torch.float16)
    a = torch.randn(slots, rank, cols) * 0.1
    row_slot = torch.randint(0, slots, (rows,)) if with_slots else None
    saved = silu_shrink.BLOCK_K, silu_shrink.ONE_STEP
    silu_shrink.BLOCK_K, silu_shrink.ONE_STEP = 32, False
    try:
        y, t = silu_shrink.launch(gate, up, a, row_slot)
        silu_shrink.ONE_STEP = True
        one_y, one_t = silu_shrink.launch(gate, up, a, row_slot)
    finally:
        silu_shrink.BLOCK_K, silu_shrink.ONE_STEP = saved
    assert torch.equal(one_y, y)
    torch.testing.assert_close(one_t, t, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y, silu_mul_reference(gate, up), atol=1e-3, rtol=1e-3)  # exp's last bits
    for i in range(rows):
        s = 0 if row_slot is None else int(row_slot[i])
        torch.testing.assert_close(t[i], y[i].float() @ a[s].t(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("rows, n, k", [(1, 45, 96), (3, 20, 4100)])
def test_dense_gemv_kernel_equals_an_fp32_product(rows, n, k):
    """A ragged last tile of output rows, and (4,100 wide) K steps with a ragged last one, against
    the fp32 product rounded once (the kernel's only rounding)."""
    from orbit_kernels import dense_gemv

    torch.manual_seed(0)
    x = torch.randn(rows, k, dtype=torch.float16)
    w = (torch.randn(n, k) * 0.05).to(torch.float16)
    got = dense_gemv.launch(x, w)
    want = (x.float() @ w.float().t()).to(torch.float16)
    assert got.shape == (rows, n)
    torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=2 ** -9)
    if rows == 1:  # and a zero row gives zeros: no element reads past its own row
        assert torch.equal(dense_gemv.launch(torch.zeros_like(x), w), torch.zeros(rows, n, dtype=torch.float16))


@pytest.mark.parametrize("norm", [True, False])
@pytest.mark.parametrize("table_rows,block", [(1, None), (2, None), (2, 2)])
def test_prefill_qk_kernel_equals_the_unfused_reference(norm, table_rows, block):
    """A prefill's q/k path: q, k and v as column views of one fused q/k/v output over 2 rows of 5
    tokens, the rope rows one per row or one broadcast, the cache two rows of a bigger one, in one
    block of tokens a program or in blocks of 2 (the last one partial). The keys and values land at
    positions 0..4 and nowhere else."""
    from orbit_kernels.qk_rope import launch_prefill, prefill_qk_reference

    torch.manual_seed(0)
    batch, tokens, heads, kv_heads, dim, capacity = 2, 5, 4, 2, 16, 9
    qkv = torch.randn(batch, tokens, (heads + 2 * kv_heads) * dim, dtype=torch.float16) * 3
    q = qkv[..., :heads * dim].view(batch, tokens, heads, dim)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(batch, tokens, kv_heads, dim)
    v = qkv[..., (heads + kv_heads) * dim:].view(batch, tokens, kv_heads, dim)
    weights = [(torch.rand(dim) + 0.5).to(torch.float16) for _ in range(2)] if norm else [None, None]
    cos, sin = torch.randn(table_rows, tokens, dim), torch.randn(table_rows, tokens, dim)
    want_k = torch.randn(batch + 2, kv_heads, capacity, dim, dtype=torch.float16)
    want_v = torch.randn(batch + 2, kv_heads, capacity, dim, dtype=torch.float16)
    got_k, got_v = want_k.clone(), want_v.clone()
    before = want_k.clone()
    want_q = prefill_qk_reference(q, k, v, *weights, 1e-6, cos, sin, want_k[1:batch + 1], want_v[1:batch + 1])
    got_q = launch_prefill(q, k, v, *weights, 1e-6, cos, sin, got_k[1:batch + 1], got_v[1:batch + 1], block)
    assert got_q.shape == want_q.shape == (batch, heads, tokens, dim)
    close = dict(atol=2e-3, rtol=2 ** -9) if norm else dict(atol=0, rtol=0)
    torch.testing.assert_close(got_q, want_q, **close)
    torch.testing.assert_close(got_k, want_k, **close)
    assert torch.equal(got_v, want_v)
    assert torch.equal(got_k[:, :, tokens:], before[:, :, tokens:]) and torch.equal(got_k[0], before[0])
