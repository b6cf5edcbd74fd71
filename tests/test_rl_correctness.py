"""RL math against the literature, including where the gradients flow."""

from __future__ import annotations

import pytest
import torch

from orbit_core.config import load_recipe
from orbit_core.rl.kl import kl_estimate, resolve_kl_type
from orbit_core.rl.losses import aggregate, gspo_policy_loss


def _expected_kl_gradient(kind: str, logits: torch.Tensor, ref_logp: torch.Tensor) -> torch.Tensor:
    """d/dtheta of E_{x~p}[k(x)] as the trainer computes it: sampling weights are constants
    (tokens come from the engine), only the estimator's own dependence on log p is differentiated."""
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    weights = logp.exp().detach()
    (weights * kl_estimate(logp, ref_logp, kind)).sum().backward()
    return theta.grad


def _exact_gradient(logits: torch.Tensor, ref_logp: torch.Tensor, reverse: bool = False) -> torch.Tensor:
    theta = logits.clone().requires_grad_(True)
    logp = torch.log_softmax(theta, -1)
    if reverse:  # KL(ref || p)
        kl = (ref_logp.exp() * (ref_logp - logp)).sum()
    else:  # KL(p || ref)
        kl = (logp.exp() * (logp - ref_logp)).sum()
    kl.backward()
    return theta.grad


def test_kl_estimator_gradients_on_an_exact_categorical():
    torch.manual_seed(0)
    logits = torch.randn(7, dtype=torch.float64)
    ref_logp = torch.log_softmax(torch.randn(7, dtype=torch.float64), -1)
    exact = _exact_gradient(logits, ref_logp)
    assert exact.norm() > 0.1
    # k2 (mse): its gradient is exactly grad KL(p || ref)
    torch.testing.assert_close(_expected_kl_gradient("mse", logits, ref_logp), exact)
    # k1: zero expected gradient on-policy
    torch.testing.assert_close(_expected_kl_gradient("kl", logits, ref_logp), torch.zeros(7, dtype=torch.float64))
    # k3 (low_var_kl): the gradient of the reverse KL(ref || p), not of KL(p || ref)
    k3 = _expected_kl_gradient("low_var_kl", logits, ref_logp)
    torch.testing.assert_close(k3, _exact_gradient(logits, ref_logp, reverse=True))
    assert (k3 - exact).abs().max() > 1e-3


def test_auto_kl_is_k2_as_a_loss_and_k1_as_a_reward_penalty(tmp_path):
    recipe = load_recipe("tiny-arith-lora")
    assert recipe.rl.kl_type == "auto"
    assert resolve_kl_type("auto", as_loss=True) == "mse"
    assert resolve_kl_type("auto", as_loss=False) == "kl"
    assert resolve_kl_type("low_var_kl", as_loss=True) == "low_var_kl"


def test_gspo_honours_loss_agg_and_token_weights():
    logprobs = torch.tensor([[-1.0, -0.5, 0.0], [-2.0, 0.0, 0.0]], requires_grad=True)
    old = torch.tensor([[-1.1, -0.4, 0.0], [-1.8, 0.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0, 0.0], [1.0, 0.0, 0.0]])
    adv = torch.tensor([1.0, -1.0])
    ratio = torch.exp(torch.tensor([(-1.0 + 1.1 - 0.5 + 0.4) / 2, (-2.0 + 1.8) / 1]))
    per_seq = -torch.minimum(ratio * adv, torch.clamp(ratio, 0.8, 1.28) * adv)
    mean_seq, _ = gspo_policy_loss(logprobs, old, adv, mask, 0.2, 0.28, "seq-mean-token-mean")
    torch.testing.assert_close(mean_seq, per_seq.mean())  # the paper's 1/G sum_i
    by_token, _ = gspo_policy_loss(logprobs, old, adv, mask, 0.2, 0.28, "token-mean")
    torch.testing.assert_close(by_token, (2 * per_seq[0] + per_seq[1]) / 3)
    weights = torch.tensor([[0.5, 1.0, 0.0], [2.0, 0.0, 0.0]])
    weighted, _ = gspo_policy_loss(logprobs, old, adv, mask, 0.2, 0.28, "seq-mean-token-mean", weights)
    torch.testing.assert_close(weighted, (per_seq[0] * 0.75 + per_seq[1] * 2.0) / 2)


def test_entropy_builds_a_graph_only_when_it_is_in_the_loss(tiny_checkpoint):
    from orbit_core.config.loader import build_config
    from orbit_core.policy.build import build_policy
    from orbit_core.train.batch import RolloutBatch
    from orbit_core.train.torch_backend import TorchTrainer

    for coef, wants_grad in ((0.0, False), (0.01, True)):
        config = build_config({"model": {"path": tiny_checkpoint, "device": "cpu"}, "rl": {"entropy_coef": coef},
                               "peft": {"rank": 2}})
        policy = build_policy(config.model, config.peft, log=lambda m: None)
        trainer = TorchTrainer(policy.model, config)
        ids = torch.randint(3, policy.model.config.vocab_size, (2, 6))
        mask = torch.ones(2, 5)
        micro = RolloutBatch(ids, mask, torch.zeros(2, 5), torch.zeros(2), advantages=torch.ones(2),
                             old_logprobs=torch.zeros(2, 5))
        assert trainer._micro_loss(micro)["entropy"].requires_grad is wants_grad


def test_training_refuses_filtered_sampling():
    from orbit_core.errors import OrbitError

    for override in ("rollout.top_p=0.9", "rollout.top_k=20"):
        with pytest.raises(OrbitError, match="truncated distribution"):
            load_recipe("tiny-arith-lora", [override])


def test_aggregate_token_mean_is_length_weighted():
    loss = torch.tensor([[1.0, 3.0], [5.0, 0.0]])
    mask = torch.tensor([[1.0, 1.0], [1.0, 0.0]])
    assert aggregate(loss, mask, "token-mean").item() == pytest.approx(3.0)


def test_decoupled_ppo_on_a_constructed_behaviour_mismatch(tmp_path, tiny_checkpoint):
    """The clip's ratio is taken against the trainer's recompute (proximal), and the truncated IS
    weight min(pi_prox / pi_behaviour, cap) carries the engine-side mismatch, here constructed."""
    from orbit_core.config.loader import build_config
    from orbit_core.policy.build import build_policy
    from orbit_core.rl.logprobs import token_logprobs
    from orbit_core.train.batch import RolloutBatch
    from orbit_core.train.prepare import prepare_batch
    from orbit_core.train.torch_backend import TorchTrainer

    config = build_config({"model": {"path": tiny_checkpoint, "device": "cpu"}, "peft": {"rank": 4},
                           "rl": {"tis_cap": 2.0}, "train": {"mode": "async", "global_batch_size": 8, "micro_batch_size": 4},
                           "rollout": {"placement": "non-colocated", "batch_size": 2, "n_samples_per_prompt": 4}})
    policy = build_policy(config.model, config.peft, log=lambda m: None)
    torch.manual_seed(0)
    with torch.no_grad():
        for name, p in policy.model.named_parameters():
            if "lora_B" in name:
                p.normal_(0.0, 0.05)  # an adapter that has moved
    trainer = TorchTrainer(policy.model, config)
    ids = torch.randint(3, policy.model.config.vocab_size, (8, 7))
    mask = torch.zeros(8, 6)
    mask[:, 2:] = 1.0
    with torch.no_grad():
        fresh = token_logprobs(policy.model(ids[:, :-1]), ids[:, 1:]) * mask  # an independent recompute
    delta = torch.where(torch.arange(6) % 2 == 0, 0.5, -1.5).expand(8, 6) * mask
    behaviour = fresh - delta  # pi_prox / pi_behaviour = exp(delta): 1.65 (kept) or 0.22
    scores = torch.tensor([1.0, 0.0, 1.0, 0.0, 1.0, 1.0, 0.0, 0.0])
    batch = RolloutBatch(ids, mask, behaviour, scores)
    stats = prepare_batch(batch, trainer, config.rl, group_size=4, with_teacher=False)
    torch.testing.assert_close(batch.old_logprobs * mask, fresh, atol=1e-5, rtol=0)
    torch.testing.assert_close(batch.tis_weights, torch.clamp(torch.exp(delta), max=2.0) * mask, atol=1e-5, rtol=0)
    assert stats["rollout/behaviour_proximal_logprob_abs_diff_max"] == pytest.approx(1.5, abs=1e-4)

    # the trainer's gradient equals a hand-written decoupled objective at ratio 1 (no clipping yet)
    params = [p for p in policy.model.parameters() if p.requires_grad]
    micro = batch.select(torch.arange(8))
    trainer._micro_loss(micro)["pg_loss"].backward()
    got = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    logp = token_logprobs(policy.model(ids[:, :-1]), ids[:, 1:])
    ratio = torch.exp(logp - batch.old_logprobs)
    hand = -(batch.advantages[:, None] * batch.tis_weights * ratio * mask).sum() / mask.sum()
    hand.backward()
    for g, p in zip(got, params):
        torch.testing.assert_close(g, p.grad, atol=1e-6, rtol=1e-4)
