"""Triton kernels against their plain-torch references (GPU), and the dispatch points on the CPU."""

from __future__ import annotations

import pytest
import torch

from orbit_kernels import int4
from orbit_kernels.int4 import dequant_int4, int4_dequant, int4_linear
from orbit_kernels import lora, lora_tiles
from orbit_kernels import _triton, fp_formats, packed_gemm, packed_gemv
from orbit_kernels.packed_grad import packed_input_grad
from orbit_kernels.fp_formats import dequant, fp_linear
from orbit_kernels.decode_attention import decode_attention, decode_attention_reference
from orbit_kernels.lora import lora_add_, lora_add_reference
from orbit_kernels.rmsnorm import rms_norm, rms_norm_reference
from orbit_kernels.rope import apply_rope_reference, rope


def _packed(rows: int, cols: int, group: int, device: str = "cpu", scale_dtype=torch.float32):
    gen = torch.Generator().manual_seed(rows * 7 + cols)
    packed = torch.randint(-2**31, 2**31 - 1, (rows, cols // 8), dtype=torch.int32, generator=gen)
    scale = (torch.rand(rows, cols // group, generator=gen) * 0.02 + 1e-3).to(scale_dtype)
    return packed.to(device), scale.to(device)


def test_int4_pairs_serve_only_gpus_with_packed_bf16_fma(monkeypatch):
    """The pairs decode is inline PTX with ``fma.rn.bf16x2``: never on the CPU or under the
    interpreter, and on a GPU only from compute capability 8.0 (others keep the rounding decode)."""
    from types import SimpleNamespace

    assert not packed_gemm._pairs("int4", 128, 128, torch.zeros(2, 128))
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.setattr(_triton, "_MAJOR", {})
    on_gpu = SimpleNamespace(is_cuda=True, device=torch.device("cuda", 0))
    for capability, served in (((7, 5), False), ((9, 0), True)):
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda index, c=capability: c)
        _triton._MAJOR.clear()
        assert packed_gemm._pairs("int4", 128, 128, on_gpu) is served
        assert not packed_gemm._pairs("int4", 32, 128, on_gpu)  # a K step over two scale groups
        assert not packed_gemm._pairs("fp8", 128, 128, on_gpu)
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert not packed_gemm._pairs("int4", 128, 128, on_gpu)


def test_split_counters_made_during_a_capture_are_zeroed_before_eager_use(monkeypatch):
    """A split launch's arrival counters made while a CUDA graph is captured hold whatever the
    graph pool's memory held until the graph replays; a stream that later gets the capture stream's
    id (streams come from a small pool) must not count from there, or a tile's last arrival misses
    its turn and the output is never written. The first eager use zeroes such a buffer, once;
    nothing is zeroed eagerly while capturing."""
    monkeypatch.setattr(packed_gemv, "_COUNTERS", {})
    monkeypatch.setattr(packed_gemv, "_MADE_IN_CAPTURE", set())
    cpu = torch.device("cpu")
    monkeypatch.setattr(packed_gemv, "_capturing", lambda device: True)
    made = packed_gemv.arrival_counters(cpu, 8)
    made.fill_(5)  # the pool memory's leftovers
    assert packed_gemv.arrival_counters(cpu, 8) is made and made.eq(5).all()
    monkeypatch.setattr(packed_gemv, "_capturing", lambda device: False)
    assert packed_gemv.arrival_counters(cpu, 8) is made and not made.any()
    made.fill_(5)  # from here each launch leaves zeros: no second eager zeroing
    assert packed_gemv.arrival_counters(cpu, 8) is made and made.eq(5).all()
    grown = packed_gemv.arrival_counters(cpu, 4096)  # outgrown: a fresh zeroed buffer, made eagerly
    assert grown is not made and not grown.any() and not packed_gemv._MADE_IN_CAPTURE


def test_cpu_dispatch_runs_the_references():
    packed, scale = _packed(48, 256, 32)
    torch.testing.assert_close(int4_dequant(packed, scale, 256, torch.float32),
                               dequant_int4(packed, scale, (48, 256), torch.float32), atol=0, rtol=0)
    x = torch.randn(2, 3, 256)
    want = x @ dequant_int4(packed, scale, (48, 256), torch.float32).t()
    torch.testing.assert_close(int4_linear(x, packed, scale, 256), want, atol=1e-5, rtol=1e-5)


def test_ops_trace_without_data():
    packed, scale = _packed(48, 256, 32)
    compiled = torch.compile(lambda x: int4_linear(x, packed, scale, 256), backend="aot_eager", fullgraph=True)
    assert compiled(torch.randn(4, 256)).shape == (4, 48)


cuda = pytest.mark.skipif(not torch.cuda.is_available() or int4.triton is None, reason="needs CUDA and triton")


@cuda
@pytest.mark.parametrize("rows, cols, group, scale_dtype", [(512, 1024, 128, torch.float32), (300, 768, 32, torch.bfloat16),
                                                          (64, 2048, 64, torch.float32), (64, 200, 8, torch.float32)])
def test_dequant_kernel_equals_the_reference(rows, cols, group, scale_dtype):
    packed, scale = _packed(rows, cols, group, "cuda", scale_dtype)
    for dtype in (torch.bfloat16, torch.float32):
        torch.testing.assert_close(int4_dequant(packed, scale, cols, dtype),
                                   dequant_int4(packed, scale, (rows, cols), dtype), atol=0, rtol=0)


@cuda
@pytest.mark.parametrize("m", [1, 7, 16, 17, 32, 33, 300])
@pytest.mark.parametrize("rows, cols, group", [(512, 1024, 128), (384, 768, 32), (1000, 2048, 64), (4400, 512, 128)])
def test_linear_kernel_equals_the_reference_in_bf16(m, rows, cols, group):
    packed, scale = _packed(rows, cols, group, "cuda")
    x = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
    reference = (x.float() @ dequant_int4(packed, scale, (rows, cols), torch.bfloat16).float().t())
    got = int4_linear(x, packed, scale, cols).float()
    # bf16 output of an fp32-accumulated dot: within bf16 rounding of the reference
    tolerance = dict(atol=2e-2 * reference.abs().max().item() ** 0.5, rtol=1e-2)
    torch.testing.assert_close(got, reference, **tolerance)


def _fp_weights(fmt: str, rows: int, cols: int, device: str = "cpu"):
    gen = torch.Generator().manual_seed(rows + cols)
    if fmt == "fp8":
        codes = torch.randint(0, 256, (rows, cols), dtype=torch.uint8, generator=gen)
        codes[(codes & 0x7F) == 0x7F] = 0x38  # no NaN codes
        scale = torch.rand(-(-rows // 128), -(-cols // 128), generator=gen) * 0.01
        return codes.view(torch.float8_e4m3fn).to(device), scale.to(device), None
    packed = torch.randint(0, 256, (rows, cols // 2), dtype=torch.uint8, generator=gen)
    scale = (torch.rand(rows, cols // 16, generator=gen) * 4 + 0.5).to(torch.float8_e4m3fn)
    return packed.to(device), scale.to(device), torch.tensor([300.0], device=device)


def test_e2m1_codes_decode_to_the_format_table():
    codes = torch.arange(8, dtype=torch.int32)
    assert fp_formats.e2m1_magnitude(codes).tolist() == list(fp_formats.E2M1_VALUES)
    # and through the byte unpack: low nibble first, bit 3 the sign
    packed = torch.tensor([[0x71, 0x0A]], dtype=torch.uint8)
    assert fp_formats.unpack_fp4(packed).tolist() == [[0.5, 6.0, -1.0, 0.0]]


def test_fp_linear_on_cpu_is_the_reference_and_traces():
    for fmt in ("fp8", "nvfp4"):
        weight, scale, global_scale = _fp_weights(fmt, 40, 256)
        x = torch.randn(3, 256)
        want = x @ dequant(fmt, weight, scale, global_scale, torch.float32).t()
        torch.testing.assert_close(fp_linear(x, weight, scale, global_scale, fmt, 256), want, atol=1e-5, rtol=1e-5)
        compiled = torch.compile(lambda x: fp_linear(x, weight, scale, global_scale, fmt, 256), backend="aot_eager",
                                 fullgraph=True)
        assert compiled(x).shape == (3, 40)


def _replays_equal(call, reference: torch.Tensor, tolerance: dict) -> None:
    """Capture ``call`` in a CUDA graph and check three replays against ``reference``: a split
    kernel's arrival counters must start from zero on every replay."""
    call()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = call()
    for _ in range(3):
        out.zero_()
        graph.replay()
        torch.cuda.synchronize()
        torch.testing.assert_close(out.float(), reference, **tolerance)


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
@pytest.mark.parametrize("m", [1, 2, 3, 4])
@pytest.mark.parametrize("rows, cols", [(2048, 2048), (256, 6144), (300, 768), (4400, 512), (8200, 256)])
def test_packed_gemv_equals_each_formats_reference(fmt, m, rows, cols, monkeypatch):
    """The few-row kernel against dequantize-then-matmul in fp32, for splits from 1 to many (4400
    outputs leave one K split; 256 x 6144 many), also replayed from a CUDA graph; int4 at one row in
    ``ONE_ROW_TILES``' tiles too (8200 outputs: 16-row tiles, a ragged last one; 6144 columns: 4-row
    tiles over the whole K)."""
    if fmt == "int4":
        packed, scale = _packed(rows, cols, 128, "cuda", torch.bfloat16)
        args, dense = (packed, scale), dequant_int4(packed, scale, (rows, cols), torch.float32)
    else:
        weight, scale, global_scale = _fp_weights(fmt, rows, cols, "cuda")
        args, dense = (weight, scale), dequant(fmt, weight, scale, global_scale, torch.float32)
    x = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
    assert packed_gemv.unserved_reason(fmt, x, args[0], args[1], cols) is None
    reference = x.float() @ dense.t()
    tolerance = dict(atol=1e-2 * reference.abs().max().item(), rtol=1e-2)

    def call():
        return packed_gemv.packed_gemv(fmt, x, *args, cols, None if fmt != "nvfp4" else global_scale)

    first = call()
    torch.testing.assert_close(first.float(), reference, **tolerance)
    _replays_equal(call, reference, tolerance)
    # at the same tiles, loading a step ahead or not and the two int4 decodes (in place, shifted
    # down) change no value and no summation order: bit for bit the default's output
    chosen = packed_gemv.plan
    monkeypatch.setattr(packed_gemv, "plan", lambda *a: chosen(*a)._replace(prefetch=not chosen(*a).prefetch))
    assert torch.equal(call(), first)
    monkeypatch.setattr(packed_gemv, "plan", chosen)
    monkeypatch.setattr(packed_gemv, "IN_PLACE_NIBBLES", not packed_gemv.IN_PLACE_NIBBLES)
    assert torch.equal(call(), first)
    if fmt != "int4":  # and through the op the quantized linears call
        got = fp_linear(x, weight, scale, global_scale if fmt == "nvfp4" else None, fmt, cols)
        torch.testing.assert_close(got.float(), reference, **tolerance)


def _format_weights(fmt: str, rows: int, cols: int, device: str):
    """(stored tensors, global scale or None, the fp32 reference weight) of one format."""
    if fmt == "int4":
        packed, scale = _packed(rows, cols, 128 if cols % 128 == 0 else 32, device, torch.bfloat16)
        return (packed, scale), None, dequant_int4(packed, scale, (rows, cols), torch.float32)
    weight, scale, global_scale = _fp_weights(fmt, rows, cols, device)
    return (weight, scale), global_scale, dequant(fmt, weight, scale, global_scale, torch.float32)


def test_input_grad_on_cpu_is_the_reference_and_traces():
    for fmt in ("int4", "fp8", "nvfp4"):
        args, global_scale, dense = _format_weights(fmt, 40, 256, "cpu")
        grad = torch.randn(2, 3, 40)
        torch.testing.assert_close(packed_input_grad(grad, *args, global_scale, fmt, 256), grad @ dense,
                                   atol=1e-5, rtol=1e-5)
        compiled = torch.compile(lambda g: packed_input_grad(g, *args, global_scale, fmt, 256), backend="aot_eager",
                                 fullgraph=True)
        assert compiled(grad).shape == (2, 3, 256)


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
@pytest.mark.parametrize("m", [5, 20, 33, 256, 1000])
@pytest.mark.parametrize("rows, cols", [(2048, 2048), (300, 768), (4400, 512), (96, 160)])
def test_packed_gemm_forward_and_input_grad_equal_the_reference(fmt, m, rows, cols):
    """The tiled GEMM both ways against dequantize-then-matmul in fp32: its own split choice, an
    explicit split of the reduction, and through the ops the quantized linear calls."""
    args, global_scale, dense = _format_weights(fmt, rows, cols, "cuda")
    x = torch.randn(m, cols, device="cuda", dtype=torch.bfloat16)
    grad = torch.randn(m, rows, device="cuda", dtype=torch.bfloat16)
    assert packed_gemm.unserved_reason(fmt, x, args[0], args[1], cols) is None
    for forward, a, reference in ((True, x, x.float() @ dense.t()), (False, grad, grad.float() @ dense)):
        tolerance = dict(atol=1e-2 * reference.abs().max().item(), rtol=1e-2)
        for split in (None, 1, 4):
            got = packed_gemm.packed_gemm(fmt, a, *args, cols, global_scale, forward=forward, split=split)
            torch.testing.assert_close(got.float(), reference, **tolerance)
        if forward:
            got = (int4_linear(a, *args, cols) if fmt == "int4"
                   else fp_linear(a, *args, global_scale, fmt, cols))
        else:
            got = packed_input_grad(a, *args, global_scale, fmt, cols)
        torch.testing.assert_close(got.float(), reference, **tolerance)


@cuda
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("m", [5, 16, 32])
@pytest.mark.parametrize("rows, cols", [(2048, 2048), (300, 768), (2048, 6144)])
def test_int4_pairs_decode_matches_the_rounding_decode_and_the_reference(dtype, m, rows, cols):
    """The x-split forward decoding int4 in pairs (raw codes on the tensor cores, the group scale on
    the fp32 dot) against the decode that rounds each scaled weight first, and both against
    dequantize-then-matmul in fp32; a whole code range (0 and 15 at both pair positions) included."""
    packed, scale = _packed(rows, cols, 128, "cuda", torch.bfloat16)
    packed[0, :4] = torch.tensor([0, -1, 0x000F000F, 0x000F000F << 4], dtype=torch.int32)
    dense = dequant_int4(packed, scale, (rows, cols), torch.float32)
    x = torch.randn(m, cols, device="cuda", dtype=dtype)
    reference = x.float() @ dense.t()
    assert packed_gemm._pairs("int4", 128, 128, x)
    pairs = packed_gemm.packed_gemm("int4", x, packed, scale, cols).float()
    packed_gemm.INT4_PAIRS = False
    try:
        rounding = packed_gemm.packed_gemm("int4", x, packed, scale, cols).float()
    finally:
        packed_gemm.INT4_PAIRS = True
    scale_of_output = reference.abs().max().item()
    torch.testing.assert_close(pairs, reference, atol=5e-3 * scale_of_output, rtol=1e-2)
    torch.testing.assert_close(pairs, rounding, atol=1e-2 * scale_of_output, rtol=1e-2)
    assert (pairs - reference).abs().max() <= (rounding - reference).abs().max() * 1.5 + 1e-3 * scale_of_output


@cuda
def test_split_packed_gemm_replays_from_a_cuda_graph():
    args, _, dense = _format_weights("int4", 2048, 2048, "cuda")
    x = torch.randn(8, 2048, device="cuda", dtype=torch.bfloat16)
    reference = x.float() @ dense.t()

    _replays_equal(lambda: packed_gemm.packed_gemm("int4", x, *args, 2048, split=4), reference,
                   dict(atol=1e-2 * reference.abs().max().item(), rtol=1e-2))


@cuda
@pytest.mark.parametrize("fmt", ["fp8", "nvfp4"])
@pytest.mark.parametrize("rows, cols", [(300, 768), (2048, 2048), (129, 4096), (130, 208)])
def test_fp_dequant_kernel_is_the_reference_bit_for_bit(fmt, rows, cols):
    """From whole words (``packed_gemm.dequantize``) and, at 208 columns, one thread per weight."""
    weight, scale, global_scale = _fp_weights(fmt, rows, cols, "cuda")
    if fmt == "fp8":  # every subnormal code, both signs, and zero
        codes = weight.view(torch.uint8)
        codes[0, :16] = torch.arange(16, dtype=torch.uint8, device="cuda")
        codes[1, :16] = torch.arange(128, 144, dtype=torch.uint8, device="cuda")
    for dtype in (torch.float32, torch.bfloat16):
        torch.testing.assert_close(fp_formats.fp_dequant(weight, scale, global_scale, fmt, cols, dtype),
                                   dequant(fmt, weight, scale, global_scale, dtype), atol=0, rtol=0)
    x = torch.randn(33, cols, device="cuda", dtype=torch.bfloat16)  # the packed GEMM; at 208 columns dequant + cuBLAS
    want = x.float() @ dequant(fmt, weight, scale, global_scale, torch.float32).t()
    got = fp_linear(x, weight, scale, global_scale, fmt, cols).float()
    torch.testing.assert_close(got, want, atol=1e-2 * want.abs().max().item(), rtol=1e-2)


@cuda
def test_unserved_shape_falls_back_and_says_so(caplog):
    packed, scale = _packed(64, 200, 8, "cuda")  # 200 columns: not a multiple of the K tile
    x = torch.randn(3, 200, device="cuda", dtype=torch.bfloat16)
    with caplog.at_level("WARNING", logger="orbit.kernels"):
        got = int4_linear(x, packed, scale, 200)
    torch.testing.assert_close(got, x @ dequant_int4(packed, scale, (64, 200), torch.bfloat16).t())
    assert "falls back to the torch reference" in caplog.text


def test_rms_norm_dispatch_on_cpu_is_the_reference_and_traces():
    x, w = torch.randn(3, 5, 64), torch.rand(64) + 0.5
    by_hand = w * x / (x.pow(2).mean(-1, keepdim=True) + 1e-6).sqrt()
    torch.testing.assert_close(rms_norm(x, w, 1e-6), by_hand, atol=1e-6, rtol=1e-5)
    compiled = torch.compile(lambda x: rms_norm(x, w, 1e-6), backend="aot_eager", fullgraph=True)
    assert compiled(x).shape == x.shape


@cuda
@pytest.mark.parametrize("shape", [(1, 1, 2048), (256, 1, 2048), (3, 5, 1000), (4096, 1, 256)])
def test_add_rms_norm_kernel_equals_the_unfused_add_and_norm(shape):
    from orbit_kernels.rmsnorm import add_rms_norm, add_rms_norm_reference

    x = (torch.randn(shape, device="cuda") * 3).to(torch.bfloat16)
    delta = torch.randn(shape, device="cuda").to(torch.bfloat16)
    w = (torch.rand(shape[-1], device="cuda") + 0.5).to(torch.bfloat16)
    (h, normed), (want_h, want_normed) = add_rms_norm(x, delta, w, 1e-6), add_rms_norm_reference(x, delta, w, 1e-6)
    assert torch.equal(h, want_h)
    _assert_rounding_steps(normed, want_normed)


def test_dense_gemv_on_cpu_is_the_reference_and_traces():
    from orbit_kernels.dense_gemv import dense_gemv

    x, w = torch.randn(1, 1, 40), torch.randn(30, 40)
    torch.testing.assert_close(dense_gemv(x, w), torch.nn.functional.linear(x, w))
    compiled = torch.compile(lambda x: dense_gemv(x, w), backend="aot_eager", fullgraph=True)
    assert compiled(x).shape == (1, 1, 30)


@cuda
@pytest.mark.parametrize("n, k", [(151936, 2048), (1000, 4100)])
def test_dense_gemv_kernel_equals_cublas_and_falls_back_above_its_rows(n, k):
    """The lm_head's shape and a ragged one against the fp32 product, each within a bf16 rounding of
    it, as cuBLAS is (the two sum in different orders); more rows than ``MAX_ROWS`` run cuBLAS."""
    from orbit_kernels import dense_gemv

    torch.manual_seed(0)
    w = (torch.randn(n, k, device="cuda") * 0.05).to(torch.bfloat16)
    x = torch.randn(1, 1, k, device="cuda").to(torch.bfloat16)
    got = dense_gemv.dense_gemv(x, w)
    exact = x.float() @ w.float().t()
    assert got.shape == (1, 1, n)
    for y in (got, torch.nn.functional.linear(x, w)):
        torch.testing.assert_close(y.float(), exact, atol=1e-4, rtol=2 ** -8)
    many = torch.randn(dense_gemv.MAX_ROWS + 1, k, device="cuda").to(torch.bfloat16)
    assert torch.equal(dense_gemv.dense_gemv(many, w), torch.nn.functional.linear(many, w))


def test_silu_mul_on_cpu_is_the_reference_and_traces():
    from orbit_kernels.silu_mul import silu_mul

    gate, up = torch.randn(2, 3, 40), torch.randn(2, 3, 40)
    torch.testing.assert_close(silu_mul(gate, up), torch.nn.functional.silu(gate) * up)
    compiled = torch.compile(lambda g, u: silu_mul(g, u), backend="aot_eager", fullgraph=True)
    assert compiled(gate, up).shape == (2, 3, 40)


@cuda
@pytest.mark.parametrize("rows, cols", [(1, 6144), (256, 6144), (7, 100)])
def test_silu_mul_kernel_equals_the_reference(rows, cols):
    """Separate tensors and the halves of one fused gate/up output, against ``F.silu(g) * u``."""
    from orbit_kernels.silu_mul import silu_mul, silu_mul_reference

    fused = (torch.randn(rows, 1, 2 * cols, device="cuda") * 4).to(torch.bfloat16)
    for gate, up in (fused.split(cols, dim=-1), [h.contiguous() for h in fused.split(cols, dim=-1)]):
        got, want = silu_mul(gate, up), silu_mul_reference(gate, up)
        assert got.shape == want.shape and got.is_contiguous()
        torch.testing.assert_close(got.float(), want.float(), atol=1e-3, rtol=2 ** -7)  # one bf16 rounding


@cuda
@pytest.mark.parametrize("shape", [(1, 1, 2048), (256, 1, 128), (3, 7, 16, 128), (5, 1000), (64, 128, 16, 128)])
@pytest.mark.parametrize("dtype, wdtype", [(torch.bfloat16, torch.bfloat16), (torch.float32, torch.float32),
                                           (torch.bfloat16, torch.float32)])
def test_rms_norm_kernel_equals_the_reference(shape, dtype, wdtype):
    x = (torch.randn(shape, device="cuda") * 3).to(dtype)
    w = (torch.rand(shape[-1], device="cuda") + 0.5).to(wdtype)
    got, want = rms_norm(x, w, 1e-6), rms_norm_reference(x, w, 1e-6)
    assert got.dtype == want.dtype
    _assert_rounding_steps(got, want, dtype)
    if x.dim() >= 3:  # rows that are not contiguous in memory; heads of a column slice of a wider output
        wide = torch.cat([x, x.flip(-2)], dim=-2).flatten(-2)
        for x_strided in (x.transpose(0, 1), wide[..., :x.shape[-2] * x.shape[-1]].view(x.shape)):
            _assert_rounding_steps(rms_norm(x_strided, w, 1e-6), rms_norm_reference(x_strided, w, 1e-6), dtype)


def _assert_rounding_steps(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype = torch.bfloat16) -> None:
    """The kernel orders the fp32 sum of squares differently, so the normalized value may round one
    step apart, and the product with the weight then rounds again: within two steps everywhere,
    within one step nearly everywhere (a wrong row or index is off by the values themselves)."""
    if dtype != torch.bfloat16:  # the input's dtype: where the normalized value rounds
        torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=1e-5)
        return
    torch.testing.assert_close(got.float(), want.float(), atol=1e-6, rtol=2 ** -6)
    one_step = torch.isclose(got.float(), want.float(), atol=1e-6, rtol=2 ** -7)
    assert one_step.float().mean().item() > 1 - 1e-4


def _lora_fp32(y, x, a, b, row_slot, scaling):
    """Row by row in fp32: a third implementation, with no slot routing logic to share."""
    out = y.float().clone()
    for i in range(x.shape[0]):
        s = 0 if row_slot is None else int(row_slot[i])
        out[i] += scaling * ((x[i].float() @ a[s].float().t()) @ b[s].float().t())
    return out


def test_lora_linear_reason_names_what_a_kernel_pass_cannot_take():
    """The checks the packed and dense LoRA ops share: None for a fused group's factors that fit,
    else the one problem, for a rank past the kernels', B widths that miss the outputs, row slots
    for other rows, and A that differ across the group."""
    from orbit_kernels import dense_lora, lora_groups, packed_lora

    a = torch.randn(2, 48, 64)
    as_, bs = [a[:, :16], a[:, 16:32], a[:, 32:]], [torch.randn(2, n, 16) for n in (64, 32, 32)]
    assert lora_groups.linear_reason(as_, bs, 128, 5, torch.zeros(5, dtype=torch.long), 128) is None
    assert "rank 16" in lora_groups.linear_reason(as_, bs, 128, 5, None, 8)
    assert "sum to 128" in lora_groups.linear_reason(as_, bs, 96, 5, None, 128)
    assert "row slots (4,)" in lora_groups.linear_reason(as_, bs, 128, 5, torch.zeros(4, dtype=torch.long), 128)
    assert "A differ" in lora_groups.linear_reason([as_[0], torch.randn(2, 8, 64), as_[2]], bs, 128, 5, None, 128)
    x, weight = torch.randn(5, 64, dtype=torch.bfloat16), torch.randn(128, 64, dtype=torch.bfloat16)
    assert dense_lora.unserved_reason(x, weight, as_, bs, None) is None
    assert "sum to 128" in dense_lora.unserved_reason(x, weight[:96], as_, bs, None)
    assert "bias" in packed_lora.unserved_reason(x, torch.zeros(128, 8, dtype=torch.int32), torch.ones(128, 1),
                                                 torch.zeros(3), "int4", 64, as_, bs, None)


def test_lora_dispatch_on_cpu_is_the_reference():
    torch.manual_seed(0)
    x, a, b = torch.randn(6, 32), torch.randn(3, 4, 32), torch.randn(3, 20, 4)
    row_slot = torch.tensor([2, 0, 1, 1, 0, 2])
    for slots in (None, row_slot):
        y = torch.randn(6, 20)
        want = _lora_fp32(y, x, a if slots is not None else a[:1], b if slots is not None else b[:1], slots, 0.5)
        lora_add_(y, x, a if slots is not None else a[:1], b if slots is not None else b[:1], slots, 0.5)
        torch.testing.assert_close(y, want, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("rank, slots", [(16, 1), (8, 2), (64, 3)])
def test_lora_kernel_equals_the_reference(rows, rank, slots):
    torch.manual_seed(rows + rank)
    x = torch.randn(rows, 1000, device="cuda").to(torch.bfloat16)
    a = torch.randn(slots, rank, 1000, device="cuda") * 0.05
    b = torch.randn(slots, 1300, rank, device="cuda") * 0.05
    for row_slot in (None, torch.randint(0, slots, (rows,), device="cuda")):
        use_a, use_b = (a, b) if row_slot is not None else (a[:1], b[:1])
        y = torch.randn(rows, 1300, device="cuda").to(torch.bfloat16)
        want, reference, dispatched = _lora_fp32(y, x, use_a, use_b, row_slot, 2.0), y.clone(), y.clone()
        tiles = y.clone()
        lora.launch(y, x, use_a, use_b, row_slot, 2.0)  # the row kernels at every row count
        lora_tiles.launch_tiles(tiles, x, use_a, use_b, row_slot, 2.0)  # the tile kernels too
        lora_add_(dispatched, x, use_a, use_b, row_slot, 2.0)  # above KERNEL_MAX_ROWS, the tile kernels
        torch.testing.assert_close(dispatched.float(), want, atol=5e-2, rtol=2 ** -6)
        # t rounds to bf16 once, as in the reference; the products accumulate in fp32
        torch.testing.assert_close(tiles.float(), want, atol=5e-2, rtol=2 ** -6)
        lora_add_reference(reference, x, use_a, use_b, row_slot, 2.0)
        # fp32 accumulation, one rounding to bf16 at the end
        torch.testing.assert_close(y.float(), want, atol=1e-2, rtol=2 ** -7)
        # the bf16 reference rounds its two intermediate products too
        torch.testing.assert_close(y.float(), reference.float(), atol=5e-2, rtol=2 ** -6)


def test_rope_dispatch_on_cpu_is_the_reference():
    q = torch.randn(2, 5, 4, 16).transpose(1, 2)
    cos, sin = torch.randn(2, 5, 16), torch.randn(2, 5, 16)
    half = 8
    want = torch.cat([q[..., :half] * cos[:, None, :, :half] - q[..., half:] * sin[:, None, :, :half],
                      q[..., half:] * cos[:, None, :, half:] + q[..., :half] * sin[:, None, :, half:]], -1)
    torch.testing.assert_close(rope(q, cos, sin), want, atol=1e-6, rtol=1e-6)


@cuda
@pytest.mark.parametrize("batch, heads, seq", [(256, 16, 1), (3, 8, 37), (64, 16, 128)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_rope_kernel_equals_the_reference(batch, heads, seq, dtype):
    # laid out as the attention's q: [batch, seq, heads, dim] viewed as [batch, heads, seq, dim]
    torch.manual_seed(batch + seq)
    q = torch.randn(batch, seq, heads, 128, device="cuda").to(dtype).transpose(1, 2)
    # tables as rope's are, |cos| and |sin| at most 1 (the bound below assumes it; normal draws broke it)
    angles = torch.rand(batch, seq, 128, device="cuda") * 6.3
    cos, sin = angles.cos(), angles.sin()
    got, want = rope(q, cos, sin), apply_rope_reference(q, cos, sin)
    differ = (got != want).float().mean().item()
    error = (got.float() - want.float()).abs().max().item()
    print(f"rope {dtype} {batch}x{heads}x{seq}: {differ:.3%} of elements differ from the reference, max {error:.3g}")
    # the same products and sum; where a product rounds one step differently, a cancelling sum keeps
    # that step's absolute size (a wrong index or sign would be off by the values themselves, ~1)
    step = 2 ** -8 * (q.float().abs().max() * 2).item() if dtype == torch.bfloat16 else 1e-5
    assert error <= 2 * step


def test_decode_attention_dispatch_on_cpu_is_the_reference():
    torch.manual_seed(0)
    q, k, v = torch.randn(3, 4, 16), torch.randn(3, 2, 10, 16), torch.randn(3, 2, 10, 16)
    lengths = torch.tensor([0, 9, 4])
    got = decode_attention(q, k, v, lengths)
    for row in range(3):  # a plain softmax over the row's live keys, head by head
        for head in range(4):
            keys, values = k[row, head // 2, : lengths[row] + 1], v[row, head // 2, : lengths[row] + 1]
            weights = torch.softmax(keys @ q[row, head] / 4.0, -1)
            torch.testing.assert_close(got[row, head], weights @ values, atol=1e-5, rtol=1e-5)


@cuda
@pytest.mark.parametrize("rows, heads, kv_heads, capacity", [(1, 16, 8, 288), (256, 16, 8, 288), (5, 8, 8, 600)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_decode_attention_kernel_equals_the_reference(rows, heads, kv_heads, capacity, dtype):
    torch.manual_seed(rows)
    q = torch.randn(rows, heads, 128, device="cuda").to(dtype)
    # a row-slice of a bigger cache, as the engine passes it
    k = torch.randn(rows + 3, kv_heads, capacity, 128, device="cuda").to(dtype)[:rows]
    v = torch.randn(rows + 3, kv_heads, capacity, 128, device="cuda").to(dtype)[:rows]
    lengths = torch.randint(0, capacity, (rows,), device="cuda")
    lengths[0] = capacity - 1
    got = decode_attention(q, k, v, lengths).float()
    want = decode_attention_reference(q.float(), k.float(), v.float(), lengths)
    tolerance = 2e-2 if dtype == torch.bfloat16 else 1e-5
    torch.testing.assert_close(got, want, atol=tolerance, rtol=tolerance)


def test_unserved_shapes_are_named_and_noted_once(caplog):
    from orbit_kernels import decode_attention as attention_module, rmsnorm, rope as rope_module
    from orbit_kernels._triton import note_fallback

    q, k = torch.randn(2, 8, 80), torch.randn(2, 4, 16, 80)
    assert "head_dim 80" in attention_module.unserved_reason(q, k, k)
    assert attention_module.unserved_reason(torch.randn(2, 6, 64), torch.randn(2, 4, 16, 64),
                                            torch.randn(2, 4, 16, 64)) == "6 query heads over 4 KV heads"
    assert attention_module.unserved_reason(torch.randn(2, 8, 64), torch.randn(2, 4, 16, 64),
                                            torch.randn(2, 4, 16, 64)) is None
    assert "odd head_dim 7" in rope_module.unserved_reason(torch.randn(1, 2, 3, 7), torch.randn(1, 3, 7),
                                                           torch.randn(1, 3, 7))
    assert "20000" in rmsnorm.unserved_reason(torch.randn(2, 20000), torch.randn(20000))
    assert "rank 200" in lora.unserved_reason(torch.randn(3, 5), torch.randn(3, 8), torch.randn(1, 200, 8),
                                              torch.randn(1, 5, 200))
    assert lora.unserved_reason(torch.randn(3, 5), torch.randn(3, 8), torch.randn(1, 4, 8), torch.randn(1, 5, 4)) is None
    with caplog.at_level("WARNING", logger="orbit.kernels"):
        for _ in range(3):
            note_fallback("test_op", "a reason")
    assert caplog.text.count("test_op falls back to the torch reference (a reason)") == 1


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
def test_input_gradient_through_the_packed_gemm_matches_the_reference_path(fmt, monkeypatch):
    """What reaches the adapters: the input gradient of a packed linear in training, through the
    packed GEMM both ways (forced to every row count) against the torch references, within bf16
    tolerance."""
    from orbit_core.quant.linear import TENSOR_NAMES, QuantLinear
    args, global_scale, _ = _format_weights(fmt, 768, 1024, "cuda")
    tensors = dict(zip(TENSOR_NAMES[fmt], (*args, global_scale)))
    linear = QuantLinear(fmt, 1024, 768, tensors, compute_dtype=torch.bfloat16)
    x = torch.randn(3, 100, 1024, device="cuda", dtype=torch.bfloat16)
    direction = torch.randn(3, 100, 768, device="cuda", dtype=torch.bfloat16)

    def input_grad():
        leaf = x.clone().requires_grad_()
        (linear(leaf).float() * direction).sum().backward()
        return leaf.grad.float()

    monkeypatch.setitem(packed_gemm.MAX_ROWS, fmt, 1 << 30)
    fused = input_grad()
    monkeypatch.setattr(packed_gemm, "ENABLED", False)
    monkeypatch.setattr(int4, "ENABLED", False)
    monkeypatch.setattr(packed_gemv, "ENABLED", False)
    reference = input_grad()
    torch.testing.assert_close(fused, reference, atol=1e-2 * reference.abs().max().item(), rtol=1e-2)
    assert torch.nn.functional.cosine_similarity(fused.flatten(), reference.flatten(), dim=0) > 0.9999


def check_race_sampler(device: str, rows: int, block_v: int = 1024) -> None:
    """``orbit_kernels.sampling.launch`` against the softmax it samples (a 600-token vocabulary, one
    token past the first block) and against torch's log-softmax; new seeds give new draws."""
    from orbit_kernels import sampling

    vocab, temperature = 600, 0.7
    logits = torch.full((vocab,), -30.0)
    logits[:5] = torch.tensor([2.0, 1.0, 0.5, 0.0, -1.0])
    logits[550] = 1.5
    dtype = torch.float16 if device == "cpu" else torch.bfloat16
    batch = logits.to(device, dtype).expand(rows, vocab).contiguous()
    seed = torch.tensor([1234], device=device)
    tokens, logprobs = sampling.launch(batch, temperature, seed, block_v=block_v, splits=1)
    want = torch.log_softmax(batch.float() / temperature, -1)
    torch.testing.assert_close(logprobs, want.gather(-1, tokens[:, None])[:, 0], atol=1e-5, rtol=1e-5)
    probs = want[0].exp().cpu()
    counts = torch.bincount(tokens.cpu(), minlength=vocab).float()
    top = torch.tensor([0, 1, 2, 3, 4, 550])
    sd = (rows * probs[top] * (1 - probs[top])).sqrt()  # binomial, token by token
    assert ((counts[top] - rows * probs[top]).abs() <= 4 * sd + 1).all(), (counts[top], rows * probs[top])
    assert counts.sum() - counts[top].sum() <= 2  # the -30 logits hold ~1e-13 of the mass each
    few = batch[:40]
    assert torch.equal(sampling.launch(few, temperature, seed, block_v=block_v, splits=1)[0], tokens[:40])
    assert not torch.equal(sampling.launch(few, temperature, seed + 1, block_v=block_v)[0], tokens[:40])
    # at temperature 1 the kernel skips the division
    plain_tokens, plain_logprobs = sampling.launch(few, 1.0, seed, block_v=block_v, splits=1)
    plain_want = torch.log_softmax(few.float(), -1).gather(-1, plain_tokens[:, None])[:, 0]
    torch.testing.assert_close(plain_logprobs, plain_want, atol=1e-5, rtol=1e-5)
    # spans of the vocabulary over programs draw the same tokens: one random stream per row
    for splits in (2, 3):
        split_tokens, split_logprobs = sampling.launch(few, temperature, seed, block_v=block_v // 2, splits=splits)
        assert torch.equal(split_tokens, tokens[:40])
        torch.testing.assert_close(split_logprobs, logprobs[:40], atol=1e-5, rtol=1e-5)


@cuda
def test_race_sampler_kernel_draws_the_softmax():
    check_race_sampler("cuda", rows=200_000)


@cuda
@pytest.mark.parametrize("rows, dtype", [(1, torch.bfloat16), (256, torch.bfloat16), (7, torch.float32)])
def test_rope_kv_write_kernel_equals_the_reference(rows, dtype):
    from orbit_kernels.rope import launch_kv_write, rope_kv_write_reference

    torch.manual_seed(rows)
    k = torch.randn(rows, 1, 8, 128, device="cuda").to(dtype).transpose(1, 2)
    v = torch.randn(rows, 1, 8, 128, device="cuda").to(dtype).transpose(1, 2)
    cos, sin = torch.randn(rows, 1, 128, device="cuda"), torch.randn(rows, 1, 128, device="cuda")
    write_pos = torch.randint(0, 300, (rows,), device="cuda")
    want_k = torch.randn(rows + 3, 8, 300, 128, device="cuda").to(dtype)
    want_v = torch.randn(rows + 3, 8, 300, 128, device="cuda").to(dtype)
    got_k, got_v = want_k.clone(), want_v.clone()
    rope_kv_write_reference(k, v, cos, sin, want_k[:rows], want_v[:rows], write_pos)
    launch_kv_write(k, v, cos, sin, got_k[:rows], got_v[:rows], write_pos)
    assert torch.equal(got_v, want_v)
    # as for orbit::rope: where a product rounds one step differently, at most that step's size
    step = 2 ** -8 * (k.float().abs().max() * 2).item() if dtype == torch.bfloat16 else 1e-5
    assert (got_k.float() - want_k.float()).abs().max().item() <= 2 * step


@cuda
@pytest.mark.parametrize("rows", [1, 7, 64, 300])
@pytest.mark.parametrize("slots", [1, 2])
def test_grouped_lora_kernels_equal_the_reference(rows, slots):
    """q/k/v-like linears of one input through one launch of each kernel: the row kernels, the
    tile kernels and the dispatching op, each output against row-by-row fp32."""
    torch.manual_seed(rows * slots)
    rank = 16
    x = torch.randn(rows, 1000, device="cuda").to(torch.bfloat16)
    stacked_a = torch.randn(slots, 3 * rank, 1000, device="cuda") * 0.05
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(3)]
    bs = [torch.randn(slots, n, rank, device="cuda") * 0.05 for n in (1300, 600, 600)]
    row_slot = torch.randint(0, slots, (rows,), device="cuda") if slots > 1 else None
    ys = [torch.randn(rows, n, device="cuda").to(torch.bfloat16) for n in (1300, 600, 600)]
    wants = [_lora_fp32(y, x, a, b, row_slot, 2.0) for y, a, b in zip(ys, as_, bs)]
    for run in (lambda out: lora.launch_groups(out, x, as_, bs, row_slot, 2.0),
                lambda out: lora_tiles.launch_tile_groups(out, x, as_, bs, row_slot, 2.0),
                lambda out: lora.lora_add_group_(out, x, as_, bs, row_slot, 2.0)):
        got = [y.clone() for y in ys]
        run(got)
        for g, want in zip(got, wants):
            torch.testing.assert_close(g.float(), want, atol=5e-2, rtol=2 ** -6)


@cuda
@pytest.mark.parametrize("slots", [1, 2])
def test_lora_shrink_beside_the_base_gemm_adds_what_row_by_row_fp32_adds(slots):
    """``lora.add_beside``: the tile shrink on a side stream while a fused q/k/v-like GEMM runs on the
    current stream, then the expand into the GEMM's column views, against row-by-row fp32. At the
    row kernels' 32 rows it runs nothing."""
    import torch.nn.functional as F

    torch.manual_seed(slots)
    rows, rank, widths = 100, 16, [1300, 600, 600]
    x = torch.randn(rows, 1000, device="cuda").to(torch.bfloat16)
    w = (torch.randn(sum(widths), 1000, device="cuda") * 0.03).to(torch.bfloat16)
    stacked_a = torch.randn(slots, 3 * rank, 1000, device="cuda") * 0.05
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(3)]
    bs = [torch.randn(slots, n, rank, device="cuda") * 0.05 for n in widths]
    row_slot = torch.randint(0, slots, (rows,), device="cuda") if slots > 1 else None
    outs = []

    def base():
        outs.extend(F.linear(x, w).split(widths, dim=1))
        return outs

    assert lora.add_beside(base, x, as_, bs, row_slot, 2.0) is outs
    wants = [_lora_fp32(p, x, a, b, row_slot, 2.0) for p, a, b in zip(F.linear(x, w).split(widths, dim=1), as_, bs)]
    for got, want in zip(outs, wants):
        torch.testing.assert_close(got.float(), want, atol=5e-2, rtol=2 ** -6)
    assert lora.add_beside(base, x[:32], as_, bs, None, 2.0) is None and len(outs) == 3


@cuda
@pytest.mark.parametrize("rows", [1, 256])
@pytest.mark.parametrize("norm", [True, False])
def test_decode_qk_kernel_equals_the_unfused_kernels_and_reference(rows, norm):
    """The engine's decode q/k path in one kernel against the torch reference, at the Qwen3-1.7B
    head shape, from column views of a fused q/k/v output into a row slice of a bigger cache."""
    from orbit_kernels.qk_rope import decode_qk_, decode_qk_reference

    torch.manual_seed(rows)
    heads, kv_heads, dim, capacity = 16, 8, 128, 300
    qkv = (torch.randn(rows, 1, (heads + 2 * kv_heads) * dim, device="cuda") * 3).to(torch.bfloat16)
    q = qkv[..., :heads * dim].view(rows, 1, heads, dim)
    k = qkv[..., heads * dim:(heads + kv_heads) * dim].view(rows, 1, kv_heads, dim)
    v = qkv[..., (heads + kv_heads) * dim:].view(rows, 1, kv_heads, dim)
    weights = [(torch.rand(dim, device="cuda") + 0.5).to(torch.bfloat16) for _ in range(2)] if norm else [None, None]
    angles = torch.rand(rows, 1, dim, device="cuda") * 6.28
    cos, sin = angles.cos(), angles.sin()
    write_pos = torch.randint(0, capacity, (rows,), device="cuda")
    want_k = torch.randn(rows + 2, kv_heads, capacity, dim, device="cuda").to(torch.bfloat16)
    want_v = torch.randn_like(want_k)
    got_k, got_v = want_k.clone(), want_v.clone()
    want_q = decode_qk_reference(q, k, v, *weights, 1e-6, cos, sin, want_k[:rows], want_v[:rows], write_pos)
    got_q = decode_qk_(q, k, v, *weights, 1e-6, cos, sin, got_k[:rows], got_v[:rows], write_pos)
    assert torch.equal(got_v, want_v)
    for got, want in ((got_q, want_q), (got_k, want_k)):
        # a reordered fp32 sum of squares, then the norm's and rope's roundings: a few bf16 steps at most
        step = 2 ** -8 * 8 * (want.float().abs().max()).item()
        assert (got.float() - want.float()).abs().max().item() <= step
        assert torch.isclose(got.float(), want.float(), atol=1e-2, rtol=2 ** -7).float().mean() > 0.99


@cuda
@pytest.mark.parametrize("fmt", ["int4", "fp8", "nvfp4"])
@pytest.mark.parametrize("rows, slots, shape", [(1, 1, "qkv"), (3, 2, "qkv"), (4, 2, "qkv"), (8, 3, "qkv"),
                                               (16, 2, "qkv"), (1, 2, "gate_up"), (1, 2, "down")])
def test_packed_lora_linear_equals_row_by_row_fp32(fmt, rows, slots, shape):
    """The GEMV (to 4 rows) or the packed GEMM (int4 to 8) with the LoRA expand in its epilogue,
    through the op, at the Qwen3-1.7B fused q/k/v shape with a bias, also replayed from a CUDA
    graph: each output gets its own linear's update. Where neither kernel serves (16 rows; fp8 and
    nvfp4 above 4), the op's reference. At one row also the fused gate/up and down shapes, which
    int4 runs in ``packed_gemv.ONE_ROW_TILES``' tiles."""
    from orbit_kernels import packed_lora

    torch.manual_seed(rows * slots)
    widths, cols = {"qkv": ((2048, 1024, 1024), 2048), "gate_up": ((6144, 6144), 2048),
                    "down": ((2048,), 6144)}[shape]
    rank = 16
    args, global_scale, dense = _format_weights(fmt, sum(widths), cols, "cuda")
    x = torch.randn(rows, 1, cols, device="cuda", dtype=torch.bfloat16)
    stacked_a = torch.randn(slots, len(widths) * rank, cols, device="cuda") * 0.02
    as_ = [stacked_a[:, g * rank:(g + 1) * rank] for g in range(len(widths))]
    bs = [torch.randn(slots, n, rank, device="cuda") * 0.05 for n in widths]
    row_slot = torch.randint(0, slots, (rows,), device="cuda") if slots > 1 else None
    bias = torch.randn(sum(widths), device="cuda", dtype=torch.bfloat16)
    flat = x.view(rows, cols)
    base = flat.float() @ dense.t() + bias.float()
    want = torch.cat([_lora_fp32(part, flat, a, b, row_slot, 2.0)
                      for part, a, b in zip(base.split(widths, dim=-1), as_, bs)], dim=-1)
    assert packed_lora.served(x, *args, bias, fmt, cols, as_, bs, row_slot) == (rows <= packed_lora.max_rows(fmt))
    tolerance = dict(atol=1e-2 * want.abs().max().item(), rtol=1e-2)

    def call():
        return packed_lora.packed_lora_linear(x, *args, global_scale, bias, fmt, cols, as_, bs, row_slot, 2.0)

    torch.testing.assert_close(call().view(rows, -1).float(), want, **tolerance)
    _replays_equal(lambda: call().view(rows, -1), want, tolerance)


def test_packed_lora_linear_on_cpu_is_the_reference_and_traces():
    """Off the GPU the op is its reference: the dequantized linear, the bias, then each linear's
    update on its own columns, against row-by-row fp32."""
    from orbit_kernels import packed_lora

    torch.manual_seed(0)
    for fmt in ("int4", "fp8", "nvfp4"):
        args, global_scale, dense = _format_weights(fmt, 128, 256, "cpu")
        x = torch.randn(3, 256)
        as_ = [torch.randn(2, 4, 256) * 0.1 for _ in range(2)]
        bs = [torch.randn(2, n, 4) * 0.1 for n in (96, 32)]
        row_slot, bias = torch.tensor([1, 0, 1]), torch.randn(128)
        base = x @ dense.t() + bias
        want = torch.cat([_lora_fp32(part, x, a, b, row_slot, 0.5)
                          for part, a, b in zip(base.split((96, 32), dim=-1), as_, bs)], dim=-1)
        got = packed_lora.packed_lora_linear(x, *args, global_scale, bias, fmt, 256, as_, bs, row_slot, 0.5)
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)
    compiled = torch.compile(lambda v: packed_lora.packed_lora_linear(v, *args, global_scale, bias, fmt, 256, as_, bs,
                                                                      row_slot, 0.5), backend="aot_eager",
                             fullgraph=True)
    assert compiled(x).shape == (3, 128)


@cuda
@pytest.mark.parametrize("rows, with_slots", [(1, False), (4, True)])
def test_add_norm_shrink_kernel_equals_the_unfused_kernels(rows, with_slots):
    """The fused add, norm and shrink against ``add_rms_norm``'s kernel and then the shrink kernel,
    on q/k/v-sized factors of the Qwen3-1.7B shape: the same new residual bit for bit, the normed
    rows within a rounding step, the same ``t`` within fp32 summation order."""
    from orbit_kernels import norm_shrink, rmsnorm

    torch.manual_seed(rows)
    cols, rank, slots = 2048, 16, 2
    x = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    delta = torch.randn(rows, cols, device="cuda", dtype=torch.bfloat16)
    weight = (torch.rand(cols, device="cuda") + 0.5).to(torch.bfloat16)
    stacked = torch.randn(3, slots, rank, cols, device="cuda") * 0.05
    as_ = [stacked[g] for g in range(3)]
    row_slot = torch.randint(0, slots, (rows,), device="cuda") if with_slots else None
    h, normed, t = norm_shrink.launch(x, delta, weight, 1e-6, as_, row_slot)
    want_h, want_normed = rmsnorm.launch_add(x, delta, weight, 1e-6)
    assert torch.equal(h, want_h)
    torch.testing.assert_close(normed, want_normed, atol=0, rtol=2 ** -7)
    torch.testing.assert_close(t, lora.shrink(normed, as_, row_slot), atol=1e-4, rtol=1e-5)
    for i in range(rows):  # and an fp32 product row by row, a third implementation
        s = 0 if row_slot is None else int(row_slot[i])
        want = torch.cat([normed[i].float() @ a[s].t() for a in as_])
        torch.testing.assert_close(t[i], want, atol=1e-4, rtol=1e-4)


@cuda
@pytest.mark.parametrize("rows, with_slots", [(1, False), (4, True)])
def test_silu_mul_shrink_kernel_equals_the_unfused_kernels(rows, with_slots):
    """The fused SwiGLU product and down shrink against ``silu_mul``'s kernel and then the shrink
    kernel, on gate/up column slices of the Qwen3-1.7B shape: the same product bit for bit, the
    same ``t`` within fp32 summation order, and an fp32 product row by row."""
    from orbit_kernels import silu_mul, silu_shrink

    torch.manual_seed(rows)
    cols, rank, slots = 6144, 16, 2
    both = torch.randn(rows, 2 * cols, device="cuda", dtype=torch.bfloat16)
    gate, up = both[:, :cols], both[:, cols:]
    a = torch.randn(slots, rank, cols, device="cuda") * 0.05
    row_slot = torch.randint(0, slots, (rows,), device="cuda") if with_slots else None
    y, t = silu_shrink.launch(gate, up, a, row_slot)
    assert torch.equal(y, silu_mul.launch(gate, up))
    torch.testing.assert_close(t, lora.shrink(y, [a], row_slot), atol=1e-4, rtol=1e-5)
    for i in range(rows):
        s = 0 if row_slot is None else int(row_slot[i])
        torch.testing.assert_close(t[i], y[i].float() @ a[s].t(), atol=1e-4, rtol=1e-4)


def test_shrink_fusions_on_cpu_are_their_references():
    """On the CPU both fused ops run their torch references: the norm and the SwiGLU product as the
    unfused references compute them, and ``t`` against an fp32 product row by row, each row with
    its own slot's A (two groups for the norm, one for down)."""
    from orbit_kernels.norm_shrink import add_rms_norm_shrink
    from orbit_kernels.rmsnorm import add_rms_norm_reference
    from orbit_kernels.silu_mul import silu_mul_reference
    from orbit_kernels.silu_shrink import silu_mul_shrink

    torch.manual_seed(0)
    x, delta = torch.randn(3, 32, dtype=torch.bfloat16), torch.randn(3, 32, dtype=torch.bfloat16)
    weight = (torch.rand(32) + 0.5).to(torch.bfloat16)
    as_ = [torch.randn(2, 4, 32), torch.randn(2, 4, 32)]
    row_slot = torch.tensor([1, 0, 1])
    h, normed, t = add_rms_norm_shrink(x, delta, weight, 1e-6, as_, row_slot)
    want_h, want_normed = add_rms_norm_reference(x, delta, weight, 1e-6)
    assert torch.equal(h, want_h) and torch.equal(normed, want_normed)
    gate, up = torch.randn(3, 48, dtype=torch.bfloat16), torch.randn(3, 48, dtype=torch.bfloat16)
    a = torch.randn(2, 4, 48)
    y, t_down = silu_mul_shrink(gate, up, a, None)
    assert torch.equal(y, silu_mul_reference(gate, up))
    for i in range(3):
        s = int(row_slot[i])
        want = torch.cat([normed[i].float() @ g[s].t() for g in as_])
        torch.testing.assert_close(t[i], want, atol=1e-5, rtol=1e-5)
        torch.testing.assert_close(t_down[i], y[i].float() @ a[0].t(), atol=1e-5, rtol=1e-5)
