"""The decode step captured as CUDA graphs, one per row bucket and set of adapter slots in use.

A decode step launches a kernel per op of every layer from Python, so on a GPU it costs tens of
milliseconds however little it computes. Replaying a captured graph launches them all at once.
The graph covers the whole step (``DecodeLoop.decode_rows``): every layer and the adapter, then
sampling, recording the token and its logprob, and flagging rows that sampled EOS, reached their
length or may have completed a stop string. Its inputs and outputs are the loop's own per-row
tensors and the KV cache, read in place (the split-K attention kernel stops at each row's length;
the reference path masks the whole capacity, since lengths change between replays); graphs
belong to one cache allocation and are dropped with it (``DecodeLoop.release``), so addresses never
change under a captured graph. The host syncs only when it reads the finished rows.

Sampling without top-k or top-p keys its draws by a device counter that the sampling kernel steps
(``orbit::sample_race_``); with them it draws from the loop's generator, registered with the graphs
that use it. Either way a replay advances the state exactly as the same step run eagerly would:
graphed and eager decoding sample the same tokens.

With adapter slots (an engine in its own process, double buffering), one slot reads that slot's
buffers, whose addresses are fixed and whose contents ``write_slot`` replaces in place, so a new
adapter version needs no recapture. Rows of mixed slots read their slot from the per-row tensor.

Warm-up and capture run the step for real, so the per-row state they touch is saved before and
restored after (the sampling counter too), and warm-up samples from a scratch generator (capture
itself draws nothing); keys and values they write sit at positions the next real step writes again.

Small prefills are captured too (``prefill``): an eager prefill launches every kernel of every
layer from Python, which at one 128-token prompt took about 50 ms of host time for about 3 ms of
GPU work. A prefill of consecutive cache rows and at most ``PREFILL_MAX_TOKENS`` tokens is
captured the second time its shape (rows, padded width, first row, adapter slot) comes, so a
shape seen once costs no capture, and replays from then on. Its output, the last-token logits,
lives in the graphs' memory pool until the next prefill replay; the loop samples from it at once.
"""

from __future__ import annotations

import gc
import logging
from typing import TYPE_CHECKING, NamedTuple

import torch

from orbit_core.models.engine_forward import engine_forward

if TYPE_CHECKING:
    from orbit_core.rollout.decode_loop import DecodeLoop

log = logging.getLogger("orbit.rollout")
STATE = ("lengths", "last_token", "n_generated", "active", "finished", "stop_seen", "seed_state")
"""The loop's tensors a step changes besides its output records (per row, and the sampling counter)."""
PREFILL_MAX_TOKENS = 8192
"""Rows times padded width of the largest prefill captured; larger ones keep the GPU busy anyway
(on an H200, a 32-row prefill of 128 tokens took 62 ms of host time eagerly for 23 ms of GPU work)."""
PREFILL_MAX_GRAPHS = 32
"""Prefill shapes captured per cache allocation; later new shapes run eagerly."""
PREFILL_GRAPHS = True
"""Set False to prefill eagerly always (benchmarks compare the two in one process)."""
HIGH_PRIORITY = True
"""Capture on a stream of high priority, above the dequantize-ahead side stream's (the default,
lowest): a replay's own kernels then get the SMs first and the side stream's dequantization fills
in behind them, where at equal priority it slowed them (a 128-token prefill's LoRA expands took
24.3 us beside it against 5.3 alone, ``prefill_generate_split_before_h100.txt``). H100, int4 +
LoRA r16, one process (``decode_throughput_graph_priority_256_h100.jsonl``): 29,754 and 29,804
tok/s against 29,378 at batch 256; within noise at 1 and 4. False: default priority (benchmarks
compare)."""


class _Prefill(NamedTuple):
    graph: torch.cuda.CUDAGraph
    tokens: torch.Tensor
    last_index: torch.Tensor
    logits: torch.Tensor


class GraphedDecode:
    def __init__(self, loop: "DecodeLoop", device: torch.device):
        self.loop, self.device = loop, device
        self.pool = torch.cuda.graph_pool_handle()
        self.graphs: dict[tuple[int, tuple[int, ...]], torch.cuda.CUDAGraph] = {}
        self.prefills: dict[tuple[int, int, int, int], _Prefill] = {}
        self.prefill_pool = torch.cuda.graph_pool_handle()
        self.prefill_seen: set[tuple[int, int, int, int]] = set()
        self.prefill_failed = False
        self.rope = (loop.model.rope_cos, loop.model.rope_sin)
        self.oft = [m for m in loop.model.modules() if hasattr(m, "live_version")]
        self.oft_versions = self._oft_versions()
        self.failed = False

    def _oft_versions(self) -> tuple:
        return tuple(m.live_version() for m in self.oft)

    def _warm_up(self, fn, times: int) -> None:
        """Run ``fn`` on a side stream before capture: the allocator, autotuned kernels and lazily
        built tables settle outside the graph."""
        side = torch.cuda.Stream(self.device)
        side.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(side):
            for _ in range(times):
                fn()
        torch.cuda.current_stream(self.device).wait_stream(side)

    def _record(self, graph: torch.cuda.CUDAGraph, pool, fn):
        """Capture ``fn`` into ``graph`` (allocations from ``pool``); returns what ``fn`` returned."""
        # No garbage collection during capture: an earlier engine's loop and graphs form a cycle,
        # and destroying its CUDA graphs mid-capture invalidates this one (seen as the engine
        # falling back to eager decoding, 8x slower). torch.cuda.graph no longer collects first.
        gc.collect()
        collecting = gc.isenabled()
        gc.disable()
        try:
            # torch.cuda.graph's default capture stream is made once per process, on the device
            # current at the first capture; a later capture for another GPU would launch outside it
            stream = torch.cuda.Stream(self.device, priority=-1 if HIGH_PRIORITY else 0)
            with torch.cuda.graph(graph, pool=pool, stream=stream):
                return fn()
        finally:
            if collecting:
                gc.enable()

    def _capture(self, rows: int, used: tuple[int, ...]) -> None:
        loop = self.loop
        saved = {name: getattr(loop, name).clone() for name in STATE}
        generator = loop.generator
        try:
            loop.generator = scratch = torch.Generator(self.device)
            self._warm_up(lambda: loop.decode_rows(rows, used, graphed=True), times=2)
            loop.generator = generator
            graph = torch.cuda.CUDAGraph()
            if scratch.get_offset():  # the step draws from the generator (the filters' torch path)
                graph.register_generator_state(loop.generator)
            self._record(graph, self.pool, lambda: loop.decode_rows(rows, used, graphed=True))
        finally:
            loop.generator = generator
            for name, value in saved.items():
                getattr(loop, name).copy_(value)
        self.graphs[rows, used] = graph

    def _drop_graphs(self) -> None:
        """Forget every graph; the next captures go to a new memory pool (capturing again into the
        pool of graphs just destroyed trips an allocator assertion)."""
        self.graphs.clear()
        self.pool = torch.cuda.graph_pool_handle()
        self.prefills.clear()
        self.prefill_pool = torch.cuda.graph_pool_handle()

    def _release_generator(self) -> None:
        """After a failed capture the loop's generator stays registered with the broken graph, and
        eager sampling from it fails; continue its stream from a fresh generator."""
        # (its state cannot be copied over: it carries the graph registration with it)
        self.loop.generator = torch.Generator(self.device).manual_seed(self.loop.generator.initial_seed() + 1)

    def _check_current(self) -> None:
        """Drop the graphs when what they read was replaced."""
        model = self.loop.model
        if self.rope[0] is not model.rope_cos or self.rope[1] is not model.rope_sin:
            self._drop_graphs()  # the rope tables were rebuilt (a longer training sequence): recapture
            self.rope = (model.rope_cos, model.rope_sin)
        if self.oft:
            versions = self._oft_versions()
            if versions != self.oft_versions:  # a live OFT adapter moved: its graphs hold the old rotation
                self._drop_graphs()
                self.oft_versions = versions

    def prefill(self, tokens: torch.Tensor, last_index: torch.Tensor, rows: slice, slot: int) -> torch.Tensor | None:
        """The last-token logits of a prefill of cache ``rows`` (consecutive) from a captured graph,
        or None: run it eagerly (too large, first sighting of its shape, or capture unavailable).
        ``tokens`` [rows, width] on the host or the device; ``last_index`` [rows] on the device."""
        key = (rows.start, rows.stop, tokens.shape[1], slot)
        if not PREFILL_GRAPHS or self.failed or self.prefill_failed or tokens.numel() > PREFILL_MAX_TOKENS:
            return None
        self._check_current()
        if key not in self.prefills:
            if key not in self.prefill_seen or len(self.prefills) >= PREFILL_MAX_GRAPHS:
                self.prefill_seen.add(key)
                return None
            try:
                with torch.cuda.device(self.device):
                    self.prefills[key] = self._capture_prefill(tokens, last_index, rows)
            except Exception as err:  # prefill eagerly from now on; decode graphs are separate
                self.prefill_failed = True
                log.warning("CUDA graph capture of a prefill failed (%s: %s); prefilling without graphs",
                            type(err).__name__, err)
                return None
        captured = self.prefills[key]
        captured.tokens.copy_(tokens, non_blocking=True)
        captured.last_index.copy_(last_index)
        with torch.cuda.device(self.device):
            captured.graph.replay()
        return captured.logits

    def _capture_prefill(self, tokens: torch.Tensor, last_index: torch.Tensor, rows: slice) -> _Prefill:
        loop = self.loop
        static_tokens = tokens.to(self.device, copy=True)  # the graph's own: replays copy into it
        static_last = last_index.clone()

        def forward() -> torch.Tensor:
            with engine_forward():
                return loop.model(static_tokens, cache=loop.cache, slots=rows, last_index=static_last)

        self._warm_up(forward, times=1)  # the keys and values it writes are the ones replay writes
        graph = torch.cuda.CUDAGraph()
        logits = self._record(graph, self.prefill_pool, forward)
        return _Prefill(graph, static_tokens, static_last, logits)

    def replay(self, rows: int, used: tuple[int, ...]) -> bool:
        """Run one decode step over rows ``[0, rows)``; False when capture is unavailable (decode eagerly)."""
        if self.failed:
            return False
        self._check_current()
        if (rows, used) not in self.graphs:
            try:
                # capture on (and replay from) the model's device: from another current device the
                # replay would not be ordered after the host's writes to the per-row tensors
                with torch.cuda.device(self.device):
                    self._capture(rows, used)
            except Exception as err:  # a model op that cannot be captured: decode eagerly from now on
                self.failed = True
                log.warning("CUDA graph capture failed (%s: %s); decoding without graphs", type(err).__name__, err)
                self._release_generator()
                return False
        with torch.cuda.device(self.device):
            self.graphs[rows, used].replay()
        return True
