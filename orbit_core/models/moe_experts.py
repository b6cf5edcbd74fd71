"""Active-expert-chunked dequantization for MoE layers whose experts stay packed.

A layer's routed slots are sorted by expert. Only the experts that some slot routes to are
dequantized, ``chunk`` of them at a time, into one buffer that is reused by every chunk, layer and
step. Each chunk's slots then run through a grouped GEMM (the SwiGLU expert MLP, expert by expert
over contiguous row ranges). Backward dequantizes the same chunks again and recomputes the
SwiGLU, so nothing dequantized and no expert activation outlives its chunk: the extra memory is the
buffer, ``chunk x 3 x intermediate x hidden`` values, whatever the number of experts.
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F

from orbit_kernels.grouped_gemm import (device_offsets, grouped_mm, grouped_mm_sum, grouped_swiglu_grads,
                                        grouped_swiglu_in)

_BUFFERS: dict[tuple, torch.Tensor] = {}


def _buffer(kind: str, shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """One reused buffer per (kind, shape, dtype, device): every layer and step writes into it."""
    key = (kind, shape, dtype, device)
    if key not in _BUFFERS:
        _BUFFERS[key] = torch.empty(shape, dtype=dtype, device=device)
    return _BUFFERS[key]


def release_buffers() -> None:
    _BUFFERS.clear()


def dequantize_kind(layer, ids: list[int], kind: str, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """``kind`` weights ``[C, out, in]`` of experts ``ids`` (C = at most ``layer.dequant_chunk``): from
    the layer's stacked bank (int4: one kernel call), else expert by expert into the reused buffer."""
    bank = getattr(layer, "expert_bank", None)
    if bank is not None:
        return bank.dequantize_kind(torch.tensor(ids, device=device), dtype, kind)
    modules = [getattr(layer.experts[e], kind) for e in ids]
    modules = [getattr(m, "base", m) for m in modules]  # an adapter's packed base
    buffer = _buffer(kind, (layer.dequant_chunk, modules[0].out_features, modules[0].in_features), dtype, device)
    for slot, module in enumerate(modules):
        buffer[slot].copy_(module.dequantized(dtype))
    return buffer


def dequantize_chunk(layer, ids: list[int], chunk: int, dtype: torch.dtype,
                     device: torch.device) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Gate, up and down weights of experts ``ids`` (at most ``chunk``)."""
    return tuple(dequantize_kind(layer, ids, kind, dtype, device) for kind in ("gate_proj", "up_proj", "down_proj"))


GROUPED_MM = {"impl": "auto"}
"""The GPU's grouped GEMM: ``triton`` (``orbit_kernels.grouped_gemm``), ``cutlass`` (torch's
``_grouped_mm``, bf16 on sm90+), ``loop`` (the reference, one matmul per expert), or ``auto``:
``cutlass`` where it runs, else ``triton``. On an H100 at the Qwen3-30B-A3B expert shape torch's
CUTLASS kernel was 1.3-2x faster than ours (bench/results/moe_grouped_gemm_h100.jsonl), so ours
serves fp16 and the GPUs torch's does not. The CPU runs the loop."""


@functools.lru_cache(maxsize=None)
def _cutlass_runs(device: torch.device) -> bool:
    return hasattr(torch, "_grouped_mm") and torch.cuda.get_device_capability(device) >= (9, 0)


def _impl(x: torch.Tensor) -> str:
    impl = GROUPED_MM["impl"]
    if impl == "auto":  # asked per chunk of every MoE layer, so the device check is cached
        return "cutlass" if x.dtype == torch.bfloat16 and _cutlass_runs(x.device) else "triton"
    return impl


def _grouped_mm_ready(x: torch.Tensor) -> bool:
    return x.is_cuda and x.dtype in (torch.bfloat16, torch.float16) and GROUPED_MM["impl"] != "loop"


def _gmm(a: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Rows ``offsets[i]:offsets[i+1]`` of ``a`` times ``b[i]`` ([rows, K] @ [K, N] per group)."""
    if _impl(a) == "cutlass" and a.dtype == torch.bfloat16:
        return torch._grouped_mm(a, b, offs=device_offsets(offsets[1:], a.device))
    return grouped_mm(a, b, offsets)


def grouped_swiglu(x: torch.Tensor, offsets: list[int], gate: torch.Tensor, up: torch.Tensor,
                   down: torch.Tensor) -> torch.Tensor:
    """Rows ``offsets[i]:offsets[i+1]`` of ``x`` through expert ``i``'s SwiGLU MLP."""
    if _grouped_mm_ready(x) and _impl(x) == "triton":  # gate, up and the SwiGLU in one kernel
        n = len(offsets) - 1
        h = grouped_swiglu_in(x, gate[:n].transpose(1, 2), up[:n].transpose(1, 2), offsets)
        return grouped_mm(h, down[:n].transpose(1, 2), offsets)
    if _grouped_mm_ready(x):
        n = len(offsets) - 1
        h = F.silu(_gmm(x, gate[:n].transpose(1, 2), offsets)) * _gmm(x, up[:n].transpose(1, 2), offsets)
        return _gmm(h, down[:n].transpose(1, 2), offsets)
    out = torch.empty_like(x)
    for i in range(len(offsets) - 1):
        rows = x[offsets[i]: offsets[i + 1]]
        out[offsets[i]: offsets[i + 1]] = (F.silu(rows @ gate[i].t()) * (rows @ up[i].t())) @ down[i].t()
    return out


def grouped_swiglu_backward(x: torch.Tensor, grad: torch.Tensor, offsets: list[int], gate: torch.Tensor,
                            up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """d(rows) of ``grouped_swiglu`` for a frozen expert (no weight gradients)."""
    if _grouped_mm_ready(x) and _impl(x) == "triton":
        n = len(offsets) - 1
        dh = grouped_mm(grad, down[:n], offsets)
        dg, du = grouped_swiglu_grads(x, gate[:n].transpose(1, 2), up[:n].transpose(1, 2), dh, offsets)
        return grouped_mm_sum(dg, gate[:n], du, up[:n], offsets)
    if _grouped_mm_ready(x):
        n = len(offsets) - 1
        g, u = _gmm(x, gate[:n].transpose(1, 2), offsets), _gmm(x, up[:n].transpose(1, 2), offsets)
        sig = torch.sigmoid(g)
        dh = _gmm(grad, down[:n], offsets)
        dg = dh * u * sig * (1 + g * (1 - sig))
        return _gmm(dg, gate[:n], offsets) + _gmm(dh * g * sig, up[:n], offsets)
    out = torch.empty_like(x)
    for i in range(len(offsets) - 1):
        rows, dy = x[offsets[i]: offsets[i + 1]], grad[offsets[i]: offsets[i + 1]]
        g, u = rows @ gate[i].t(), rows @ up[i].t()
        sig = torch.sigmoid(g)
        dh = dy @ down[i]
        dg = dh * u * sig * (1 + g * (1 - sig))
        out[offsets[i]: offsets[i + 1]] = dg @ gate[i] + (dh * g * sig) @ up[i]
    return out


def _chunks(active: list[int], counts: list[int], chunk: int):
    """(expert ids, row offsets relative to the chunk, first row, last row) for each chunk."""
    start_row = 0
    for start in range(0, len(active), chunk):
        ids, sizes = active[start: start + chunk], counts[start: start + chunk]
        offsets = [0]
        for size in sizes:
            offsets.append(offsets[-1] + size)
        yield ids, offsets, start_row, start_row + offsets[-1]
        start_row += offsets[-1]


class ChunkedExperts(torch.autograd.Function):
    """Sorted slot rows ``x`` -> each row through its expert; ``counts[i]`` rows go to ``active[i]``."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer, active: list[int], counts: list[int]) -> torch.Tensor:
        ctx.save_for_backward(x)
        ctx.layer, ctx.active, ctx.counts = layer, active, counts
        out = torch.empty_like(x)
        for ids, offsets, lo, hi in _chunks(active, counts, layer.dequant_chunk):
            weights = dequantize_chunk(layer, ids, layer.dequant_chunk, x.dtype, x.device)
            out[lo:hi] = grouped_swiglu(x[lo:hi], offsets, *weights)
        layer.experts_dequantized += len(active)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        (x,) = ctx.saved_tensors
        layer = ctx.layer
        dx = torch.empty_like(x)
        for ids, offsets, lo, hi in _chunks(ctx.active, ctx.counts, layer.dequant_chunk):
            weights = dequantize_chunk(layer, ids, layer.dequant_chunk, x.dtype, x.device)
            dx[lo:hi] = grouped_swiglu_backward(x[lo:hi], grad[lo:hi].to(x.dtype), offsets, *weights)
        layer.experts_dequantized += len(ctx.active)
        return dx, None, None, None


def routed_experts(layer, tokens: torch.Tensor, weights: torch.Tensor, experts: torch.Tensor) -> torch.Tensor:
    """sum_k weights[:, k] * expert_{experts[:, k]}(tokens), through chunked dequantization."""
    n, k = experts.shape
    flat = experts.reshape(-1)
    order = torch.argsort(flat, stable=True)
    counts_all = torch.bincount(flat, minlength=len(layer.experts))
    active = counts_all.nonzero().flatten()
    counts = counts_all[active].tolist()  # one host sync per layer: the chunk plan needs the sizes
    rows = tokens[order // k]
    if any(hasattr(getattr(layer.experts[0], kind), "base") for kind in ("gate_proj", "up_proj", "down_proj")):
        from orbit_core.models.moe_expert_adapters import adapted_experts

        out_sorted = adapted_experts(rows, layer, active.tolist(), counts)
    else:
        out_sorted = ChunkedExperts.apply(rows, layer, active.tolist(), counts)
    inverse = torch.empty_like(order)
    inverse[order] = torch.arange(len(order), device=order.device)
    per_slot = out_sorted[inverse]
    return (per_slot.view(n, k, -1) * weights[..., None].to(per_slot.dtype)).sum(1)
