"""The decode forward captured as CUDA graphs, one per row bucket (powers of two, at least 8).

A decode step launches a kernel per op of every layer from Python, so on a GPU it costs tens of
milliseconds however little it computes. Replaying a captured graph launches them all at once.
A graph owns its inputs: the step's last tokens and positions are copied into static buffers, the
attention mask is built inside the graph from the positions, and the keys and values are the KV
cache's own storage, read over its whole capacity. Graphs belong to one cache allocation and are
dropped with it (``DecodeLoop.release``), so addresses never change under a captured graph.

With adapter slots (an engine in its own process, double buffering), a graph is captured per
bucket and per set of slots in use: one slot reads that slot's buffers, whose addresses are fixed
and whose contents ``write_slot`` replaces in place, so a new adapter version needs no recapture.
Rows of mixed slots read their slot from a static per-row buffer, copied in before each replay.

Warm-up and capture write their keys and values at the cache's last position, which no sequence
ever reaches (``DecodeLoop._fits`` keeps one position spare), so capturing mid-generation is safe.
"""

from __future__ import annotations

import logging

import torch

from orbit_core.models.transformer import DecoderLM, KVCache
from orbit_core.peft.slots import SlotBank

log = logging.getLogger("orbit.rollout")
MIN_BUCKET = 8


class GraphedDecode:
    def __init__(self, model: DecoderLM, cache: KVCache, bank: SlotBank | None = None):
        self.model, self.cache, self.bank = model, cache, bank
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple, tuple[torch.cuda.CUDAGraph, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        self.key_index = torch.arange(cache.capacity, device=cache.k.device)
        self.rope = (model.rope_cos, model.rope_sin)
        self.failed = False

    def bucket(self, rows: int) -> int:
        return min(max(MIN_BUCKET, 1 << (rows - 1).bit_length()), self.cache.k.shape[1])

    def _forward(self, tokens: torch.Tensor, positions: torch.Tensor, rows: int, used: tuple[int, ...],
                 row_slot: torch.Tensor) -> torch.Tensor:
        if self.bank is not None:
            self.bank.set_rows(row_slot if len(used) > 1 else None, used)
        mask = (self.key_index[None, :] <= positions)[:, None, None, :]
        view = KVCache(self.cache.k[:, :rows], self.cache.v[:, :rows])
        return self.model(tokens, positions, cache=view, decode_mask=mask)[:, -1]

    def _capture(self, rows: int, used: tuple[int, ...]) -> None:
        # torch.cuda.graph captures on a stream of the *current* device; a model on another GPU
        # would launch its kernels outside the capture
        with torch.cuda.device(self.cache.k.device):
            self._capture_here(rows, used)

    def _capture_here(self, rows: int, used: tuple[int, ...]) -> None:
        device = self.cache.k.device
        tokens = torch.zeros(rows, 1, dtype=torch.long, device=device)
        positions = torch.full((rows, 1), self.cache.capacity - 1, dtype=torch.long, device=device)
        row_slot = torch.full((rows,), used[0], dtype=torch.long, device=device)
        side = torch.cuda.Stream(device)
        side.wait_stream(torch.cuda.current_stream(device))
        with torch.cuda.stream(side):  # warm-up: allocator, autotuned kernels, lazily built tables
            for _ in range(2):
                self._forward(tokens, positions, rows, used, row_slot)
        torch.cuda.current_stream(device).wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        # torch.cuda.graph's default capture stream is made once per process, on the device current at
        # the first capture; a later capture for another GPU would launch its kernels outside the graph
        with torch.cuda.graph(graph, pool=self.pool, stream=torch.cuda.Stream(device)):
            logits = self._forward(tokens, positions, rows, used, row_slot)
        self.graphs[rows, used] = (graph, tokens, positions, row_slot, logits)

    def logits(self, last_token: torch.Tensor, lengths: torch.Tensor, used: tuple[int, ...] = (0,),
               row_slot: torch.Tensor | None = None) -> torch.Tensor | None:
        """Logits ``[hi, vocab]`` for the rows' next positions, or None when capture is unavailable.
        ``used``: the adapter slots the rows read; ``row_slot`` [hi]: each row's, when more than one."""
        if self.failed:
            return None
        if self.rope[0] is not self.model.rope_cos or self.rope[1] is not self.model.rope_sin:
            self.graphs.clear()  # the rope tables were rebuilt (a longer training sequence): recapture
            self.rope = (self.model.rope_cos, self.model.rope_sin)
        hi = last_token.shape[0]
        rows = self.bucket(hi)
        used = tuple(used) or (0,)
        if (rows, used) not in self.graphs:
            try:
                self._capture(rows, used)
            except Exception as err:  # a model op that cannot be captured: decode eagerly from now on
                self.failed = True
                log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(err).__name__, err)
                return None
        graph, tokens, positions, slots, logits = self.graphs[rows, used]
        if len(used) > 1:
            slots[:hi].copy_(row_slot)
        tokens[:hi, 0].copy_(last_token)
        positions[:hi, 0].copy_(lengths)
        positions[hi:].fill_(self.cache.capacity - 1)  # padding rows write only the spare position
        # replay launches on the current device's stream: from another device it would not be
        # ordered after the copies above, and could read the previous step's tokens
        with torch.cuda.device(self.cache.k.device):
            graph.replay()
        return logits[:hi]
