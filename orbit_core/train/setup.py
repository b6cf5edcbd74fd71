"""Build the run's components, each from its own recipe section."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch

from orbit_core.config.schema import DataSection, EvalSection, ModelSection, PeftSection, RLSection
from orbit_core.data.jsonl import PromptRecord, read_prompts
from orbit_core.errors import OrbitError
from orbit_core.models.checkpoint import load_model, load_tokenizer
from orbit_core.models.embedded import resolve_data_path, resolve_model_path
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.lora import apply_lora
from orbit_core.rl.rewards import RewardRunner, load_reward_fn


def pick_device(spec: str) -> torch.device:
    if spec == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if spec.startswith("cuda") and not torch.cuda.is_available():
        raise OrbitError(f"model.device={spec} but no CUDA device is visible", "use model.device=auto or cpu")
    return torch.device(spec)


@dataclass
class PolicyModel:
    model: DecoderLM
    tokenizer: object
    base_path: str
    lora_targets: list[str]
    device: torch.device


def build_policy(model_cfg: ModelSection, peft_cfg: PeftSection | None, log: Callable[[str], None] = print) -> PolicyModel:
    """Frozen base from a checkpoint (or the embedded one) with LoRA on top when ``peft_cfg`` is given."""
    device = pick_device(model_cfg.device)
    path = resolve_model_path(model_cfg.path, model_cfg.warmstart_steps, log)
    model = load_model(path, model_cfg.dtype, device)
    tokenizer = load_tokenizer(path)
    targets: list[str] = []
    if peft_cfg is not None:
        targets = apply_lora(model, peft_cfg.rank, peft_cfg.alpha, peft_cfg.dropout, peft_cfg.target_modules)
        model.to(device)
    return PolicyModel(model, tokenizer, path, targets, device)


def load_records(spec: str, data_cfg: DataSection) -> list[PromptRecord]:
    return read_prompts(resolve_data_path(spec), data_cfg.prompt_key, data_cfg.label_key)


def build_rewards(rl_cfg: RLSection) -> RewardRunner:
    return RewardRunner(load_reward_fn(rl_cfg.reward), timeout_s=rl_cfg.reward_timeout_s)


def eval_records(eval_cfg: EvalSection, data_cfg: DataSection) -> list[PromptRecord] | None:
    return load_records(eval_cfg.test_path, data_cfg) if eval_cfg.enabled else None
