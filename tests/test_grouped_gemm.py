"""The MoE grouped GEMM: the Triton kernel against the torch reference (GPU), the dispatch on the CPU."""

from __future__ import annotations

import logging

import pytest
import torch

from orbit_kernels import grouped_gemm
from orbit_kernels.grouped_gemm import (grouped_mm, grouped_mm_reference, grouped_mm_sum, grouped_swiglu_grads,
                                        grouped_swiglu_grads_reference, grouped_swiglu_in, grouped_swiglu_reference)


def _problem(counts: list[int], k: int, n: int, device: str, dtype: torch.dtype, transposed: bool):
    gen = torch.Generator().manual_seed(sum(counts) * 31 + k + n)
    offsets = [0]
    for c in counts:
        offsets.append(offsets[-1] + c)
    a = torch.randn(offsets[-1], k, generator=gen).to(device, dtype)
    if transposed:  # a stack of [N, K] expert weights, passed as its [G, K, N] view
        b = torch.randn(len(counts), n, k, generator=gen).to(device, dtype).transpose(1, 2)
    else:
        b = torch.randn(len(counts), k, n, generator=gen).to(device, dtype)
    return a, b, offsets


def _block_diagonal(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Every row times every group's matrix, keeping only its own group's product (fp64)."""
    every = torch.einsum("mk,gkn->gmn", a.double(), b.double())
    owner = torch.bucketize(torch.arange(a.shape[0]), torch.tensor(offsets[1:]), right=True)
    return every[owner, torch.arange(a.shape[0])]


def test_cpu_dispatch_runs_the_reference():
    a, b, offsets = _problem([3, 0, 5, 1], 24, 10, "cpu", torch.float32, transposed=True)
    torch.testing.assert_close(grouped_mm(a, b, offsets).double(), _block_diagonal(a, b, offsets), atol=1e-4, rtol=1e-4)


def test_swiglu_ops_on_the_cpu_match_autograd_and_the_block_diagonal_product():
    a, gate, offsets = _problem([4, 0, 6, 2], 24, 16, "cpu", torch.float64, transposed=True)
    _, up, _ = _problem([4, 0, 6, 2], 24, 16, "cpu", torch.float64, transposed=False)
    g = _block_diagonal(a, gate, offsets).requires_grad_()
    u = _block_diagonal(a, up, offsets).requires_grad_()
    h = torch.nn.functional.silu(g) * u
    torch.testing.assert_close(grouped_swiglu_in(a, gate, up, offsets), h.detach())
    dh = torch.randn_like(h)
    h.backward(dh)
    dg, du = grouped_swiglu_grads(a, gate, up, dh, offsets)
    torch.testing.assert_close(dg, g.grad)
    torch.testing.assert_close(du, u.grad)
    both = grouped_mm_sum(dg, gate.transpose(1, 2), du, up.transpose(1, 2), offsets)
    want = _block_diagonal(dg, gate.transpose(1, 2), offsets) + _block_diagonal(du, up.transpose(1, 2), offsets)
    torch.testing.assert_close(both, want)


def test_offsets_that_do_not_cover_the_rows_are_refused():
    a, b, offsets = _problem([3, 2], 16, 8, "cpu", torch.float32, transposed=False)
    with pytest.raises(ValueError, match="do not cover"):
        grouped_mm(a, b, [0, 3, 4])


def test_op_traces_without_data():
    a, b, offsets = _problem([3, 5], 16, 8, "cpu", torch.float32, transposed=False)
    compiled = torch.compile(lambda x: grouped_mm(x, b, offsets), backend="aot_eager", fullgraph=True)
    assert compiled(a).shape == (8, 8)


cuda = pytest.mark.skipif(not torch.cuda.is_available() or grouped_gemm.triton is None, reason="needs CUDA and triton")


@cuda
@pytest.mark.parametrize("counts", [[1, 3, 2, 1, 1, 4, 1, 3], [0, 700, 5, 0, 129], [2048], [17] * 16])
@pytest.mark.parametrize("k, n, transposed", [(2048, 768, True), (768, 2048, False), (200, 72, True)])
def test_kernel_equals_the_reference_in_bf16(counts, k, n, transposed):
    a, b, offsets = _problem(counts, k, n, "cuda", torch.bfloat16, transposed)
    reference = grouped_mm_reference(a.float(), b.float(), offsets)
    got = grouped_mm(a, b, offsets).float()
    # bf16 output of an fp32-accumulated dot: within bf16 rounding of the fp32 reference
    torch.testing.assert_close(got, reference, atol=2e-2 * reference.abs().max().item() ** 0.5, rtol=1e-2)


@cuda
@pytest.mark.parametrize("counts", [[1, 3, 2, 1, 1, 4, 1, 3], [0, 700, 5, 0, 129], [17] * 16])
def test_fused_swiglu_kernels_equal_the_references_in_bf16(counts):
    hidden, inter = 2048, 768
    a, gate, offsets = _problem(counts, hidden, inter, "cuda", torch.bfloat16, transposed=True)
    _, up, _ = _problem(counts, hidden, inter, "cuda", torch.bfloat16, transposed=True)
    gate, up = gate * hidden ** -0.5, up * hidden ** -0.5
    dh = torch.randn(a.shape[0], inter, device="cuda", dtype=torch.bfloat16)

    def close(got, want):
        torch.testing.assert_close(got.float(), want, atol=2e-2 * want.abs().max().item() ** 0.5 + 1e-3, rtol=2e-2)

    f32 = [t.float() for t in (a, gate, up, dh)]
    close(grouped_swiglu_in(a, gate, up, offsets), grouped_swiglu_reference(*f32[:3], offsets))
    for got, want in zip(grouped_swiglu_grads(a, gate, up, dh, offsets), grouped_swiglu_grads_reference(*f32, offsets)):
        close(got, want)
    dg = torch.randn_like(dh)
    want = grouped_mm_reference(dg.float(), f32[1].transpose(1, 2), offsets) + \
        grouped_mm_reference(f32[3], f32[2].transpose(1, 2), offsets)
    close(grouped_mm_sum(dg, gate.transpose(1, 2), dh, up.transpose(1, 2), offsets), want)


@cuda
def test_fp32_falls_back_to_the_reference_and_says_so(caplog):
    a, b, offsets = _problem([3, 4], 64, 32, "cuda", torch.float32, transposed=False)
    with caplog.at_level(logging.WARNING, logger="orbit.kernels"):
        got = grouped_mm(a, b, offsets)
    torch.testing.assert_close(got, grouped_mm_reference(a, b, offsets), atol=0, rtol=0)
    assert any("grouped_mm falls back" in r.message for r in caplog.records)
