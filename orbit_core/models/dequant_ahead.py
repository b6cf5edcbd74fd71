"""Dequantize the next layer's packed weights on a side stream while the engine runs this one.

Above a few rows (``packed_gemm.dense_above``) a packed linear's forward dequantizes its weight and
calls cuBLAS. Inline, each dequantization waits for the op before it and holds up the GEMM after
it, though it only moves memory while the GEMMs of a decode step, at a few hundred rows, leave most
SMs idle: on an H200 at the Qwen3-1.7B shape, batch 256, int4 + LoRA, the 112 dequantizations took
1.01 ms of a 6.12 ms step (``bench/results/decode_graph_replay_profile_round_h200.txt``).

Here the engine's layer loop (``DecoderLM._engine_layers``) has layer ``i + 1``'s packed calls
(``projections.packed_calls``) dequantized on a side stream, into one of two buffers, while layer
``i`` runs; each packed call of layer ``i`` then finds its dense weight (``dense_for``). The side
stream writes a buffer only once the layer that last read it is done, and the main stream reads
one only once its writes are done (stream waits, which a CUDA graph captures as dependencies).
The arithmetic is the inline path's: the same dequantization kernel, the same cuBLAS call.

Memory: two layers' dense weights (200 MB in bf16 at the Qwen3-1.7B shape) instead of one
linear's at a time, while a forward runs; a captured decode graph keeps them in its memory pool,
which the engine's graphs of every row bucket share.

Measured (H200, one process, ``bench/results/decode_throughput_dequant_ahead_h200.jsonl``): int4 +
LoRA 34,446 tok/s against 33,665 inline at batch 256 and 14,268 against 13,783 at 64; fp8 + LoRA
2.4-3.6% faster. The dequantization competes with the other kernels for memory, so the batch-256
replay gains 0.22 ms of the 1.02 ms it took inline.
"""

from __future__ import annotations

import contextvars
from contextlib import nullcontext
from collections.abc import Sequence

import torch
from torch import nn

from orbit_core.models.projections import PackedParts, packed_calls
from orbit_kernels.packed_gemm import dense_above, dequant_reason, dequantize
from orbit_kernels.packed_grad import dense_weight
from orbit_kernels.packed_gemv import FORMAT_CODES

ENABLED = True
"""Set False to dequantize inline, in each linear's own call (benchmarks compare the two)."""

_ACTIVE: contextvars.ContextVar["DequantAhead | None"] = contextvars.ContextVar("orbit_dequant_ahead", default=None)
_STREAMS: dict[int, torch.cuda.Stream] = {}


def dense_for(weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
    """The dense weight dequantized ahead for the packed ``weight`` (as a packed call passes it),
    or None: no engine forward is dequantizing ahead, or not this weight in ``dtype``."""
    ahead = _ACTIVE.get()
    return None if ahead is None else ahead.lookup(weight, dtype)


def _key(weight: torch.Tensor) -> tuple[int, tuple[int, ...]]:
    return weight.data_ptr(), tuple(weight.shape)


def _side_stream(device: torch.device) -> torch.cuda.Stream:
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _STREAMS:
        _STREAMS[index] = torch.cuda.Stream(index)
    return _STREAMS[index]


class DequantAhead:
    """One forward's schedule: ``calls[i]`` are the packed calls of layer ``i`` to dequantize.

    ``side=False`` dequantizes on the current stream when each layer is entered (the CPU; tests)."""

    def __init__(self, calls: Sequence[Sequence[PackedParts]], dtype: torch.dtype, device: torch.device,
                 side: bool = True):
        self.calls, self.dtype, self.device = calls, dtype, device
        self.stream = _side_stream(device) if side else None
        self.hits = 0
        """Packed calls served a dense weight from here (tests check that every call was)."""
        self._pending: dict[int, dict] = {}
        self._ready: dict[int, torch.cuda.Event] = {}
        self._dense: dict = {}
        self._buffers: list[torch.Tensor] = []

    def lookup(self, weight: torch.Tensor, dtype: torch.dtype) -> torch.Tensor | None:
        dense = self._dense.get(_key(weight))
        if dense is None or dense.dtype != dtype:
            return None
        self.hits += 1
        return dense

    def __enter__(self) -> "DequantAhead":
        size = max(sum(p.weight.shape[0] * p.in_features for p in layer) for layer in self.calls)
        self._buffers = [torch.empty(size, dtype=self.dtype, device=self.device) for _ in range(2)]
        self._token = _ACTIVE.set(self)
        self._issue(0)
        return self

    def __exit__(self, *exc) -> None:
        _ACTIVE.reset(self._token)
        if self.stream is not None:  # join: nothing after the forward runs before the side stream's work
            torch.cuda.current_stream(self.device).wait_stream(self.stream)
        self._pending, self._ready, self._dense, self._buffers = {}, {}, {}, []

    def enter_layer(self, i: int) -> None:
        """Layer ``i`` is about to run: the main stream waits for its dense weights, and layer
        ``i + 1``'s dequantization starts into the other buffer once all the main stream has queued
        so far is done (layer ``i - 1``, that buffer's last reader, with it)."""
        if i in self._ready:
            torch.cuda.current_stream(self.device).wait_event(self._ready.pop(i))
        self._dense = self._pending.pop(i, {})
        self._issue(i + 1)

    def _issue(self, i: int) -> None:
        if i >= len(self.calls) or not self.calls[i]:
            return
        buffer, offset, views = self._buffers[i % 2], 0, {}
        if self.stream is not None:
            self.stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(self.stream) if self.stream is not None else nullcontext():
            for parts in self.calls[i]:
                offset = self._into(parts, buffer, offset, views)
        self._pending[i] = views
        if self.stream is not None:
            self._ready[i] = torch.cuda.Event()
            self._ready[i].record(self.stream)

    @staticmethod
    def _into(parts: PackedParts, buffer: torch.Tensor, offset: int, views: dict) -> int:
        """Dequantize ``parts`` into ``buffer`` at ``offset``; returns the offset after it."""
        rows = parts.weight.shape[0]
        out = buffer[offset:offset + rows * parts.in_features].view(rows, parts.in_features)
        tensors = (parts.fmt, parts.weight, parts.scale, parts.global_scale, parts.in_features, out.dtype)
        if out.is_cuda:  # the dequantization kernel the format ops run, writing in place
            dequantize(*tensors, out=out)
        else:
            out.copy_(dense_weight(*tensors))
        views[_key(parts.weight)] = out
        return offset + rows * parts.in_features


def plan(layers: Sequence[nn.Module], x: torch.Tensor) -> DequantAhead | None:
    """The schedule for an engine forward of ``x`` through ``layers``, or None: off, not on a GPU,
    or no packed call of these rows dequantizes (the GEMV and the packed GEMM read packed words)."""
    rows = x.numel() // x.shape[-1]
    # no module walk for the few rows that no format dequantizes (an eager decode step's)
    if not ENABLED or not x.is_cuda or rows <= min(dense_above(fmt) for fmt in FORMAT_CODES):
        return None
    calls = [[p for p in packed_calls(layer) if rows > dense_above(p.fmt) and dequant_reason(p.weight) is None]
             for layer in layers]
    return DequantAhead(calls, x.dtype, x.device) if any(calls) else None
