"""A decode step's bookkeeping in one kernel: record each live row's sampled token and logprob, step
its counters and flag the rows that finished.

The reference (``record_step_reference``, also the CPU path) is the rollout loop's torch code: about
twenty small kernels (gathers, ``where``, index writes, ``isin``, compares, in-place logic) that a
graphed decode step runs one after another, each a node the GPU waits on. Per row the work is a
handful of scalars, so one program over the rows does all of it; the numbers are the same (the
token, its logprob as fp32, counts and flags).

A row is live when ``which`` says so. For a live row at ``n = n_generated`` tokens so far:
``out_tokens[row, min(n, max_new - 1)]`` and ``out_logprobs[...]`` get its token and logprob,
``n_generated`` and (when given) ``lengths`` grow by one, ``last_token`` becomes the token, and the
row is done when the token is an EOS id or ``n + 1 >= max_new``: ``finished`` set, ``active``
cleared. A live row not done whose token is a stop-string trigger sets ``stop_seen``. Rows not
live are left as they are. ``which`` may be ``active`` itself: each row reads it before writing.
"""

from __future__ import annotations

import torch

from orbit_kernels._triton import pdl_args, pdl_enter, serves, tl, triton

ENABLED = True
"""Set False to force the reference (benchmarks compare the two in one process)."""
BLOCK = 128


def record_step_reference(tokens: torch.Tensor, logprobs: torch.Tensor, which: torch.Tensor,
                          n_generated: torch.Tensor, last_token: torch.Tensor, finished: torch.Tensor,
                          active: torch.Tensor, stop_seen: torch.Tensor, triggers: torch.Tensor | None,
                          eos_ids: torch.Tensor, out_tokens: torch.Tensor, out_logprobs: torch.Tensor,
                          max_new: int, lengths: torch.Tensor | None) -> None:
    which = which.clone()  # ``which`` may be ``active``, which changes below
    rows = torch.arange(which.shape[0], device=which.device)
    if lengths is not None:
        lengths.add_(which.long())
    idx = n_generated.clamp(max=max_new - 1)
    out_tokens[rows, idx] = torch.where(which, tokens, out_tokens[rows, idx])
    out_logprobs[rows, idx] = torch.where(which, logprobs.float(), out_logprobs[rows, idx])
    n_generated.add_(which.long())
    last_token.copy_(torch.where(which, tokens, last_token))
    done = which & (torch.isin(tokens, eos_ids) | (n_generated >= max_new))
    finished |= done
    active &= ~done
    if triggers is not None:
        stop_seen |= which & ~done & triggers[tokens]


if triton is not None:

    @triton.jit
    def _record_kernel(tok_ptr, lp_ptr, which_ptr, n_ptr, last_ptr, fin_ptr, act_ptr, stop_ptr, trig_ptr, eos_ptr,
                       out_tok_ptr, out_lp_ptr, len_ptr, rows, n_eos, max_new, stride_tok, stride_lp,
                       HAS_TRIGGERS: tl.constexpr, HAS_LENGTHS: tl.constexpr, BLOCK: tl.constexpr,
                       EOS_BLOCK: tl.constexpr, PDL: tl.constexpr = False):
        pdl_enter(PDL)
        offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
        in_range = offs < rows
        live = (tl.load(which_ptr + offs, mask=in_range, other=0) != 0) & in_range
        step = live.to(tl.int64)
        tokens = tl.load(tok_ptr + offs, mask=in_range, other=0)
        n = tl.load(n_ptr + offs, mask=in_range, other=0)
        at = tl.minimum(n, max_new - 1)
        tl.store(out_tok_ptr + offs.to(tl.int64) * stride_tok + at, tokens, mask=live)
        logprobs = tl.load(lp_ptr + offs, mask=in_range, other=0.0).to(tl.float32)
        tl.store(out_lp_ptr + offs.to(tl.int64) * stride_lp + at, logprobs, mask=live)
        tl.store(n_ptr + offs, n + step, mask=in_range)
        if HAS_LENGTHS:
            tl.store(len_ptr + offs, tl.load(len_ptr + offs, mask=in_range, other=0) + step, mask=in_range)
        tl.store(last_ptr + offs, tokens, mask=live)
        e = tl.arange(0, EOS_BLOCK)
        eos = tl.load(eos_ptr + e, mask=e < n_eos, other=-1)
        is_eos = tl.max(((tokens[:, None] == eos[None, :]) & (e < n_eos)[None, :]).to(tl.int32), axis=1) > 0
        done = live & (is_eos | (n + 1 >= max_new))
        tl.store(fin_ptr + offs, tl.full((BLOCK,), 1, tl.int1), mask=done)
        tl.store(act_ptr + offs, tl.full((BLOCK,), 0, tl.int1), mask=done)
        if HAS_TRIGGERS:
            going = live & ~done
            trigger = tl.load(trig_ptr + tokens, mask=going, other=0) != 0
            tl.store(stop_ptr + offs, tl.full((BLOCK,), 1, tl.int1), mask=going & trigger)


def unserved_reason(out_tokens: torch.Tensor, out_logprobs: torch.Tensor) -> str | None:
    """Why the kernel cannot take this call (None: it can)."""
    if out_tokens.stride(1) != 1 or out_logprobs.stride(1) != 1 or out_logprobs.dtype != torch.float32:
        return "the output buffers are not rows of contiguous steps, the logprobs fp32"
    return None


def launch(tokens, logprobs, which, n_generated, last_token, finished, active, stop_seen, triggers, eos_ids,
           out_tokens, out_logprobs, max_new: int, lengths) -> None:
    """The kernel (no dispatch checks: tests call it directly, also under the Triton interpreter)."""
    rows = which.shape[0]
    if rows == 0:
        return
    _record_kernel[(triton.cdiv(rows, BLOCK),)](
        tokens, logprobs, which, n_generated, last_token, finished, active, stop_seen,
        tokens if triggers is None else triggers, tokens if eos_ids.numel() == 0 else eos_ids, out_tokens,
        out_logprobs, n_generated if lengths is None else lengths, rows, eos_ids.numel(), max_new,
        out_tokens.stride(0), out_logprobs.stride(0), HAS_TRIGGERS=triggers is not None,
        HAS_LENGTHS=lengths is not None, BLOCK=BLOCK, EOS_BLOCK=max(2, triton.next_power_of_2(eos_ids.numel())),
        num_warps=4, **pdl_args(tokens))


@torch.library.custom_op("orbit::record_step_", mutates_args=(
    "n_generated", "last_token", "finished", "active", "stop_seen", "out_tokens", "out_logprobs", "lengths"))
def record_step_(tokens: torch.Tensor, logprobs: torch.Tensor, which: torch.Tensor, n_generated: torch.Tensor,
                 last_token: torch.Tensor, finished: torch.Tensor, active: torch.Tensor, stop_seen: torch.Tensor,
                 triggers: torch.Tensor | None, eos_ids: torch.Tensor, out_tokens: torch.Tensor,
                 out_logprobs: torch.Tensor, max_new: int, lengths: torch.Tensor | None) -> None:
    """Record a decode step's sampled tokens for the rows ``which`` marks, in place (module docstring)."""
    if serves("record_step_", ENABLED, tokens, lambda: unserved_reason(out_tokens, out_logprobs)):
        launch(tokens, logprobs, which, n_generated, last_token, finished, active, stop_seen, triggers, eos_ids,
               out_tokens, out_logprobs, max_new, lengths)
    else:
        record_step_reference(tokens, logprobs, which, n_generated, last_token, finished, active, stop_seen,
                              triggers, eos_ids, out_tokens, out_logprobs, max_new, lengths)


@record_step_.register_fake
def _(tokens, logprobs, which, n_generated, last_token, finished, active, stop_seen, triggers, eos_ids, out_tokens,
      out_logprobs, max_new, lengths):
    return None
