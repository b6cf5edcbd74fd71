"""LoRA on a frozen base: identity at init, merge equivalence, frozen base, KL reference."""

from __future__ import annotations

import pytest
import torch

from orbit_core.errors import OrbitError
from orbit_core.models import load_model
from orbit_core.peft import adapter_disabled, adapter_parameters, apply_lora, merge_adapters


def _randomize_lora(model):
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "lora_" in name:
                p.normal_(0.0, 0.1)


def test_zero_b_keeps_logits_identical(tiny_checkpoint):
    base = load_model(tiny_checkpoint)
    ids = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        expected = base(ids)
    targets = apply_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    assert len(targets) == 2 * 7
    with torch.no_grad():
        assert torch.equal(base(ids), expected)


def test_merged_weights_equal_unmerged_adapter(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    apply_lora(model, rank=4, alpha=8, dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"])
    _randomize_lora(model)
    ids = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        unmerged = model(ids)
        with adapter_disabled(model):
            base_only = model(ids)
        merged = merge_adapters(model)(ids)
    assert (unmerged - base_only).abs().max() > 1e-3  # the adapter does something
    torch.testing.assert_close(merged, unmerged, atol=1e-5, rtol=1e-5)


def test_base_frozen_and_unchanged_after_steps(tiny_checkpoint):
    model = load_model(tiny_checkpoint)
    apply_lora(model, rank=4, alpha=8, dropout=0.1, target_modules=["all-linear"])
    base_before = {n: p.detach().clone() for n, p in model.named_parameters() if "lora_" not in n}
    trainable = adapter_parameters(model)
    assert trainable and all("lora_" in n for n, p in model.named_parameters() if p.requires_grad)
    assert all(not p.requires_grad for n, p in model.named_parameters() if "lora_" not in n)
    opt = torch.optim.AdamW(trainable, lr=1e-2)
    model.train()
    for _ in range(3):
        loss = model(torch.randint(0, 17, (2, 10))).logsumexp(-1).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    for n, p in model.named_parameters():
        if "lora_" not in n:
            assert torch.equal(p, base_before[n]), n
    assert any((p.abs().sum() > 0) for n, p in model.named_parameters() if "lora_B" in n)


def test_adapter_disabled_is_the_base_model(tiny_checkpoint):
    base = load_model(tiny_checkpoint)
    ids = torch.randint(0, 17, (2, 12))
    with torch.no_grad():
        expected = base(ids)
    apply_lora(base, rank=4, alpha=8, dropout=0.0, target_modules=["all-linear"])
    _randomize_lora(base)
    with torch.no_grad(), adapter_disabled(base):
        assert torch.equal(base(ids), expected)


def test_unknown_target_modules(tiny_checkpoint):
    with pytest.raises(OrbitError, match="matched no linear layer"):
        apply_lora(load_model(tiny_checkpoint), 4, 8, 0.0, ["qkv_proj"])
