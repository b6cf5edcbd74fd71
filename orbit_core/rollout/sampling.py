"""Vectorized next-token sampling: temperature, top-k, top-p, all slots at once, no host sync."""

from __future__ import annotations

import torch

from orbit_kernels import sampling as sampling_kernel


def sample_tokens(
    logits: torch.Tensor,
    temperature: float,
    top_k: int = 0,
    top_p: float = 1.0,
    generator: torch.Generator | None = None,
    seed_state: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """logits: [batch, vocab] -> (tokens [batch], logprobs [batch]).

    The logprob is that of the distribution the token was drawn from: ``log_softmax(logits / T)``
    after top-k/top-p filtering (without filters, the full softmax the trainer recomputes).
    Training refuses the filters, so its ratios always compare like with like.

    The draw is ``argmax(p / E)`` with ``E ~ Exp(1)`` per token, which picks token ``i`` with
    probability ``p_i`` (the exponential-race form of the Gumbel-max trick). Unlike
    ``torch.multinomial`` it never reads back to the host, so it runs inside a captured CUDA graph.
    On a GPU without filters one kernel (``orbit::sample_race``) runs the whole race in a single
    pass over the logits, with a seed drawn from ``generator`` each call, or with ``seed_state``
    (``[base, counter]`` int64 on the logits' device) keyed by ``base + counter``, which the kernel
    then steps (``orbit::sample_race_``): that draws nothing from ``generator``.
    """
    if temperature > 0 and not (top_k and top_k < logits.shape[-1]) and top_p >= 1.0 and sampling_kernel.served(logits):
        if seed_state is not None and sampling_kernel.COUNTED:
            return sampling_kernel.sample_race_(logits, temperature, seed_state)
        seed = torch.randint(0, 2 ** 31 - 1, (1,), device=logits.device, generator=generator)
        return sampling_kernel.sample_race(logits, temperature, seed)
    logits = logits.float()
    if temperature == 0:
        tokens = logits.argmax(-1)
        return tokens, torch.log_softmax(logits, -1).gather(-1, tokens[:, None])[:, 0]
    filtered = logits / temperature
    if top_k and top_k < filtered.shape[-1]:
        kth = torch.topk(filtered, top_k, dim=-1).values[:, -1:]
        filtered = filtered.masked_fill(filtered < kth, float("-inf"))
    if top_p < 1.0:
        sorted_logits, order = torch.sort(filtered, dim=-1, descending=True)
        probs = torch.softmax(sorted_logits, -1)
        # drop a token when the mass before it already reaches top_p (the first token always stays)
        drop = (probs.cumsum(-1) - probs) >= top_p
        sorted_logits = sorted_logits.masked_fill(drop, float("-inf"))
        filtered = torch.full_like(filtered, float("-inf")).scatter(-1, order, sorted_logits)
    return sampling_kernel.race(torch.log_softmax(filtered, -1), generator)
