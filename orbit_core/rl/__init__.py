from orbit_core.rl.advantages import grpo_advantages
from orbit_core.rl.kl import kl_estimate
from orbit_core.rl.logprobs import token_entropy, token_logprobs
from orbit_core.rl.losses import aggregate, clipped_policy_loss, masked_mean
from orbit_core.rl.rewards import RewardRunner, extract_boxed, load_reward_fn, math_reward

__all__ = [
    "grpo_advantages", "kl_estimate", "token_entropy", "token_logprobs", "aggregate",
    "clipped_policy_loss", "masked_mean", "RewardRunner", "extract_boxed", "load_reward_fn", "math_reward",
]
