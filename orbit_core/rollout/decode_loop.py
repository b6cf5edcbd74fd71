"""Continuous batching over a preallocated KV cache, one prefill or decode step at a time.

Requests may be added while the loop runs (the engine process streams them in). Design for speed:
  * one KV cache ``[layers, slots, kv_heads, capacity, head_dim]`` allocated once and reused;
  * free slots are handed out lowest first and a decode step runs only the rows up to the highest
    busy slot (rounded to ``ROW_BUCKET``), so a draining batch gets cheaper as it empties;
  * per-step host work is constant in the batch size: sampling, EOS and length checks are tensor
    ops, and stop strings are only decoded for rows whose new token can complete one.
With a ``SlotBank`` (engine copy of the adapter), each row remembers the adapter slot it was
admitted under and keeps it to the end: a sequence never mixes adapter versions.
"""

from __future__ import annotations

import contextlib
import heapq
from collections import deque
from dataclasses import dataclass

import torch

from orbit_core.models.moe import moe_layers, moe_routing, stack_trace
from orbit_core.models.transformer import DecoderLM, KVCache
from orbit_core.peft.slots import SlotBank
from orbit_core.rollout.cuda_graphs import GraphedDecode
from orbit_core.rollout.sampling import sample_tokens
from orbit_core.rollout.types import Completion, SamplingParams

KV_BUCKET = 32
PREFILL_BUCKET = 8
ROW_BUCKET = 8


def round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


@dataclass
class Request:
    prompt_index: int
    sample_index: int
    prompt: list[int]
    tag: object = None
    """The caller's label (the engine process uses the batch id)."""


class DecodeLoop:
    def __init__(self, model: DecoderLM, tokenizer, generator: torch.Generator, max_running: int,
                 bank: SlotBank | None = None, audit: bool = False, streaming: bool = False, cuda_graph: bool = True):
        """``streaming``: requests keep arriving, so size the cache for ``max_running`` rows up front
        (otherwise for the requests waiting when it is allocated). ``cuda_graph``: replay the decode
        forward as CUDA graphs (on a CUDA device; with adapter slots too)."""
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
        self.graphed: GraphedDecode | None = None
        self.busy_rows: dict[int, Request] = {}
        self.params: SamplingParams | None = None
        self.pending: deque[Request] = deque()
        self.version = 0  # recorded on completions when there is no slot bank
        self.active_slot = 0
        self.slot_refs = [0] * (bank.num_slots if bank else 1)
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
        """(Re)allocate the cache and per-row state; only called while no sequence is running."""
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
        self.key_index = torch.arange(self.cache.capacity, device=device)
        if self.moe:
            self.routing = torch.zeros(slots, self.cache.capacity, len(self.moe), self.moe[0].top_k, dtype=torch.int16,
                                       device=device)
        self.triggers = self._stop_triggers(p.stop)
        self.free = list(range(slots))
        self.busy_rows = {}
        self.row_slot_host: dict[int, int] = {}
        self.row_version: dict[int, int] = {}
        self.max_len = 0
        self.refresh_versions()

    def refresh_versions(self) -> None:
        """Call after a slot is written: the audit reads each slot's version from this tensor."""
        versions = self.bank.versions if self.bank else [self.version]
        self.slot_versions = torch.tensor(versions, dtype=torch.long, device=self.device)

    # -- stepping --------------------------------------------------------------------------
    def step(self) -> list[tuple[Request, Completion]]:
        """Admit waiting requests (one prefill) if a slot is free, else one decode step. Returns finished ones."""
        if self.pending and not self.busy_rows:  # idle -> busy: size the cache for what waits
            self._allocate(max(len(r.prompt) for r in self.pending))
        if self.pending and self.free and self._fits(self.pending[0]):
            return self._admit()
        if self.busy_rows:
            return self._decode()
        return []

    def _fits(self, request: Request) -> bool:
        return round_up(len(request.prompt), PREFILL_BUCKET) + self.params.max_new_tokens + 1 <= self.cache.capacity

    def _admit(self) -> list[tuple[Request, Completion]]:
        admitted, batch = [], []
        while self.pending and self.free and self._fits(self.pending[0]):
            admitted.append(heapq.heappop(self.free))
            batch.append(self.pending.popleft())
        ids = [r.prompt for r in batch]
        width = round_up(max(len(x) for x in ids), PREFILL_BUCKET)
        tokens = torch.full((len(ids), width), self.pad_id, dtype=torch.long)
        for i, x in enumerate(ids):
            tokens[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        prompt_lengths = torch.tensor([len(x) for x in ids], device=self.device)
        rows = torch.tensor(admitted, device=self.device)
        if self.bank is not None:
            self.bank.set_rows(None, (self.active_slot,))
        with self._trace() as traces:
            logits = self.model(tokens.to(self.device), cache=self.cache, slots=rows, last_index=prompt_lengths - 1)
        if traces is not None:
            self.routing[rows, :width] = stack_trace(traces).view(len(ids), width, len(self.moe), -1).to(torch.int16)
        self.lengths[rows] = prompt_lengths
        self.n_generated[rows] = 0
        self.row_adapter[rows] = self.active_slot
        self.active[rows] = True
        version = self.bank.versions[self.active_slot] if self.bank else self.version
        for row, request in zip(admitted, batch):
            self.busy_rows[row] = request
            self.row_slot_host[row] = self.active_slot
            self.row_version[row] = version
        self.slot_refs[self.active_slot] += len(admitted)
        self.max_len = max(self.max_len, int(prompt_lengths.max()))
        p = self.params
        new_tokens, new_logprobs = sample_tokens(logits, p.temperature, p.top_k, p.top_p, self.generator)
        hi = max(self.busy_rows) + 1
        which = torch.zeros(hi, dtype=torch.bool, device=self.device)
        which[rows] = True
        full_tokens = torch.zeros(hi, dtype=torch.long, device=self.device).index_copy(0, rows, new_tokens)
        full_logprobs = torch.zeros(hi, dtype=torch.float32, device=self.device).index_copy(0, rows, new_logprobs.float())
        full_logits = None
        if p.topk_ids:
            full_logits = torch.zeros(hi, logits.shape[-1], device=self.device).index_copy(0, rows, logits.float())
        self._record(hi, full_tokens, full_logprobs, which, full_logits)
        return self._finish(hi, full_tokens, which)

    def _decode(self) -> list[tuple[Request, Completion]]:
        hi = min(round_up(max(self.busy_rows) + 1, ROW_BUCKET), self.cache.k.shape[1])
        lengths = self.lengths[:hi]
        logits = None
        used = tuple(s for s, n in enumerate(self.slot_refs) if n > 0) if self.bank is not None else (0,)
        row_slot = self.row_adapter[:hi] if len(used) > 1 else None
        if self.use_graphs:
            if self.graphed is None:
                self.graphed = GraphedDecode(self.model, self.cache, self.bank)
            logits = self.graphed.logits(self.last_token[:hi], lengths, used, row_slot)
        if logits is None:
            kv_len = min(round_up(self.max_len + 1, KV_BUCKET), self.cache.capacity)
            mask = (self.key_index[None, :kv_len] <= lengths[:, None])[:, None, None, :]
            view = KVCache(self.cache.k[:, :hi], self.cache.v[:, :hi])
            if self.bank is not None:
                self.bank.set_rows(row_slot, used)
            with self._trace() as traces:
                logits = self.model(self.last_token[:hi, None], lengths[:, None], cache=view, decode_mask=mask)[:, -1]
            if traces is not None:  # the fed token sits at position `lengths`
                self.routing[torch.arange(hi, device=self.device), lengths] = stack_trace(traces).to(torch.int16)
        p = self.params
        tokens, logprobs = sample_tokens(logits, p.temperature, p.top_k, p.top_p, self.generator)
        which = self.active[:hi].clone()
        lengths.add_(which.long())
        self.max_len += 1
        self._record(hi, tokens, logprobs, which, logits if p.topk_ids else None)
        return self._finish(hi, tokens, which)

    def _trace(self):
        return moe_routing(self.model) if self.moe else contextlib.nullcontext(None)

    def _record(self, hi: int, tokens, logprobs, which, logits) -> None:
        rows = torch.arange(hi, device=self.device)
        n_gen = self.n_generated[:hi]
        idx = n_gen.clamp(max=self.params.max_new_tokens - 1)
        if logits is not None:
            top = logits.float().topk(self.params.topk_ids, dim=-1).indices
            self.out_topk[rows, idx] = torch.where(which[:, None], top, self.out_topk[rows, idx])
        self.out_tokens[rows, idx] = torch.where(which, tokens, self.out_tokens[rows, idx])
        self.out_logprobs[rows, idx] = torch.where(which, logprobs.float(), self.out_logprobs[rows, idx])
        if self.audit:
            now = self.slot_versions[self.row_adapter[:hi]]
            self.out_versions[rows, idx] = torch.where(which, now, self.out_versions[rows, idx])
        n_gen.add_(which.long())
        self.last_token[:hi] = torch.where(which, tokens, self.last_token[:hi])

    def _finish(self, hi: int, tokens, which) -> list[tuple[Request, Completion]]:
        p = self.params
        n_gen = self.n_generated[:hi]
        done = which & (torch.isin(tokens, self.eos_ids) | (n_gen >= p.max_new_tokens))
        stop_hit: set[int] = set()
        if self.triggers is not None:
            for row in (which & ~done & self.triggers[tokens]).nonzero().flatten().tolist():
                text = self.tokenizer.decode(self.out_tokens[row, : n_gen[row]].tolist())
                if any(s in text for s in p.stop):
                    stop_hit.add(row)
        finished_rows = sorted(set(done.nonzero().flatten().tolist()) | stop_hit)
        out = []
        for row in finished_rows:
            out.append(self._complete(row, row in stop_hit))
        return out

    def _complete(self, row: int, stopped: bool) -> tuple[Request, Completion]:
        p = self.params
        count = int(self.n_generated[row])
        token_ids = self.out_tokens[row, :count].tolist()
        logprobs = self.out_logprobs[row, :count].tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if stopped:
            reason = "stop"
            text = text[: min(text.find(s) for s in p.stop if s in text)]
        elif token_ids and token_ids[-1] in self.eos_list:
            reason = "eos"
        else:
            reason = "length"
        request = self.busy_rows.pop(row)
        completion = Completion(request.prompt_index, request.sample_index, list(request.prompt), token_ids, logprobs,
                                text, reason, self.row_version.pop(row))
        if p.topk_ids:
            completion.extra["topk_ids"] = self.out_topk[row, :count].tolist()
        if self.audit:
            completion.extra["token_versions"] = self.out_versions[row, :count].tolist()
        if self.moe:  # every position the trainer will feed: the prompt and all but the last sampled token
            completion.routing = self.routing[row, : len(request.prompt) + count - 1].cpu()
        self.slot_refs[self.row_slot_host.pop(row)] -= 1
        self.active[row] = False
        heapq.heappush(self.free, row)
        return request, completion
