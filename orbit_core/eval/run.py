"""``orbit eval``: a recipe's base model, or a trained adapter on its base, against a test JSONL."""

from __future__ import annotations

import os

from orbit_core.config.loader import apply_overrides, build_config
from orbit_core.config.schema import RecipeConfig
from orbit_core.data.jsonl import load_records
from orbit_core.data.prompts import use_chat_template
from orbit_core.errors import OrbitError
from orbit_core.eval.evaluate import EvalReport, evaluate
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.policy.adapter_files import load_adapter, resolve_adapter_dir
from orbit_core.policy.build import build_policy
from orbit_core.rl.reward_pool import build_rewards


def config_from_adapter(path: str, overrides: list[str]) -> RecipeConfig:
    _, meta = load_adapter(resolve_adapter_dir(path))
    if "recipe" not in meta:
        raise OrbitError(f"{path}: adapter_config.json has no recipe", "the adapter was not written by `orbit train`")
    config = build_config(apply_overrides(meta["recipe"], overrides))
    base = config.model.path
    if not base.startswith("embedded:") and not os.path.exists(base):
        raise OrbitError(f"{path}: the adapter's base model {base} is not there any more",
                         f"name where it is now: orbit eval --adapter {path} model.path=DIR")
    return config


def run_eval(config: RecipeConfig, adapter: str | None = None, log=print) -> EvalReport:
    e = config.eval
    records = load_records(e.test_path, config.data)
    rewards = build_rewards(config.rl)  # a bad reward or test file fails before the model loads
    try:
        policy = build_policy(config.model, config.peft if adapter else None, log)
        if adapter:
            state, _ = load_adapter(resolve_adapter_dir(adapter))
            from orbit_core.peft.base import load_adapter_state_dict

            load_adapter_state_dict(policy.model, state, adapter)
        engine = BuiltinEngine(policy.model, policy.tokenizer, max_running=config.rollout.max_running,
                               seed=config.train.seed, cuda_graph=config.rollout.cuda_graph)
        chat = use_chat_template(policy.tokenizer, config.data.apply_chat_template)
        return evaluate(engine, policy.tokenizer, records, rewards, chat=chat, max_prompt_len=config.data.max_prompt_len,
                        max_new_tokens=e.max_new_tokens, n_samples=e.n_samples, ks=e.k, temperature=e.temperature,
                        stop=tuple(config.rollout.stop))
    finally:
        rewards.close()
