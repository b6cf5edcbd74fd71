"""RL formulas against values computed by hand from the published definitions."""

from __future__ import annotations

import math

import pytest
import torch

from orbit_core.eval.passk import pass_at_k
from orbit_core.rl.advantages import grpo_advantages
from orbit_core.rl.kl import kl_estimate
from orbit_core.rl.losses import clipped_policy_loss
from orbit_core.train.schedule import lr_at


def test_grpo_advantages_by_hand():
    rewards = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 2.0])
    adv = grpo_advantages(rewards, group_size=4)
    # group 1: mean 0.5, sample std sqrt(1/3)
    std = math.sqrt(((0.5**2) * 4) / 3)
    expected_1 = [0.5 / (std + 1e-6), -0.5 / (std + 1e-6), -0.5 / (std + 1e-6), 0.5 / (std + 1e-6)]
    torch.testing.assert_close(adv[:4], torch.tensor(expected_1))
    torch.testing.assert_close(adv[4:], torch.zeros(4))  # equal rewards carry no signal
    no_std = grpo_advantages(rewards, group_size=4, std_normalize=False)
    torch.testing.assert_close(no_std, torch.tensor([0.5, -0.5, -0.5, 0.5, 0, 0, 0, 0]))


def test_grpo_rejects_partial_groups():
    with pytest.raises(ValueError):
        grpo_advantages(torch.ones(5), group_size=4)


def test_clipped_loss_by_hand():
    # two sequences, three token slots, the last slot of row 2 is padding
    logp = torch.tensor([[math.log(1.5), math.log(0.5), math.log(1.1)], [math.log(0.7), math.log(1.4), 0.0]])
    old = torch.zeros(2, 3)
    adv = torch.tensor([1.0, -1.0])
    mask = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])
    loss, clip_frac = clipped_policy_loss(logp, old, adv, mask, eps_clip=0.2, eps_clip_high=0.3)
    # row 1 (A=+1): ratios 1.5, 0.5, 1.1 -> min(r, clip(r, 0.8, 1.3)) = 1.3, 0.5, 1.1
    # row 2 (A=-1): ratios 0.7, 1.4 -> min(-r, -clip(r)) = -0.8, -1.4
    per_token = [-1.3, -0.5, -1.1, 0.8, 1.4]
    assert loss.item() == pytest.approx(sum(per_token) / 5, abs=1e-6)
    assert clip_frac.item() == pytest.approx(2 / 5)  # tokens 1.5 (A>0) and 0.7 (A<0) take the clipped branch


def test_kl_estimators_by_hand():
    logp = torch.tensor([[math.log(0.5), math.log(0.2)]])
    ref = torch.tensor([[math.log(0.25), math.log(0.4)]])
    k1 = kl_estimate(logp, ref, "kl")
    torch.testing.assert_close(k1, torch.tensor([[math.log(2.0), math.log(0.5)]]))
    k2 = kl_estimate(logp, ref, "mse")
    torch.testing.assert_close(k2, 0.5 * torch.tensor([[math.log(2.0) ** 2, math.log(0.5) ** 2]]))
    k3 = kl_estimate(logp, ref, "low_var_kl")  # q/p - log(q/p) - 1
    torch.testing.assert_close(k3, torch.tensor([[0.5 - math.log(0.5) - 1, 2.0 - math.log(2.0) - 1]]))
    assert (kl_estimate(torch.tensor([[0.0]]), torch.tensor([[-50.0]]), "low_var_kl") <= 10).all()


def test_pass_at_k_matches_combinatorial_formula():
    for n in (1, 5, 10, 16):
        for c in range(n + 1):
            for k in range(1, n + 1):
                expected = 1.0 - math.comb(n - c, k) / math.comb(n, k)
                assert pass_at_k(n, c, k) == pytest.approx(expected, abs=1e-12)
    with pytest.raises(ValueError):
        pass_at_k(4, 5, 1)


def test_lr_schedules():
    assert lr_at(0, 10, 1.0, "constant", warmup_steps=2) == pytest.approx(0.5)
    assert lr_at(1, 10, 1.0, "constant", warmup_steps=2) == pytest.approx(1.0)
    assert lr_at(2, 10, 1.0, "linear", warmup_steps=2, min_lr=0.0) == pytest.approx(1.0)
    assert lr_at(6, 10, 1.0, "linear", warmup_steps=2, min_lr=0.0) == pytest.approx(0.5)
    assert lr_at(6, 10, 1.0, "cosine", warmup_steps=2, min_lr=0.1) == pytest.approx(0.55)
    assert lr_at(10, 10, 1.0, "cosine", warmup_steps=2, min_lr=0.1) == pytest.approx(0.1)
