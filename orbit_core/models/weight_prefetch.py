"""Stream each layer's packed weights into L2 half a layer before the engine reads them.

At a few decode rows a layer's packed GEMVs read 26 MB of int4 weights (Qwen3-1.7B shape) from
DRAM, and between them run norms, rope, attention and LoRA shrinks that read almost nothing; DRAM
idles through those. Here the engine's layer loop (``DecoderLM._engine_layers``) asks L2 for the
weights of the block after next (``orbit::l2_prefetch``): entering layer ``i``'s attention, for
layer ``i``'s MLP (gate/up, down); entering its MLP, for layer ``i + 1``'s attention (q/k/v, o).
At most one block's weights (19 MB here) are on their way or waiting at a time, well inside an
H100's 50 MB of L2, and each request leaves a whole block of kernels' time to land.

Only the packed calls of the kernels that read packed words (``packed_gemm.dense_above`` rows or
fewer) are asked for; above that the weights are dequantized ahead on a side stream
(``dequant_ahead``). bf16 bases have no packed calls and get nothing: their layers outgrow L2.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn

from orbit_core.models.projections import packed_calls
from orbit_kernels import l2_prefetch as prefetch_kernels
from orbit_kernels.l2_prefetch import l2_prefetch
from orbit_kernels.packed_gemm import dense_above

ENABLED = True
"""Set False to prefetch nothing (benchmarks compare the two)."""


def block_tensors(block: nn.Module, rows: int) -> list[torch.Tensor]:
    """The packed tensors (codes, scales) that ``block``'s packed calls read at ``rows`` rows,
    in the order the engine calls them."""
    tensors = []
    for parts in packed_calls(block):
        if rows <= dense_above(parts.fmt):
            tensors += [parts.weight, parts.scale] + ([parts.global_scale] if parts.global_scale is not None else [])
    return tensors


class WeightPrefetch:
    """One forward's requests: ``attention[i]`` and ``mlp[i]``, the tensors of layer ``i``'s blocks."""

    def __init__(self, attention: Sequence[list[torch.Tensor]], mlp: Sequence[list[torch.Tensor]]):
        self.attention, self.mlp = attention, mlp

    def start(self) -> None:
        l2_prefetch(self.attention[0])

    def before_attention(self, i: int) -> None:
        l2_prefetch(self.mlp[i])

    def before_mlp(self, i: int) -> None:
        if i + 1 < len(self.attention):
            l2_prefetch(self.attention[i + 1])


def plan(layers: Sequence[nn.Module], x: torch.Tensor) -> WeightPrefetch | None:
    """The requests for an engine forward of ``x`` through ``layers``, or None: off, a device the
    prefetch kernel does not run on, or no packed weight that these rows read as packed words."""
    if not (ENABLED and prefetch_kernels.capable(x.device)):
        return None
    rows = x.numel() // x.shape[-1]
    attention = [block_tensors(layer.self_attn, rows) for layer in layers]
    mlp = [block_tensors(layer.mlp, rows) for layer in layers]
    return WeightPrefetch(attention, mlp) if any(attention) or any(mlp) else None
