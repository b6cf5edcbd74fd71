"""Continuous batching over a preallocated KV cache, one prefill or decode step at a time.

Requests may be added while the loop runs (the engine process streams them in). Design for speed:
  * one KV cache ``[layers, slots, kv_heads, capacity, head_dim]`` allocated once and reused;
  * free slots are handed out lowest first and a decode step runs only the rows up to the highest
    busy slot (rounded up to a power of two), so a draining batch gets cheaper as it empties;
  * a decode step is all tensor ops, sampling and the EOS / length / stop-trigger checks included,
    so on a GPU the whole step replays as one CUDA graph; finished rows are flagged on the device
    and the host reads the flags every ``check_every`` steps, first from a probe the check before
    sent without waiting, so that it syncs only when there is a row to read (a row may run a few
    steps past its end; those tokens are dropped), and at the step where a row reaches
    ``max_new_tokens``, which the host knows without asking. Stop strings are decoded only for rows
    that sampled a token that can complete one;
  * finished rows come back to the host in one transfer per check, not a few per row.
With a ``SlotBank`` (engine copy of the adapter), each row remembers the adapter slot it was
admitted under and keeps it to the end: a sequence never mixes adapter versions.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from dataclasses import dataclass

import torch

from orbit_core.models.engine_forward import engine_forward
from orbit_core.models.moe import moe_layers, moe_routing, stack_trace
from orbit_core.models.transformer import DecoderLM, KVCache
from orbit_core.peft.slots import SlotBank
from orbit_core.rollout.cuda_graphs import GraphedDecode
from orbit_core.rollout.sampling import sample_tokens
from orbit_core.rollout.types import Completion, SamplingParams
from orbit_kernels.decode_record import record_step_

KV_BUCKET = 32
PREFILL_BUCKET = 8
MIN_ROWS = 8
GRAPH_CHECK_EVERY = 4
"""With CUDA graphs the host reads finished rows every this many decode steps (eagerly, every step)."""
PROBED_CHECKS = True
"""A check between the host-known length limits first reads a probe of the flags that the check
before sent to the host without waiting, and reads the rows themselves (a sync, draining the steps
queued on the GPU) only when the probe shows a finished row or a stop trigger. A row may then run up
to ``2 * check_every`` steps past its end. False: every check syncs (benchmarks compare). H100,
one process (``decode_throughput_probed_checks_h100.jsonl``): int4 + LoRA 747.0 and 742.5 tok/s
against 728.2 at batch 1, 9,659 and 9,638 against 9,499 at 32; bf16 + LoRA 1,612 and 1,621
against 1,560 at 4."""
ASYNC_ADMIT = True
"""An admit sends its prompts and row numbers through pinned memory without waiting, and takes the
longest prompt from the host. False: copies from pageable memory and the longest prompt read back
from the device, each a wait for the work queued before it, so the host sat idle through the
prefill and the GPU through the admit's bookkeeping after it (benchmarks compare)."""
ONE_READ = True
"""A completion reads its rows' counts and records back in one wait (copies into pinned memory, then
one synchronize), with the row numbers sent and the rows' flags cleared without waiting. False: a
read per record kind and Python values written through an index, each a wait for the work queued
before it, with the GPU idle between them (benchmarks compare)."""
ADMIT_PROBE = True
"""An admit ends by sending the flags' probe (``PROBED_CHECKS``), so that the first check after it
reads the probe instead of draining the GPU. False: the first check after an admit syncs
(benchmarks compare)."""


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


def row_bucket(rows: int, slots: int) -> int:
    """Rows a decode step runs: a power of two (at least ``MIN_ROWS``), at most the cache's slots."""
    return min(max(MIN_ROWS, 1 << (rows - 1).bit_length()), slots)


@dataclass
class Request:
    prompt_index: int
    sample_index: int
    prompt: list[int]
    tag: object = None
    """The caller's label (the engine process uses the batch id)."""


class DecodeLoop:
    def __init__(self, model: DecoderLM, tokenizer, generator: torch.Generator, max_running: int,
                 bank: SlotBank | None = None, audit: bool = False, streaming: bool = False, cuda_graph: bool = True,
                 check_every: int | None = None):
        """``streaming``: requests keep arriving, so size the cache for ``max_running`` rows up front
        (otherwise for the requests waiting when it is allocated). ``cuda_graph``: replay the decode
        step as CUDA graphs (on a CUDA device; with adapter slots too). ``check_every``: decode steps
        between host reads of the finished rows (default: ``GRAPH_CHECK_EVERY`` with graphs, else 1)."""
        self.model, self.tokenizer, self.generator = model, tokenizer, generator
        self.max_running = max_running
        self.streaming = streaming
        self.bank = bank
        self.audit = audit
        self.device = next(model.parameters()).device
        eos = set(model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)
        self.eos_list = sorted(eos)
        self.pad_id = tokenizer.pad_token_id if getattr(tokenizer, "pad_token_id", None) is not None else 0
        self.cache: KVCache | None = None
        self.moe = moe_layers(model)
        """MoE layers: their experts per token are recorded on every completion (``Completion.routing``)."""
        # routing reads its choices back to the host, which a captured graph cannot
        self.use_graphs = cuda_graph and self.device.type == "cuda" and not self.moe
        self.check_every = check_every or (GRAPH_CHECK_EVERY if self.use_graphs else 1)
        self.graphed: GraphedDecode | None = None
        self.busy_rows: dict[int, Request] = {}
        self.params: SamplingParams | None = None
        self.pending: deque[Request] = deque()
        self.version = 0  # recorded on completions when there is no slot bank
        self.active_slot = 0
        self.slot_refs = [0] * (bank.num_slots if bank else 1)
        self.since_check = 0
        self.decode_steps = 0
        self.row_due: dict[int, int] = {}
        """The decode step (``decode_steps``) at which each busy row reaches ``max_new_tokens``."""
        self._token_text: list[str] | None = None
        self._triggers: dict[tuple[str, ...], torch.Tensor] = {}

    # -- state -----------------------------------------------------------------------------
    @property
    def running(self) -> int:
        return len(self.busy_rows)

    @property
    def idle(self) -> bool:
        return not self.pending and not self.busy_rows

    def release(self) -> None:
        """Free the KV cache (colocated engines give the memory back while the trainer runs)."""
        assert self.idle, "release() with sequences in flight"
        self.cache = self.graphed = None
        if self.device.type == "cuda":
            torch.cuda.empty_cache()

    def reset(self) -> None:
        """Drop everything in flight (after an error mid-generation)."""
        self.pending.clear()
        self.busy_rows = {}
        self.row_due = {}
        self.slot_refs = [0] * len(self.slot_refs)
        self.cache = self.graphed = None

    def submit(self, requests: list[Request], params: SamplingParams) -> None:
        if self.params != params:
            if not self.idle:
                raise RuntimeError("sampling params can only change while the engine is idle")
            self.params = params
            self.cache = self.graphed = None
        self.pending.extend(requests)

    def _stop_triggers(self, stop: tuple[str, ...]) -> torch.Tensor | None:
        """[vocab] bool: tokens whose text holds the last character of some stop string."""
        if not stop:
            return None
        if stop not in self._triggers:
            if self._token_text is None:
                vocab = self.model.config.vocab_size
                self._token_text = [self.tokenizer.decode([i]) for i in range(min(vocab, len(self.tokenizer)))]
            ends = {s[-1] for s in stop if s}
            mask = torch.zeros(self.model.config.vocab_size, dtype=torch.bool)
            for i, text in enumerate(self._token_text):
                if any(ch in text for ch in ends):
                    mask[i] = True
            self._triggers[stop] = mask.to(self.device)
        return self._triggers[stop]

    def _allocate(self, prompt_len: int) -> None:
        """(Re)allocate the cache and per-row state; only called while no sequence is running.

        The per-row state lives as long as the cache: captured graphs read and write it in place.
        """
        p, device = self.params, self.device
        wanted = self.max_running if self.streaming else min(self.max_running, max(len(self.pending), 1))
        slots = 1 << (wanted - 1).bit_length()  # power-of-two buckets keep shapes reusable
        capacity = round_up(round_up(prompt_len, PREFILL_BUCKET) + p.max_new_tokens + 1, KV_BUCKET)
        c = self.cache
        if c is None or c.k.shape[1] < slots or c.capacity < capacity:
            dtype = next(self.model.parameters()).dtype
            self.cache = self.graphed = None  # free the old one before allocating
            self.cache = KVCache.allocate(self.model.config, slots, capacity, dtype, device)
            slots, max_new = self.cache.k.shape[1], p.max_new_tokens
            self.model.ensure_rope(self.cache.capacity, device)
            self.lengths = torch.zeros(slots, dtype=torch.long, device=device)
            self.last_token = torch.zeros(slots, dtype=torch.long, device=device)
            self.n_generated = torch.zeros(slots, dtype=torch.long, device=device)
            self.out_tokens = torch.zeros(slots, max_new, dtype=torch.long, device=device)
            self.out_logprobs = torch.zeros(slots, max_new, dtype=torch.float32, device=device)
            self.out_topk = torch.zeros(slots, max_new, max(p.topk_ids, 1), dtype=torch.long, device=device)
            self.out_versions = torch.zeros(slots, max_new, dtype=torch.long, device=device)
            self.row_adapter = torch.zeros(slots, dtype=torch.long, device=device)
            self.active = torch.zeros(slots, dtype=torch.bool, device=device)
            self.finished = torch.zeros(slots, dtype=torch.bool, device=device)
            """Set on the device when a row samples EOS or reaches max_new_tokens; read by ``_check``."""
            self.stop_seen = torch.zeros(slots, dtype=torch.bool, device=device)
            """Set when a row sampled a token that can complete a stop string since the last check."""
            self.probe_host = torch.zeros(slots, dtype=torch.bool, pin_memory=device.type == "cuda")
            self.slot_versions = torch.zeros(len(self.slot_refs), dtype=torch.long, device=device)
            self.versions_sent: list[int] | None = None  # what slot_versions holds, as last written
            # the sampling kernel's seed: a base drawn from the generator here and a counter the kernel
            # steps, so that a captured step uses no generator (two host-side fills and a kernel a
            # replay); the kernel runs on GPUs only, so a CPU loop's generator stream stays as it was
            self.seed_state = torch.zeros(2, dtype=torch.long, device=device)
            if device.type == "cuda":
                self.seed_state[:1] = torch.randint(0, 2 ** 62, (1,), device=device, generator=self.generator)
            if self.moe:
                self.routing = torch.zeros(slots, self.cache.capacity, len(self.moe), self.moe[0].top_k,
                                           dtype=torch.int16, device=device)
        self.triggers = self._stop_triggers(p.stop)
        self.free = list(range(self.cache.k.shape[1]))
        self.busy_rows = {}
        self.row_slot_host: dict[int, int] = {}
        self.row_version: dict[int, int] = {}
        self.scanned: dict[int, int] = {}
        self.row_due = {}
        self.max_len = 0
        self.since_check = 0
        self.probe: tuple[torch.Tensor, torch.cuda.Event | None] | None = None
        self.refresh_versions()

    def refresh_versions(self) -> None:
        """Call after a slot is written: the audit reads each slot's version from this tensor (in place,
        since captured graphs hold its address). With ``ASYNC_ADMIT`` the versions go through pinned
        memory, and only when they changed: a generate's start calls this, and a copy from pageable
        memory waits for the work queued before it."""
        if self.cache is None:
            return
        versions = list(self.bank.versions if self.bank else [self.version])
        if ASYNC_ADMIT:
            if versions != self.versions_sent:
                self.slot_versions.copy_(self._staged(torch.tensor(versions, dtype=torch.long)))
                self.versions_sent = versions
            return
        self.slot_versions.copy_(torch.tensor(versions, dtype=torch.long))

    # -- stepping --------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, Completion]]:
        """Admit waiting requests (one prefill) if a slot is free, else one decode step. Returns finished ones."""
        if self.pending and not self.busy_rows:  # idle -> busy: size the cache for what waits
            self._allocate(max(len(r.prompt) for r in self.pending))
        if self.pending and self.free and self._fits(self.pending[0]):
            self._admit()
            # eager loops check every step, so a sequence that ends at its first token ends here
            return self._check() if self.check_every == 1 or self._due() else []
        if self.busy_rows:
            self._decode()
            self.decode_steps += 1
            self.since_check += 1
            if self._due():
                return self._check()
            if self.since_check >= self.check_every:
                if self._probe_flagged():
                    return self._check()
                self._take_probe()  # nothing to read: probe again
        return []

    def _probe_flagged(self) -> bool:
        """Whether the last probe (``PROBED_CHECKS``) saw a finished row or a stop trigger; True when
        there is none (``_take_probe`` leaves none where probes are off). Its copy was queued a check
        ago, so waiting for it does not wait for the steps queued since."""
        if self.probe is None:
            return True
        host, copied = self.probe
        if copied is not None:
            copied.synchronize()
        return bool(host.any())

    def _take_probe(self) -> None:
        """Send the rows' finished / stop-trigger flags to the host without waiting for them."""
        self.since_check = 0
        if not PROBED_CHECKS or self.check_every == 1 or not self.busy_rows:
            self.probe = None
            return
        hi = max(self.busy_rows) + 1
        host = self.probe_host[:hi]
        host.copy_(self.finished[:hi] | self.stop_seen[:hi], non_blocking=True)
        copied = None
        if self.device.type == "cuda":  # on the stream of the flags' device, which may not be the current one
            copied = torch.cuda.Event()
            copied.record(torch.cuda.current_stream(self.device))
        self.probe = (host, copied)

    def _due(self) -> bool:
        """Whether some row has reached ``max_new_tokens`` (decoding on would only waste steps)."""
        return min(self.row_due.values(), default=self.decode_steps + 1) <= self.decode_steps

    def _fits(self, request: Request) -> bool:
        return round_up(len(request.prompt), PREFILL_BUCKET) + self.params.max_new_tokens + 1 <= self.cache.capacity

    def _admit(self) -> None:
        admitted, batch = [], []
        while self.pending and self.free and self._fits(self.pending[0]):
            admitted.append(heapq.heappop(self.free))
            batch.append(self.pending.popleft())
        ids = [r.prompt for r in batch]
        longest = max(len(x) for x in ids)
        width = round_up(longest, PREFILL_BUCKET)
        tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        host_rows = torch.tensor([[len(x) for x in ids], admitted], dtype=torch.long)
        if ASYNC_ADMIT:
            tokens, host_rows = self._staged(tokens), self._staged(host_rows)
        else:
            host_rows = host_rows.to(self.device)
        prompt_lengths, rows = host_rows[0], host_rows[1]
        if self.bank is not None:
            self.bank.set_rows(None, (self.active_slot,))
        # consecutive rows (a fresh batch always is) write the cache through a slice: a plain copy,
        # where a row index costs an indexed write several times slower
        lo, hi = admitted[0], admitted[-1] + 1
        slots = slice(lo, hi) if admitted == list(range(lo, hi)) else rows
        logits = None
        if self.use_graphs and isinstance(slots, slice):
            logits = self._graphs().prefill(tokens, prompt_lengths - 1, slots, self.active_slot)
        if logits is None:
            with self._trace() as traces, engine_forward():
                logits = self.model(tokens.to(self.device, non_blocking=True), cache=self.cache, slots=slots,
                                    last_index=prompt_lengths - 1)
        else:
            traces = None  # graphs are off for MoE models, whose routing is traced
        if traces is not None:
            self.routing[rows, :width] = stack_trace(traces).view(len(ids), width, len(self.moe), -1).to(torch.int16)
        # scalars go in through index_fill_: an indexed write of a Python value copies it from pageable
        # host memory, which waits for the prefill queued above
        self.lengths.index_copy_(0, rows, prompt_lengths)
        self.n_generated.index_fill_(0, rows, 0)
        self.row_adapter.index_fill_(0, rows, self.active_slot)
        self.active.index_fill_(0, rows, True)
        self.finished.index_fill_(0, rows, False)
        self.stop_seen.index_fill_(0, rows, False)
        version = self.bank.versions[self.active_slot] if self.bank else self.version
        for row, request in zip(admitted, batch):
            self.busy_rows[row] = request
            self.row_slot_host[row] = self.active_slot
            self.row_version[row] = version
            self.scanned[row] = 0
            self.row_due[row] = self.decode_steps + self.params.max_new_tokens - 1  # the prefill sampled one
        self.slot_refs[self.active_slot] += len(admitted)
        self.max_len = max(self.max_len, longest if ASYNC_ADMIT else int(prompt_lengths.max()))
        p = self.params
        new_tokens, new_logprobs = sample_tokens(logits, p.temperature, p.top_k, p.top_p, self.generator,
                                                 self.seed_state)
        hi = max(self.busy_rows) + 1
        which = torch.zeros(hi, dtype=torch.bool, device=self.device).index_fill_(0, rows, True)
        full_tokens = torch.zeros(hi, dtype=torch.long, device=self.device).index_copy(0, rows, new_tokens)
        full_logprobs = torch.zeros(hi, dtype=torch.float32, device=self.device).index_copy(0, rows, new_logprobs.float())
        full_logits = None
        if p.topk_ids:
            full_logits = torch.zeros(hi, logits.shape[-1], device=self.device).index_copy(0, rows, logits.float())
        self._record(hi, full_tokens, full_logprobs, which, full_logits)
        if ADMIT_PROBE:
            self._take_probe()

    def _staged(self, host: torch.Tensor) -> torch.Tensor:
        """``host`` on the loop's device without waiting for the work queued there: a copy from
        pageable memory syncs the stream first, so on a GPU it goes through pinned memory (the
        caching host allocator keeps the block until the copy is done)."""
        if self.device.type != "cuda":
            return host.to(self.device)
        return host.pin_memory().to(self.device, non_blocking=True)

    def _decode(self) -> None:
        rows = row_bucket(max(self.busy_rows) + 1, self.cache.k.shape[1])
        used = tuple(s for s, n in enumerate(self.slot_refs) if n > 0) if self.bank is not None else (0,)
        if not (self.use_graphs and self._graphs().replay(rows, used or (0,))):
            self.decode_rows(rows, used, graphed=False)
        self.max_len += 1

    def _graphs(self) -> GraphedDecode:
        """The loop's CUDA graphs, made at first use (the cache's device is known by then)."""
        if self.graphed is None:
            self.graphed = GraphedDecode(self, self.cache.k.device)
        return self.graphed

    def decode_rows(self, rows: int, used: tuple[int, ...], graphed: bool) -> None:
        """One decode step over rows ``[0, rows)``: forward, sample, record, flag finished rows.

        Tensor ops only (captured whole as a CUDA graph when ``graphed``). The reference attention's
        mask covers the whole capacity in a graph, since lengths change between replays; on a GPU the
        engine's attention kernel reads only each row's live keys and builds none.
        """
        lengths = self.lengths[:rows]
        row_slot = self.row_adapter[:rows] if len(used) > 1 else None
        kv_len = self.cache.capacity if graphed else min(round_up(self.max_len + 1, KV_BUCKET), self.cache.capacity)
        view = KVCache(self.cache.k[:, :rows], self.cache.v[:, :rows])
        if self.bank is not None:
            self.bank.set_rows(row_slot, used)
        with self._trace() as traces, engine_forward():
            logits = self.model(self.last_token[:rows, None], lengths[:, None], cache=view, decode_kv_len=kv_len)[:, -1]
        if traces is not None:  # the fed token sits at position `lengths`
            self.routing[torch.arange(rows, device=self.device), lengths] = stack_trace(traces).to(torch.int16)
        p = self.params
        tokens, logprobs = sample_tokens(logits, p.temperature, p.top_k, p.top_p, self.generator, self.seed_state)
        self._record(rows, tokens, logprobs, self.active[:rows], logits if p.topk_ids else None, lengths)

    def _trace(self):
        return moe_routing(self.model) if self.moe else contextlib.nullcontext(None)

    def _record(self, hi: int, tokens, logprobs, which, logits, lengths=None) -> None:
        """Record the sampled tokens of rows ``[0, hi)`` that ``which`` marks (it may be a view of
        ``active``), and step ``lengths`` for them when given (``orbit::record_step_``)."""
        p = self.params
        if logits is not None or self.audit:  # at the step's slots, before the counters move
            rows = torch.arange(hi, device=self.device)
            idx = self.n_generated[:hi].clamp(max=p.max_new_tokens - 1)
            if logits is not None:
                top = logits.float().topk(p.topk_ids, dim=-1).indices
                self.out_topk[rows, idx] = torch.where(which[:, None], top, self.out_topk[rows, idx])
            if self.audit:
                now = self.slot_versions[self.row_adapter[:hi]]
                self.out_versions[rows, idx] = torch.where(which, now, self.out_versions[rows, idx])
        record_step_(tokens, logprobs, which, self.n_generated[:hi], self.last_token[:hi], self.finished[:hi],
                     self.active[:hi], self.stop_seen[:hi], self.triggers, self.eos_ids, self.out_tokens[:hi],
                     self.out_logprobs[:hi], p.max_new_tokens, lengths)

    def _check(self) -> list[tuple[Request, Completion]]:
        """Read the finished rows back to the host (the step's only sync) and complete them; then
        probe the rows left (after the completions' writes, so that it does not see them)."""
        hi = max(self.busy_rows) + 1
        flags = torch.stack([self.finished[:hi], self.stop_seen[:hi]]).cpu()
        ending: list[tuple[int, int | None]] = []
        for row in flags.any(0).nonzero().flatten().tolist():
            stop_at = self._stop_position(row, bool(flags[0, row])) if flags[1, row] else None
            if stop_at is not None or flags[0, row]:
                ending.append((row, stop_at))
        done = self._complete(ending) if ending else []
        self._take_probe()
        return done

    def _stop_position(self, row: int, finished: bool) -> int | None:
        """Tokens up to the first one whose text completes a stop string (None: no stop yet).

        Only tokens that could end one are decoded, and not the token the row finished on (EOS or
        the length limit), as when the check ran every step.
        """
        self.stop_seen[row] = False
        count = int(self.n_generated[row])
        token_ids = self.out_tokens[row, :count].tolist()
        triggers = self.triggers[self.out_tokens[row, :count]].tolist()
        start, self.scanned[row] = self.scanned[row], count
        for end in range(start, count - 1 if finished else count):
            if triggers[end] and any(s in self.tokenizer.decode(token_ids[: end + 1]) for s in self.params.stop):
                return end + 1
        return None

    def _complete(self, ending: list[tuple[int, int | None]]) -> list[tuple[Request, Completion]]:
        """Complete each ``(row, stop_at)`` (``stop_at``: tokens kept up to a stop string, None for EOS
        or the length limit), reading all their records back in one wait (``ONE_READ``; else one
        transfer per record kind)."""
        p = self.params
        rows = [row for row, _ in ending]
        if ONE_READ:
            index = self._staged(torch.tensor(rows, dtype=torch.long))
            # a row holds at most its prefill's token and one a decode step since its admit
            width = min(p.max_new_tokens, max(self.decode_steps - self.row_due[row] + p.max_new_tokens for row in rows))
            parts = [self.n_generated[index], self.out_tokens[index, :width], self.out_logprobs[index, :width],
                     self.out_topk[index, :width] if p.topk_ids else None,
                     self.out_versions[index, :width] if self.audit else None]
            parts = self._read(parts)
            generated, tokens, logprobs, topk, versions = [None if t is None else t.tolist() for t in parts]
            counts = [n if stop_at is None else stop_at for n, (_, stop_at) in zip(generated, ending)]
        else:
            index = torch.tensor(rows, device=self.device)
            generated = self.n_generated[index].tolist()
            counts = [n if stop_at is None else stop_at for n, (_, stop_at) in zip(generated, ending)]
            width = max(counts)
            tokens = self.out_tokens[index, :width].tolist()
            logprobs = self.out_logprobs[index, :width].tolist()
            topk = self.out_topk[index, :width].tolist() if p.topk_ids else None
            versions = self.out_versions[index, :width].tolist() if self.audit else None
        out = []
        for i, ((row, stop_at), count) in enumerate(zip(ending, counts)):
            token_ids = tokens[i][:count]
            text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
            if stop_at is not None:
                reason = "stop"
                text = text[: min(text.find(s) for s in p.stop if s in text)]
            elif token_ids and token_ids[-1] in self.eos_list:
                reason = "eos"
            else:
                reason = "length"
            request = self.busy_rows.pop(row)
            completion = Completion(request.prompt_index, request.sample_index, list(request.prompt), token_ids,
                                    logprobs[i][:count], text, reason, self.row_version.pop(row))
            if topk is not None:
                completion.extra["topk_ids"] = topk[i][:count]
            if versions is not None:
                completion.extra["token_versions"] = versions[i][:count]
            if self.moe:  # every position the trainer will feed: the prompt and all but the last sampled token
                # a copy: on the CPU, .cpu() would return a view the row's next sequence overwrites
                completion.routing = self.routing[row, : len(request.prompt) + count - 1].to("cpu", copy=True)
            self.slot_refs[self.row_slot_host.pop(row)] -= 1
            self.scanned.pop(row, None)
            self.row_due.pop(row, None)
            heapq.heappush(self.free, row)
            out.append((request, completion))
        if ONE_READ:  # a Python value written through an index is a copy that waits for the queue
            self.active.index_fill_(0, index, False)
            self.finished.index_fill_(0, index, False)
        else:
            self.active[index] = False
            self.finished[index] = False
        return out

    def _read(self, parts: list[torch.Tensor | None]) -> list[torch.Tensor | None]:
        """``parts`` on the host after one wait: each copied without waiting (into pinned memory on a
        GPU), then the stream synchronized once."""
        if self.device.type != "cuda":
            return [None if t is None else t.cpu() for t in parts]
        host = [None if t is None else t.to("cpu", non_blocking=True) for t in parts]
        torch.cuda.current_stream(self.device).synchronize()
        return host
