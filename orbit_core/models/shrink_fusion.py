"""The engine's decode kernels that also compute the LoRA shrink of the linears reading their
output: the residual add and norm before q/k/v and before gate/up (``orbit::add_rms_norm_shrink``),
and the SwiGLU product before down (``orbit::silu_mul_shrink``), and at a step's start the embedding
lookup with layer 0's norm (``orbit::embed_rms_norm_shrink``). Each returns a context in which
those linears' shrink of exactly that output returns the computed ``t`` (``lora.offer_shrink``);
anywhere they do not apply (the CPU, other adapters, more rows, ungrouped projections) the unfused
kernels run and the context does nothing.
"""

from __future__ import annotations

from contextlib import nullcontext

import torch
from torch import nn

from orbit_core.models import projections
from orbit_kernels import lora as lora_kernels
from orbit_kernels import norm_shrink, silu_shrink
from orbit_kernels.norm_shrink import add_rms_norm_shrink, embed_rms_norm_shrink
from orbit_kernels.rmsnorm import add_rms_norm
from orbit_kernels.silu_mul import silu_mul
from orbit_kernels.silu_shrink import silu_mul_shrink


def _shrink_factors(x: torch.Tensor, linears: list, max_rows: int):
    """(each linear's A, the rows' slots) that the linears' engine forward will shrink ``x`` by, or
    None where no single shrink over them runs (or ``x`` has more than ``max_rows`` rows)."""
    take = getattr(type(linears[0]), "engine_shrink_factors", None)
    if take is None or not x.is_cuda or x.numel() // x.shape[-1] > max_rows:  # where the kernels run
        return None
    return take(x, linears)


def add_norm(x: torch.Tensor, delta: torch.Tensor, norm: nn.Module, block: nn.Module, names: tuple[str, ...]):
    """``(h, rms_norm(h), context)`` with ``h = x + delta``; in the context the linears ``names`` of
    ``block`` (a grouped q/k/v or gate/up) find their shrink of the normed rows done."""
    factors = None
    if norm_shrink.ENABLED and projections.GROUPED:
        factors = _shrink_factors(x, [getattr(block, name, None) for name in names], norm_shrink.MAX_ROWS)
    if factors is None:
        return (*add_rms_norm(x, delta, norm.weight, norm.eps), nullcontext())
    h, normed, t = add_rms_norm_shrink(x, delta, norm.weight, norm.eps, *factors)
    return h, normed, lora_kernels.offer_shrink(normed.reshape(-1, normed.shape[-1]), *factors, t)


def embed_norm(ids: torch.Tensor, embed: nn.Module, norm: nn.Module, block: nn.Module, names: tuple[str, ...]):
    """``(x, rms_norm(x), context)`` with ``x = embed(ids)``; in the context the linears ``names`` of
    ``block`` find their shrink of the normed rows done."""
    factors = None
    if norm_shrink.ENABLED and norm_shrink.EMBED and projections.GROUPED and type(embed) is nn.Embedding:
        # the ids stand in for the rows they pick: the same device, row count and engine check
        factors = _shrink_factors(ids[..., None], [getattr(block, name, None) for name in names], norm_shrink.MAX_ROWS)
    if factors is None:
        x = embed(ids)
        return x, norm(x), nullcontext()
    x, normed, t = embed_rms_norm_shrink(ids.contiguous(), embed.weight, norm.weight, norm.eps, *factors)
    return x, normed, lora_kernels.offer_shrink(normed.reshape(-1, normed.shape[-1]), *factors, t)


def silu_mul_for(gate: torch.Tensor, up: torch.Tensor, down: nn.Module):
    """``(silu(gate) * up, context)``; in the context ``down`` finds its shrink of the product done."""
    factors = _shrink_factors(gate, [down], silu_shrink.MAX_ROWS) if silu_shrink.ENABLED else None
    if factors is None:
        return silu_mul(gate, up), nullcontext()
    (a,), row_slot = factors
    y, t = silu_mul_shrink(gate, up, a, row_slot)
    return y, lora_kernels.offer_shrink(y.reshape(-1, y.shape[-1]), [a], row_slot, t)
