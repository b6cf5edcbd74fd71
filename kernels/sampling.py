"""Next-token sampling in one pass over the logits, beside its plain-torch reference.

``orbit::sample_race`` draws token ``i`` with probability ``softmax(logits / T)_i`` and returns its
log-probability, for sampling without top-k or top-p filters (what on-policy RL rollouts use).
The torch reference (``sample_tokens`` in ``orbit_core.rollout.sampling``) reads a
[rows, vocab] tensor seven times: a cast to fp32, the division by T, log-softmax, the exponential
draws, a clamp, exp and a divide, then the argmax. At 256 rows of a 152k vocabulary that is most of
a millisecond a decode step. The kernel reads each row once: an online log-sum-exp for the
log-probability and, in the same loop, the exponential race ``argmax(z_i - log E_i)`` with
``E_i = -log U_i`` from Triton's Philox stream (four uniforms per call), keyed by a per-step seed.
``orbit::sample_race`` takes the seed from the caller (the caller draws it from its torch
generator). ``orbit::sample_race_`` keys it ``base + counter`` from a two-value device tensor
and steps the counter in the kernel: a captured decode step then uses no torch generator, whose
replays cost two host-side fills and a draw kernel each.
A few rows split the vocabulary over programs; a second kernel combines each row's spans.

The same distribution as the reference, with other random numbers: the tokens differ draw by
draw, their frequencies and their log-probabilities do not.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to force the torch reference (tests and benchmarks compare the two in one process)."""
FOUR_PER_CALL = True
"""Set False to draw one uniform per Philox call, as the kernel did before (benchmarks compare)."""
COUNTED = True
"""Callers that hold a ``[base, counter]`` state sample through ``orbit::sample_race_``. False: a seed
drawn from their torch generator each call, as before (benchmarks compare)."""


def race(logprobs: torch.Tensor, generator: torch.Generator | None) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race in torch over [rows, vocab] log-probabilities: ``argmax(p / E)`` with
    ``E ~ Exp(1)`` picks token ``i`` with probability ``p_i``. (tokens, their log-probabilities)."""
    # a draw of exactly 0 would make a filtered token's 0 / 0 a NaN, which argmax would pick
    draws = torch.empty_like(logprobs).exponential_(generator=generator).clamp_min_(1e-30)
    tokens = (logprobs.exp() / draws).argmax(-1)
    return tokens, logprobs.gather(-1, tokens[:, None])[:, 0]


def sample_race_reference(logits: torch.Tensor, temperature: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The exponential race in torch, its draws from a generator seeded with ``seed``."""
    generator = torch.Generator(logits.device).manual_seed(int(seed.reshape(-1)[0]))
    return race(torch.log_softmax(logits.float() / temperature, -1), generator)


if triton is not None:

    @triton.jit
    def _race_part_kernel(logits_ptr, seed_ptr, part_ptr, V, span, stride_row, temperature,
                          SCALED: tl.constexpr, FOUR: tl.constexpr, BLOCK_V: tl.constexpr, COUNTED: tl.constexpr,
                          PDL: tl.constexpr = False):
        """One program per (row, vocabulary span): the span's max, sum of exp below it, and race winner."""
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row, split, splits = tl.program_id(0), tl.program_id(1), tl.num_programs(1)
        seed = tl.load(seed_ptr)
        if COUNTED:
            seed += tl.load(seed_ptr + 1)
        offs = tl.arange(0, BLOCK_V)
        # one Philox call gives four uniforms, token 4c + j taking the j-th of counter c (the generator
        # is most of the kernel's arithmetic); counters depend on the token alone, not on the spans
        quads = tl.arange(0, BLOCK_V // 4)
        row_counter = row * tl.cdiv(V, 4)
        run_max = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        run_sum = tl.zeros((BLOCK_V,), dtype=tl.float32)
        best_key = tl.full((BLOCK_V,), float("-inf"), dtype=tl.float32)
        best_z = tl.zeros((BLOCK_V,), dtype=tl.float32)
        best_idx = tl.zeros((BLOCK_V,), dtype=tl.int32)
        start = split * span
        for v0 in range(start, tl.minimum(start + span, V), BLOCK_V):
            idx = v0 + offs
            mask = (idx < V) & (idx < start + span)
            z = tl.load(logits_ptr + row * stride_row + idx, mask=mask, other=float("-inf")).to(tl.float32)
            if SCALED:
                z = z / temperature
            # lane-wise online log-sum-exp; lanes still at -inf keep a zero sum
            new_max = tl.maximum(run_max, z)
            safe = tl.where(new_max == float("-inf"), 0.0, new_max)
            run_sum = run_sum * tl.exp(run_max - safe) + tl.exp(z - safe)
            run_max = new_max
            # E = -log U with U in [0, 1): key = z - log E; U = 0 gives E = inf, a key of -inf
            if FOUR:
                u0, u1, u2, u3 = tl.rand4x(seed, row_counter + v0 // 4 + quads)
                u = tl.interleave(tl.interleave(u0, u2), tl.interleave(u1, u3))
            else:
                u = tl.rand(seed, row * V + idx)
            key = tl.where(mask, z - tl.log(-tl.log(u)), float("-inf"))
            better = key > best_key
            best_key = tl.where(better, key, best_key)
            best_z = tl.where(better, z, best_z)
            best_idx = tl.where(better, idx, best_idx)
        span_max = tl.max(run_max, axis=0)
        safe_max = tl.where(span_max == float("-inf"), 0.0, span_max)
        span_sum = tl.sum(run_sum * tl.exp(run_max - safe_max), axis=0)
        winner = tl.max(best_key, axis=0)
        # the lowest lane holding the winning key (ties are measure-zero events)
        lane = tl.min(tl.where(best_key == winner, offs, BLOCK_V), axis=0)
        out = part_ptr + (row * splits + split) * 5
        tl.store(out, span_max)
        tl.store(out + 1, span_sum)
        tl.store(out + 2, winner)
        tl.store(out + 3, tl.sum(tl.where(offs == lane, best_z, 0.0), axis=0))
        tl.store(out + 4, tl.sum(tl.where(offs == lane, best_idx, 0), axis=0).to(tl.float32))

    @triton.jit
    def _race_finish_kernel(part_ptr, tokens_ptr, logprobs_ptr, seed_ptr, splits, BLOCK_S: tl.constexpr,
                            COUNTED: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)  # first: nothing before it may touch memory
        row = tl.program_id(0)
        if COUNTED and row == 0:  # every part program has read the counter: the wait above saw them end
            tl.store(seed_ptr + 1, tl.load(seed_ptr + 1) + 1)
        offs = tl.arange(0, BLOCK_S)
        mask = offs < splits
        base = part_ptr + (row * splits + offs) * 5
        span_max = tl.load(base, mask=mask, other=float("-inf"))
        span_sum = tl.load(base + 1, mask=mask, other=0.0)
        key = tl.load(base + 2, mask=mask, other=float("-inf"))
        row_max = tl.max(span_max, axis=0)
        total = tl.sum(span_sum * tl.exp(span_max - row_max), axis=0)
        winner = tl.max(key, axis=0)
        pick = tl.min(tl.where(key == winner, offs, BLOCK_S), axis=0)
        z_token = tl.load(part_ptr + (row * splits + pick) * 5 + 3)
        token = tl.load(part_ptr + (row * splits + pick) * 5 + 4)
        tl.store(tokens_ptr + row, token.to(tl.int64))
        tl.store(logprobs_ptr + row, z_token - row_max - tl.log(total))


def unserved_reason(logits: torch.Tensor) -> str | None:
    if logits.dim() != 2 or logits.stride(-1) != 1:
        return f"logits {tuple(logits.shape)} are not [rows, vocab] with a contiguous vocab"
    if logits.shape[1] >= 2 ** 31 // max(1, logits.shape[0]):
        return "rows x vocab past the 31-bit random-stream offsets"
    if logits.shape[1] >= 2 ** 24:
        return f"a vocabulary of {logits.shape[1]} (token ids pass through fp32)"
    return None


def served(logits: torch.Tensor) -> bool:
    """Whether ``sample_race`` runs its kernel on ``logits`` (else its reference, which reads the seed
    back to the host and so cannot run inside a captured graph)."""
    return serves("sample_race", ENABLED, logits, lambda: unserved_reason(logits))


@torch.library.custom_op("orbit::sample_race", mutates_args=())
def sample_race(logits: torch.Tensor, temperature: float, seed: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens [rows] int64, logprobs [rows] fp32) drawn from ``softmax(logits / temperature)``."""
    if not served(logits):
        return sample_race_reference(logits, temperature, seed)
    return launch(logits, temperature, seed)


@torch.library.custom_op("orbit::sample_race_", mutates_args=("state",))
def sample_race_(logits: torch.Tensor, temperature: float, state: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """``sample_race`` keyed by the seed ``state[0] + state[1]`` (int64), then ``state[1] += 1``."""
    if not served(logits):
        drawn = sample_race_reference(logits, temperature, state[0] + state[1])
        state[1] += 1
        return drawn
    return launch(logits, temperature, state, counted=True)


@sample_race_.register_fake
def _(logits, temperature, state):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows, dtype=torch.float32)


def splits_for(rows: int, vocab: int, block_v: int) -> int:
    """Vocabulary spans per row: at least 2,048 programs where the vocabulary has the blocks (one
    program per row would walk a 152k vocabulary on one SM), and at least 16 spans a row. One H100,
    a 152k vocabulary, us a call (``sample_race_splits_h100.jsonl``): 4.7 against 8.4 with the
    rule before (at most 4 blocks a span and 512 programs) at one row, 6.6 against 9.1 at 4, 24.1
    against 26.0 at 32, 152 against 176 at 256."""
    return max(1, min(triton.cdiv(vocab, block_v), max(16, triton.cdiv(2048, rows))))


def launch(logits: torch.Tensor, temperature: float, seed: torch.Tensor, block_v: int = 1024,
           splits: int | None = None, counted: bool = False) -> tuple[torch.Tensor, torch.Tensor]:
    """The two kernels (no dispatch checks: tests call it directly, also under the Triton interpreter).
    ``counted``: ``seed`` is ``sample_race_``'s ``[base, counter]``."""
    rows, vocab = logits.shape
    splits = splits or splits_for(rows, vocab, block_v)
    span = triton.cdiv(triton.cdiv(vocab, splits), block_v) * block_v
    splits = triton.cdiv(vocab, span)
    # token ids travel as fp32 in the partials: exact below 2^24, past any vocabulary in use
    part = torch.empty((rows, splits, 5), dtype=torch.float32, device=logits.device)
    tokens = torch.empty(rows, dtype=torch.long, device=logits.device)
    logprobs = torch.empty(rows, dtype=torch.float32, device=logits.device)
    _race_part_kernel[(rows, splits)](logits, seed, part, vocab, span, logits.stride(0), temperature,
                                      SCALED=temperature != 1.0, FOUR=FOUR_PER_CALL, BLOCK_V=block_v,
                                      COUNTED=counted, num_warps=4, **pdl_args(logits))
    _race_finish_kernel[(rows,)](part, tokens, logprobs, seed, splits,
                                 BLOCK_S=max(16, triton.next_power_of_2(splits)), COUNTED=counted,
                                 num_warps=1, **pdl_args(part))
    return tokens, logprobs


@sample_race.register_fake
def _(logits, temperature, seed):
    rows = logits.shape[0]
    return logits.new_empty(rows, dtype=torch.long), logits.new_empty(rows, dtype=torch.float32)
