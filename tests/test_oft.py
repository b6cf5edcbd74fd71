"""OFT: identity at init, orthogonal blocks after training, merge equivalence, COFT, shape errors."""

from __future__ import annotations

import pytest
import torch

from orbit_core.errors import OrbitError
from orbit_core.models import load_model
from orbit_core.peft import OFTLinear, adapter_disabled, adapter_modules, adapter_parameters, apply_oft, merge_adapters, project_oft_


def _train(model, steps=4, lr=0.05):
    opt = torch.optim.AdamW(adapter_parameters(model), lr=lr)
    model.train()
    for _ in range(steps):
        loss = model(torch.randint(0, 17, (2, 10))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        project_oft_(model)


def test_identity_at_init(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    ids = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        expected = model(ids)
    apply_oft(model, block_size=16, coft=False, eps=1e-4, block_share=False, target_modules=["all-linear"])
    with torch.no_grad():
        torch.testing.assert_close(model(ids), expected, atol=1e-6, rtol=0)


@pytest.mark.parametrize("block_share", [False, True])
def test_blocks_stay_orthogonal_and_merge_matches(tiny_checkpoint, block_share):
    model = load_model(tiny_checkpoint)
    apply_oft(model, block_size=8, coft=False, eps=1e-4, block_share=block_share, target_modules=["all-linear"])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "oft_" not in n}
    _train(model)
    for _, module in adapter_modules(model):
        blocks = module.rotation()
        eye = torch.eye(8).expand_as(blocks)
        torch.testing.assert_close(blocks.transpose(1, 2) @ blocks, eye, atol=1e-5, rtol=0)
        assert (module.skew().abs().sum() > 0)
        if block_share:
            assert module.oft_skew.shape[0] == 1
    for n, p in model.named_parameters():
        if "oft_" not in n:
            assert torch.equal(p, base_before[n])
    ids = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        adapted = model(ids)
        with adapter_disabled(model):
            base = model(ids)
        assert (adapted - base).abs().max() > 1e-4
        merged = merge_adapters(model)(ids)
    torch.testing.assert_close(merged, adapted, atol=1e-5, rtol=1e-5)


def test_coft_keeps_skew_within_eps(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    apply_oft(model, block_size=8, coft=True, eps=1e-3, block_share=False, target_modules=["q_proj"])
    _train(model, lr=0.1)
    for _, module in adapter_modules(model):
        norms = module.skew().flatten(1).norm(dim=1)
        assert norms.max() <= 1e-3 * (1 + 1e-4)
        assert norms.max() > 5e-4  # it did move, up to the ball's edge


def test_block_size_must_divide_the_layer(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    with pytest.raises(OrbitError, match=r"peft.oft_block_size=24 does not divide model.layers.0.self_attn.q_proj \(in_features=64"):
        apply_oft(model, block_size=24, coft=False, eps=1e-4, block_share=False, target_modules=["all-linear"])
    assert not any(isinstance(m, OFTLinear) for m in model.modules())  # nothing half-wrapped


def test_rotation_is_solved_once_per_adapter_version_without_autograd(tiny_checkpoint, monkeypatch):
    """An engine decoding step after step solves each rotation once; an optimizer step (an in-place
    change of the skew) makes it solve again, and the result equals the autograd path's fresh solve."""
    from orbit_core.peft import oft

    model = load_model(tiny_checkpoint)
    apply_oft(model, block_size=16, coft=False, eps=1e-4, block_share=False, target_modules=["all-linear"])
    _train(model, steps=2)
    model.eval()
    layers = len(list(adapter_modules(model)))
    solves = []
    real = oft.cayley_blocks
    monkeypatch.setattr(oft, "cayley_blocks", lambda *a: solves.append(1) or real(*a))
    ids = torch.randint(0, 17, (2, 9))
    with torch.no_grad():
        first = model(ids)
        again = model(ids)
    assert len(solves) == layers and torch.equal(first, again)
    _train(model, steps=1)  # the optimizer changes every skew in place
    model.eval()
    before = len(solves)
    with torch.no_grad():
        cached = model(ids)
        model(ids)
    assert len(solves) == before + layers
    fresh = model(ids).detach()  # autograd on: solved on every call, never cached
    torch.testing.assert_close(cached, fresh, atol=0, rtol=0)
    assert (cached - first).abs().max() > 1e-4
