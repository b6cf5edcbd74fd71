"""RL math (advantages, losses, KL, logprobs) and rewards.

Names are re-exported lazily so that a reward worker process, which imports only
``orbit_core.rl.rewards``, does not pay for importing torch.
"""

from importlib import import_module

_EXPORTS = {
    "grpo_advantages": "advantages", "kl_estimate": "kl", "token_entropy": "logprobs", "token_logprobs": "logprobs",
    "aggregate": "losses", "clipped_policy_loss": "losses", "masked_mean": "losses", "RewardRunner": "rewards",
    "extract_boxed": "rewards", "load_reward_fn": "rewards", "math_reward": "rewards", "RewardPool": "reward_pool",
    "build_rewards": "reward_pool",
}

__all__ = list(_EXPORTS)


def __getattr__(name: str):
    if name not in _EXPORTS:
        raise AttributeError(f"module 'orbit_core.rl' has no attribute {name!r}")
    return getattr(import_module(f"orbit_core.rl.{_EXPORTS[name]}"), name)
