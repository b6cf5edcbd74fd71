"""A decode step's bookkeeping in one kernel (``orbit::record_step_``) against the rollout loop's torch
code (``record_step_reference``): every tensor it writes, bit for bit, on states with live and idle
rows, rows reaching ``max_new_tokens``, EOS ids, stop-string triggers and ``which`` aliasing
``active``; under Triton's interpreter on the CPU and with the kernel on a GPU."""

from __future__ import annotations

import os

import pytest
import torch

from orbit_kernels import decode_record
from orbit_kernels._triton import triton

NAMES = ("n_generated", "last_token", "finished", "active", "stop_seen", "out_tokens", "out_logprobs", "lengths")


def _state(rows: int, vocab: int, max_new: int, eos: list[int], seed: int, device: str = "cpu") -> dict:
    g = torch.Generator().manual_seed(seed)
    eos_ids = torch.tensor(eos, dtype=torch.long)
    tokens = torch.randint(0, vocab, (rows,), generator=g)
    tokens[::5] = eos_ids[0] if eos else 0  # some rows sample an EOS id
    state = {
        "tokens": tokens,
        "logprobs": -torch.rand(rows, generator=g),
        "n_generated": torch.randint(0, max_new, (rows,), generator=g),
        "last_token": torch.randint(0, vocab, (rows,), generator=g),
        "finished": torch.rand(rows, generator=g) < 0.1,
        "active": torch.rand(rows, generator=g) < 0.7,
        "stop_seen": torch.rand(rows, generator=g) < 0.1,
        "triggers": torch.rand(vocab, generator=g) < 0.3,
        "eos_ids": eos_ids,
        "out_tokens": torch.randint(0, vocab, (rows + 3, max_new), generator=g)[:rows],  # views, as the loop passes
        "out_logprobs": torch.randn(rows + 3, max_new, generator=g)[:rows],
        "lengths": torch.randint(1, 50, (rows,), generator=g),
    }
    state["n_generated"][::7] = max_new - 1  # these reach the limit this step
    return {k: v.to(device) for k, v in state.items()}


def _run(fn, state: dict, max_new: int, triggers: bool, lengths: bool, alias: bool) -> dict:
    s = {k: v.clone() for k, v in state.items()}
    which = s["active"] if alias else s["active"].clone()
    fn(s["tokens"], s["logprobs"], which, s["n_generated"], s["last_token"], s["finished"], s["active"],
       s["stop_seen"], s["triggers"] if triggers else None, s["eos_ids"], s["out_tokens"], s["out_logprobs"], max_new,
       s["lengths"] if lengths else None)
    return s


def _assert_same(got: dict, want: dict, state: dict) -> None:
    for name in NAMES:
        assert torch.equal(got[name].cpu(), want[name].cpu()), name
    assert not torch.equal(want["active"], state["active"])  # the case moved something
    assert not torch.equal(want["out_tokens"], state["out_tokens"])


CASES = [(300, [2], True, True, True), (5, [2, 7, 9], False, False, False), (130, [], True, False, True),
         (64, [3, 4], True, True, False)]


@pytest.mark.skipif(triton is None or os.environ.get("TRITON_INTERPRET") != "1",
                    reason="needs triton, under its interpreter (no GPU)")
@pytest.mark.parametrize("rows,eos,triggers,lengths,alias", CASES)
def test_the_kernel_writes_what_the_loops_torch_code_writes(rows, eos, triggers, lengths, alias):
    state = _state(rows, 50, 6, eos, seed=rows)
    want = _run(decode_record.record_step_reference, state, 6, triggers, lengths, alias=False)
    got = _run(decode_record.launch, state, 6, triggers, lengths, alias)
    _assert_same(got, want, state)


def test_the_reference_is_the_loops_arithmetic_written_out():
    """The reference against the rules in the module's docstring, row by row."""
    state = _state(40, 30, 5, [2, 3], seed=1)
    got = _run(decode_record.record_step_reference, state, 5, True, True, alias=True)
    for r in range(40):
        live, n, token = bool(state["active"][r]), int(state["n_generated"][r]), int(state["tokens"][r])
        done = live and (token in (2, 3) or n + 1 >= 5)
        assert int(got["n_generated"][r]) == n + live
        assert int(got["lengths"][r]) == int(state["lengths"][r]) + live
        assert int(got["last_token"][r]) == (token if live else int(state["last_token"][r]))
        assert bool(got["finished"][r]) == (bool(state["finished"][r]) or done)
        assert bool(got["active"][r]) == (live and not done)
        assert bool(got["stop_seen"][r]) == (bool(state["stop_seen"][r]) or (
            live and not done and bool(state["triggers"][token])))
        want_row = state["out_tokens"][r].clone()
        if live:
            want_row[min(n, 4)] = token
        assert torch.equal(got["out_tokens"][r], want_row)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("rows,eos,triggers,lengths,alias", CASES)
def test_on_the_gpu_the_op_writes_what_the_reference_writes(rows, eos, triggers, lengths, alias):
    state = _state(rows, 50, 6, eos, seed=rows)
    want = _run(decode_record.record_step_reference, state, 6, triggers, lengths, alias=False)
    got = _run(torch.ops.orbit.record_step_, {k: v.cuda() for k, v in state.items()}, 6, triggers, lengths, alias)
    _assert_same(got, want, state)


def test_the_kernel_refuses_buffers_it_cannot_write():
    """The loop's own buffers are served; a logprob buffer in bf16 or steps that are not contiguous
    name the reason (the op then runs the reference)."""
    tokens, logprobs = torch.zeros(4, 6, dtype=torch.long), torch.zeros(4, 6)
    assert decode_record.unserved_reason(tokens[:3], logprobs[:3]) is None
    assert "fp32" in decode_record.unserved_reason(tokens, logprobs.bfloat16())
    assert "contiguous" in decode_record.unserved_reason(tokens.t(), logprobs)
