"""The ``builtin`` rollout backend: in-process continuous batching over a preallocated KV cache.

Design for speed (the GPU issue adds CUDA graphs on top of the same shapes):
  * one KV cache of ``[layers, slots, kv_heads, capacity, head_dim]`` allocated once and reused;
  * every decode step runs all slots at a static shape; the key length is rounded up to a bucket;
  * per-step host work is constant in the batch size: sampling, EOS and length checks are
    tensor ops, and stop strings are only decoded for slots whose new token can complete one;
  * a finished sequence frees its slot, and waiting requests are prefilled into free slots.
"""

from __future__ import annotations

import torch

from orbit_core.models.transformer import DecoderLM, KVCache
from orbit_core.rollout.sampling import sample_tokens
from orbit_core.rollout.types import Completion, SamplingParams

KV_BUCKET = 32
PREFILL_BUCKET = 8


def _round_up(value: int, multiple: int) -> int:
    return -(-value // multiple) * multiple


class BuiltinEngine:
    """Generates with the live model object, so it always uses the current adapter weights."""

    def __init__(self, model: DecoderLM, tokenizer, max_running: int = 256, seed: int = 0):
        self.model = model
        self.tokenizer = tokenizer
        self.max_running = max_running
        self.device = next(model.parameters()).device
        self.generator = torch.Generator(device=self.device).manual_seed(seed)
        self.cache: KVCache | None = None
        self.adapter_version = 0
        eos = set(model.config.eos_token_ids)
        if getattr(tokenizer, "eos_token_id", None) is not None:
            eos.add(tokenizer.eos_token_id)
        self.eos_ids = torch.tensor(sorted(eos), dtype=torch.long, device=self.device)
        self._token_text: list[str] | None = None
        self._triggers: dict[tuple[str, ...], torch.Tensor] = {}

    # -- helpers ---------------------------------------------------------------------------
    def _stop_triggers(self, stop: tuple[str, ...]) -> torch.Tensor | None:
        """[vocab] bool: tokens whose text holds the last character of some stop string."""
        if not stop:
            return None
        if stop in self._triggers:
            return self._triggers[stop]
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

    def _ensure_cache(self, slots: int, capacity: int) -> KVCache:
        c = self.cache
        if c is None or c.k.shape[1] < slots or c.capacity < capacity:
            dtype = next(self.model.parameters()).dtype
            self.cache = None  # free the old one before allocating
            self.cache = KVCache.allocate(self.model.config, slots, capacity, dtype, self.device)
        return self.cache

    # -- generation ------------------------------------------------------------------------
    @torch.no_grad()
    def generate(self, prompts: list[list[int]], params: SamplingParams) -> list[Completion]:
        requests = [(p, s) for p in range(len(prompts)) for s in range(params.n)]
        if not requests:
            return []
        was_training = self.model.training
        self.model.eval()
        try:
            return self._run(prompts, requests, params)
        finally:
            self.model.train(was_training)

    def _run(self, prompts, requests, params: SamplingParams) -> list[Completion]:
        device, max_new = self.device, params.max_new_tokens
        slots = min(self.max_running, len(requests))
        slots = 1 << (slots - 1).bit_length()  # power-of-two buckets keep shapes reusable
        longest = max(len(p) for p in prompts)
        capacity = _round_up(_round_up(longest, PREFILL_BUCKET) + max_new + 1, KV_BUCKET)
        cache = self._ensure_cache(slots, capacity)
        slots = cache.k.shape[1]
        self.model.ensure_rope(cache.capacity, device)

        lengths = torch.zeros(slots, dtype=torch.long, device=device)
        last_token = torch.zeros(slots, dtype=torch.long, device=device)
        n_generated = torch.zeros(slots, dtype=torch.long, device=device)
        active = torch.zeros(slots, dtype=torch.bool, device=device)
        out_tokens = torch.zeros(slots, max_new, dtype=torch.long, device=device)
        out_logprobs = torch.zeros(slots, max_new, dtype=torch.float32, device=device)
        k = params.topk_ids
        out_topk = torch.zeros(slots, max_new, max(k, 1), dtype=torch.long, device=device)
        rows = torch.arange(slots, device=device)
        key_index = torch.arange(cache.capacity, device=device)
        triggers = self._stop_triggers(params.stop)
        slot_request: list[int] = [-1] * slots
        free = list(range(slots))
        pending = list(range(len(requests)))
        results: list[Completion | None] = [None] * len(requests)
        max_len = 0  # host-side upper bound of lengths over active slots: no sync per decode step

        def record(new_tokens: torch.Tensor, new_logprobs: torch.Tensor, which: torch.Tensor, logits: torch.Tensor) -> None:
            idx = n_generated.clamp(max=max_new - 1)
            if k:
                top = logits.float().topk(k, dim=-1).indices
                out_topk[rows, idx] = torch.where(which[:, None], top, out_topk[rows, idx])
            out_tokens[rows, idx] = torch.where(which, new_tokens, out_tokens[rows, idx])
            out_logprobs[rows, idx] = torch.where(which, new_logprobs, out_logprobs[rows, idx])
            n_generated.add_(which.long())
            last_token.copy_(torch.where(which, new_tokens, last_token))

        def finish_checks(new_tokens: torch.Tensor, which: torch.Tensor) -> None:
            done = which & (torch.isin(new_tokens, self.eos_ids) | (n_generated >= max_new))
            stop_hit = torch.zeros_like(done)
            if triggers is not None:
                maybe = (which & ~done & triggers[new_tokens]).nonzero().flatten().tolist()
                for slot in maybe:
                    text = self.tokenizer.decode(out_tokens[slot, : n_generated[slot]].tolist())
                    if any(s in text for s in params.stop):
                        stop_hit[slot] = True
            for slot in (done | stop_hit).nonzero().flatten().tolist():
                request = slot_request[slot]
                self._complete(slot, slot_request, requests, prompts, results, out_tokens, out_logprobs,
                               n_generated, params, bool(stop_hit[slot]))
                if k:
                    done_completion = results[request]
                    done_completion.extra["topk_ids"] = out_topk[slot, : len(done_completion.token_ids)].tolist()
                active[slot] = False
                free.append(slot)

        while pending or bool(active.any()):
            if pending and free:
                admitted = [free.pop() for _ in range(min(len(free), len(pending)))]
                batch_req = [pending.pop(0) for _ in admitted]
                prefill_logits = self._prefill(prompts, requests, batch_req, admitted, cache, lengths, slot_request)
                admit_mask = torch.zeros(slots, dtype=torch.bool, device=device)
                admit_mask[admitted] = True
                n_generated[admit_mask] = 0
                tokens, logprobs = sample_tokens(prefill_logits, params.temperature, params.top_k, params.top_p, self.generator)
                new_tokens = torch.zeros(slots, dtype=torch.long, device=device)
                new_logprobs = torch.zeros(slots, dtype=torch.float32, device=device)
                slot_logits = torch.zeros(slots, prefill_logits.shape[-1], device=device)
                new_tokens[admitted], new_logprobs[admitted] = tokens, logprobs
                slot_logits[admitted] = prefill_logits.float()
                active |= admit_mask
                max_len = int(torch.where(active, lengths, 0).max())
                record(new_tokens, new_logprobs, admit_mask, slot_logits)
                finish_checks(new_tokens, admit_mask)
                continue
            kv_len = min(_round_up(max_len + 1, KV_BUCKET), cache.capacity)
            mask = (key_index[None, :kv_len] <= lengths[:, None])[:, None, None, :]
            logits = self.model(last_token[:, None], lengths[:, None], cache=cache, decode_mask=mask)[:, -1]
            tokens, logprobs = sample_tokens(logits, params.temperature, params.top_k, params.top_p, self.generator)
            lengths.add_(active.long())
            max_len += 1
            record(tokens, logprobs, active, logits)
            finish_checks(tokens, active)
        return [r for r in results if r is not None]

    def _prefill(self, prompts, requests, batch_req, admitted, cache, lengths, slot_request) -> torch.Tensor:
        """Fill the admitted slots' cache with their prompts; returns last-position logits [admitted, vocab]."""
        ids = [prompts[requests[r][0]] for r in batch_req]
        width = _round_up(max(len(x) for x in ids), PREFILL_BUCKET)
        pad = self.tokenizer.pad_token_id if getattr(self.tokenizer, "pad_token_id", None) is not None else 0
        batch = torch.full((len(ids), width), pad, dtype=torch.long)
        for i, x in enumerate(ids):
            batch[i, : len(x)] = torch.tensor(x, dtype=torch.long)
        batch = batch.to(self.device)
        prompt_lengths = torch.tensor([len(x) for x in ids], device=self.device)
        slots_t = torch.tensor(admitted, device=self.device)
        logits = self.model(batch, cache=cache, slots=slots_t, last_index=prompt_lengths - 1)
        lengths[slots_t] = prompt_lengths
        for slot, r in zip(admitted, batch_req):
            slot_request[slot] = r
        return logits

    def _complete(self, slot, slot_request, requests, prompts, results, out_tokens, out_logprobs, n_generated,
                  params: SamplingParams, stopped: bool) -> None:
        count = int(n_generated[slot])
        token_ids = out_tokens[slot, :count].tolist()
        logprobs = out_logprobs[slot, :count].tolist()
        text = self.tokenizer.decode(token_ids, skip_special_tokens=True)
        if stopped:
            reason = "stop"
            cut = min(text.find(s) for s in params.stop if s in text)
            text = text[:cut]
        elif token_ids and token_ids[-1] in self.eos_ids.tolist():
            reason = "eos"
        else:
            reason = "length"
        r = slot_request[slot]
        prompt_index, sample_index = requests[r]
        results[r] = Completion(prompt_index, sample_index, list(prompts[prompt_index]), token_ids, logprobs,
                                text, reason, self.adapter_version)
        slot_request[slot] = -1
