"""LoRA and OFT on packed MoE experts, batched over the experts of each chunk.

When ``peft.target_modules`` globs put LoRA on expert linears, the chunked path runs each weight
kind (gate, up, down) as a grouped GEMM over the chunk's frozen packed weights. Those weights are
dequantized in forward and again in backward, and never saved. The chunk's LoRA factors are
stacked, ``[C, r, in]`` and ``[C, out, r]``, and applied as two grouped GEMMs beside it. The
SwiGLU between them is ordinary autograd, so gradients reach every expert's ``lora_A`` and
``lora_B`` through the stacks. OFT rotates each expert's rows by that expert's rotation before its
packed weight.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from orbit_core.models.moe_experts import _chunks, _gmm, _grouped_mm_ready, dequantize_kind
from orbit_kernels.grouped_gemm import device_offsets

KINDS = ("gate_proj", "up_proj", "down_proj")


def adapted(module) -> bool:
    return hasattr(module, "lora_A") or hasattr(module, "oft_skew")


def grouped_matmul(x: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    """Rows ``offsets[i]:offsets[i+1]`` of ``x`` times ``b[i]`` ([K, N]); autograd flows through."""
    # the LoRA factors need autograd: torch's grouped GEMM has it (the frozen weights use ``_gmm``)
    if (_grouped_mm_ready(x) and x.dtype == torch.bfloat16 and hasattr(torch, "_grouped_mm")
            and b.shape[-1] % 16 == 0 and b.shape[-2] % 16 == 0):  # its alignment
        return torch._grouped_mm(x, b.to(x.dtype), offs=device_offsets(offsets[1:], x.device))
    return torch.cat([x[offsets[i]: offsets[i + 1]] @ b[i].to(x.dtype) for i in range(len(offsets) - 1)])


def _frozen_matmul(x: torch.Tensor, b: torch.Tensor, offsets: list[int]) -> torch.Tensor:
    return _gmm(x, b, offsets) if _grouped_mm_ready(x) else grouped_matmul(x, b, offsets)


class GroupedPackedLinear(torch.autograd.Function):
    """Rows through each chunk expert's frozen packed ``kind`` weight; re-dequantized in backward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layer, kind: str, ids: list[int], offsets: list[int]) -> torch.Tensor:
        ctx.layer, ctx.kind, ctx.ids, ctx.offsets = layer, kind, ids, offsets
        weight = dequantize_kind(layer, ids, kind, x.dtype, x.device)
        if kind == KINDS[0]:
            layer.experts_dequantized += len(ids)
        return _frozen_matmul(x, weight[: len(ids)].transpose(1, 2), offsets)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        layer = ctx.layer
        weight = dequantize_kind(layer, ctx.ids, ctx.kind, grad.dtype, grad.device)
        if ctx.kind == KINDS[0]:
            layer.experts_dequantized += len(ctx.ids)
        return _frozen_matmul(grad, weight[: len(ctx.ids)], ctx.offsets), None, None, None, None


def _projection(x: torch.Tensor, layer, kind: str, ids: list[int], offsets: list[int]) -> torch.Tensor:
    first = getattr(layer.experts[ids[0]], kind)
    modules = [getattr(layer.experts[e], kind) for e in ids]
    if hasattr(first, "oft_skew") and first.enabled:  # OFT rotates each expert's rows, then its base
        x = torch.cat([m.rotate(x[offsets[i]: offsets[i + 1]], m.rotation()) for i, m in enumerate(modules)])
    out = GroupedPackedLinear.apply(x, layer, kind, ids, offsets)
    if not hasattr(first, "lora_A") or not first.enabled:
        return out
    a = torch.stack([m.lora_A for m in modules]).transpose(1, 2)  # [C, in, r]
    b = torch.stack([m.lora_B for m in modules]).transpose(1, 2)  # [C, r, out]
    low = grouped_matmul(first.dropout(x), a, offsets)
    return out + (grouped_matmul(low, b, offsets) * first.scaling).to(out.dtype)


def adapted_experts(x: torch.Tensor, layer, active: list[int], counts: list[int]) -> torch.Tensor:
    """Sorted slot rows through their experts' SwiGLU MLPs, LoRA included, chunk by chunk."""
    parts = []
    for ids, offsets, lo, hi in _chunks(active, counts, layer.dequant_chunk):
        rows = x[lo:hi]
        h = F.silu(_projection(rows, layer, "gate_proj", ids, offsets)) * _projection(rows, layer, "up_proj", ids, offsets)
        parts.append(_projection(h, layer, "down_proj", ids, offsets))
    return torch.cat(parts)
