"""Which packed weights the engine's layer loop prefetches into L2, and when (``orbit::l2_prefetch``).

At few rows the packed GEMV and GEMM read the packed words themselves. At the top of layer ``i``
the loop asks, on a side stream, for layer ``i``'s packed calls after q/k/v (o_proj, gate/up,
down) and layer ``i + 1``'s q/k/v, so that their bytes arrive while the q/k/v GEMV, the norms and
the attention, which read little, run. At the Qwen3-1.7B shape in int4 that is about 27 MB a
layer, half of an H100's L2. The side stream waits for the main one at each layer's top (so it
never runs ahead of the layers) and the main one for it at the end of the forward (so a captured
graph joins it). Above the packed kernels' rows the weights are dequantized ahead instead
(``dequant_ahead``), and nothing is prefetched.

The plan is built once per model and row class from the eager steps that precede a graph's capture,
and reused while every tensor it names is alive (a freed weight's address is never prefetched).
"""

from __future__ import annotations

import weakref
from collections.abc import Sequence

import torch
from torch import nn

from orbit_core.models.projections import PackedParts, packed_calls
from orbit_kernels import l2_prefetch
from orbit_kernels.packed_gemm import dense_above
from orbit_kernels.packed_gemv import FORMAT_CODES


QKV = ("q_proj", "k_proj", "v_proj")


def _tensors(parts: PackedParts) -> list[torch.Tensor]:
    return [parts.weight, parts.scale]


def _first_packed(linear: nn.Module) -> torch.Tensor | None:
    base = getattr(linear, "base", linear)
    names = getattr(base, "tensor_names", None)
    return getattr(base, names[0]) if names else None


def layer_tensors(layers: Sequence[nn.Module], rows: int) -> list[list[torch.Tensor]]:
    """For each layer ``i``: the packed tensors to prefetch at its top (its packed calls but q/k/v's,
    then layer ``i + 1``'s q/k/v calls), for calls of ``rows`` rows that read packed words."""
    heads, rests = [], []
    for layer in layers:
        calls = [p for p in packed_calls(layer) if rows <= dense_above(p.fmt)]
        attn = getattr(layer, "self_attn", None)
        # a fused q/k/v group's buffer starts with q_proj's rows, at the same address
        qkv = {t.data_ptr() for t in (_first_packed(getattr(attn, n)) for n in QKV if hasattr(attn, n))
               if t is not None}
        is_qkv = [p.weight.data_ptr() in qkv for p in calls]
        heads.append([t for p, hit in zip(calls, is_qkv) if hit for t in _tensors(p)])
        rests.append([t for p, hit in zip(calls, is_qkv) if not hit for t in _tensors(p)])
    return [rests[i] + (heads[i + 1] if i + 1 < len(layers) else []) for i in range(len(layers))]


_STREAMS: dict[int, torch.cuda.Stream] = {}


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(index)
    return _STREAMS[index]


class _Plan:
    def __init__(self, tensors: list[list[torch.Tensor]], device: torch.device):
        self.ranges = [l2_prefetch.ranges_tensor(ts, device) for ts in tensors]
        self._refs = [weakref.ref(t) for ts in tensors for t in ts]

    def alive(self) -> bool:
        return all(ref() is not None for ref in self._refs)


class Prefetch:
    """One forward's prefetches: ``layer(i)`` at the top of layer ``i``; leaving joins the side stream."""

    def __init__(self, ranges: list[torch.Tensor], device: torch.device):
        self.ranges, self.device, self.stream = ranges, device, _side_stream(device)

    def __enter__(self) -> "Prefetch":
        return self

    def layer(self, i: int) -> None:
        if self.ranges[i].shape[0]:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(self.stream):
                l2_prefetch.l2_prefetch(self.ranges[i])

    def __exit__(self, *exc) -> None:
        torch.cuda.current_stream(self.device).wait_stream(self.stream)


def plan(model: nn.Module, layers: Sequence[nn.Module], x: torch.Tensor) -> Prefetch | None:
    """This forward's prefetches, or None: off, not on a GPU that prefetches, or no packed call of
    these rows reads packed words."""
    rows = x.numel() // x.shape[-1]
    if not l2_prefetch.ENABLED or rows > max(dense_above(fmt) for fmt in FORMAT_CODES) or \
            l2_prefetch.device_reason(x.device) is not None:
        return None
    key = tuple(rows <= dense_above(fmt) for fmt in FORMAT_CODES)
    cache = model.__dict__.setdefault("_orbit_prefetch_plans", {})
    found = cache.get(key)
    if found is None or not found.alive():
        if torch.cuda.is_current_stream_capturing():  # a plan is built by the eager steps before a capture
            return None
        if found is not None:  # the side stream may still read the old ranges
            _side_stream(x.device).synchronize()
        found = cache[key] = _Plan(layer_tensors(layers, rows), x.device)
    return Prefetch(found.ranges, x.device) if any(r.shape[0] for r in found.ranges) else None
