"""Estimators, loss shapes and corrections against hand calculations from the published formulas."""

from __future__ import annotations

import math

import pytest
import torch

from orbit_core.rl.advantages import (
    distillation_advantages,
    gae_advantages,
    grpo_advantages,
    reinforce_plus_plus_advantages,
    token_rewards,
)
from orbit_core.rl.losses import aggregate, clipped_value_loss, gspo_policy_loss, truncated_importance_weights

LOSS = torch.tensor([[1.0, 2.0, 3.0], [4.0, 5.0, 0.0]])
MASK = torch.tensor([[1.0, 1.0, 1.0], [1.0, 1.0, 0.0]])


@pytest.mark.parametrize("mode, expected", [
    ("token-mean", 15 / 5),
    ("seq-mean-token-sum", (6 + 9) / 2),
    ("seq-mean-token-mean", (6 / 3 + 9 / 2) / 2),
    ("seq-mean-token-sum-norm", 15 / (2 * 4)),  # Dr. GRPO: a constant normalizer (max length 4)
])
def test_loss_aggregations(mode, expected):
    assert aggregate(LOSS, MASK, mode, norm_length=4).item() == pytest.approx(expected)


def test_dr_grpo_advantages_drop_std():
    torch.testing.assert_close(grpo_advantages(torch.tensor([3.0, 1.0, 0.0, 0.0]), 2, std_normalize=False),
                               torch.tensor([1.0, -1.0, 0.0, 0.0]))


def test_gspo_sequence_ratio_and_clip():
    old = torch.zeros(2, 2)
    logp = torch.tensor([[0.1, 0.3], [0.2, 5.0]])  # the padded 5.0 must not count
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    loss, clipped = gspo_policy_loss(logp, old, torch.tensor([1.0, -1.0]), mask, eps_clip=0.1, eps_clip_high=0.15)
    s = math.exp(0.2)  # both sequences: mean log-ratio 0.2
    expected = (-min(s, 1.15) + -min(-s, -1.15)) / 2
    assert loss.item() == pytest.approx(expected, abs=1e-6)
    assert clipped.item() == pytest.approx(0.5)


KL = torch.tensor([[0.0, 0.1, 0.2, 0.0], [0.0, 0.3, 0.1, 0.2]])
RESP = torch.tensor([[0.0, 1.0, 1.0, 0.0], [0.0, 1.0, 1.0, 1.0]])


def test_token_rewards_put_score_on_last_token():
    rewards = token_rewards(torch.tensor([1.0, 0.0]), RESP, KL, kl_coef=0.5)
    torch.testing.assert_close(rewards, torch.tensor([[0.0, -0.05, 0.9, 0.0], [0.0, -0.15, -0.05, -0.1]]))


def _whitened(values):
    mean = sum(values) / len(values)
    std = math.sqrt(sum((v - mean) ** 2 for v in values) / len(values))
    return [(v - mean) / std for v in values]


def test_reinforce_plus_plus_by_hand():
    adv = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), RESP, KL, kl_coef=0.5)
    # returns (gamma 1): row 1 [0.85, 0.9], row 2 [-0.3, -0.15, -0.1]; then whitened over the 5 tokens
    w = _whitened([0.85, 0.9, -0.3, -0.15, -0.1])
    torch.testing.assert_close(adv, torch.tensor([[0, w[0], w[1], 0], [0, w[2], w[3], w[4]]]), atol=1e-5, rtol=0)


def test_reinforce_plus_plus_baseline_by_hand():
    adv = reinforce_plus_plus_advantages(torch.tensor([1.0, 0.0]), RESP, KL, kl_coef=0.5, group_size=2)
    # scores minus the group mean: [0.5, -0.5]; returns row 1 [0.35, 0.4], row 2 [-0.8, -0.65, -0.6]
    w = _whitened([0.35, 0.4, -0.8, -0.65, -0.6])
    torch.testing.assert_close(adv, torch.tensor([[0, w[0], w[1], 0], [0, w[2], w[3], w[4]]]), atol=1e-5, rtol=0)


def test_gae_by_hand():
    rewards = torch.tensor([[0.0, 0.0, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]])
    values = torch.tensor([[0.5, 0.6, 0.7, 9.0], [0.0, 1.0, 9.0, 9.0]])
    mask = torch.tensor([[1.0, 1.0, 1.0, 0.0], [0.0, 1.0, 0.0, 0.0]])
    adv, returns = gae_advantages(rewards, values, mask, gamma=0.9, lam=0.8)
    a2 = 1.0 - 0.7
    a1 = (0.9 * 0.7 - 0.6) + 0.72 * a2
    a0 = (0.9 * 0.6 - 0.5) + 0.72 * a1
    torch.testing.assert_close(adv, torch.tensor([[a0, a1, a2, 0.0], [0.0, 1.0, 0.0, 0.0]]))
    torch.testing.assert_close(returns, torch.tensor([[a0 + 0.5, a1 + 0.6, 1.0, 0.0], [0.0, 2.0, 0.0, 0.0]]))


def test_clipped_value_loss_by_hand():
    values, old = torch.tensor([[1.0, 2.0, 1.0]]), torch.tensor([[0.5, 2.0, 0.0]])
    returns, mask = torch.tensor([[0.0, 2.5, 1.0]]), torch.ones(1, 3)
    loss, frac = clipped_value_loss(values, old, returns, mask, value_clip=0.2)
    # clipped values [0.7, 2.0, 0.2]: per token 0.5 * max([1, .25, 0], [.49, .25, .64])
    assert loss.item() == pytest.approx(0.5 * (1.0 + 0.25 + 0.64) / 3)
    assert frac.item() == pytest.approx(1 / 3)


def test_truncated_importance_weights():
    trainer = torch.tensor([[math.log(0.5), math.log(0.2)]])
    rollout = torch.tensor([[math.log(0.25), math.log(0.4)]])
    weights, truncated = truncated_importance_weights(trainer, rollout, torch.ones(1, 2), cap=1.5)
    torch.testing.assert_close(weights, torch.tensor([[1.5, 0.5]]))
    assert truncated.item() == pytest.approx(0.5)


def test_distillation_reward_is_reverse_kl_per_token():
    student = torch.tensor([[math.log(0.5), math.log(0.1)]])
    teacher = torch.tensor([[math.log(0.25), math.log(0.4)]])
    adv = distillation_advantages(student, teacher, torch.tensor([[1.0, 0.0]]))
    torch.testing.assert_close(adv, torch.tensor([[math.log(0.5), 0.0]]))
