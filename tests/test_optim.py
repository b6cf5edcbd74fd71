"""AdapterAdamW equals torch's AdamW; bf16 states stay close; offloaded states live on the host."""

from __future__ import annotations

import torch

from orbit_core.train.optim import AdapterAdamW


def _run(make_opt, steps=5):
    torch.manual_seed(0)
    params = [torch.nn.Parameter(torch.randn(8, 4)), torch.nn.Parameter(torch.randn(3))]
    opt = make_opt(params)
    for i in range(steps):
        loss = sum((p**2).sum() * (i + 1) for p in params) + params[0][0, 0] ** 3
        opt.zero_grad()
        loss.backward()
        opt.step()
    return params, opt


def test_matches_torch_adamw():
    ours, _ = _run(lambda ps: AdapterAdamW(ps, lr=0.01, betas=(0.9, 0.98), weight_decay=0.1))
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=0.01, betas=(0.9, 0.98), weight_decay=0.1))
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bf16_states_and_offload():
    ref, _ = _run(lambda ps: torch.optim.AdamW(ps, lr=0.01))
    ours, opt = _run(lambda ps: AdapterAdamW(ps, lr=0.01, state_dtype="bfloat16", offload=True))
    assert all(s.dtype == torch.bfloat16 and s.device.type == "cpu" for s in opt.exp_avg + opt.exp_avg_sq)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, atol=2e-3, rtol=0)


def test_state_round_trip():
    params, opt = _run(lambda ps: AdapterAdamW(ps, lr=0.01))
    clone = AdapterAdamW([torch.nn.Parameter(p.detach().clone()) for p in params], lr=0.5)
    clone.load_state_dict(opt.state_dict())
    assert clone.steps == opt.steps and clone.param_groups[0]["lr"] == 0.01
    for a, b in zip(clone.exp_avg_sq, opt.exp_avg_sq):
        assert torch.equal(a, b)
