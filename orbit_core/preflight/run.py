"""``orbit preflight``: checkpoint parity, then runtime parity, for one recipe's model."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from orbit_core.config.schema import RecipeConfig
from orbit_core.data.prompts import encode_prompt, use_chat_template
from orbit_core.errors import OrbitError
from orbit_core.data.embedded import PREFIX, TASK, is_embedded
from orbit_core.data.jsonl import load_records
from orbit_core.models.checkpoint import load_tokenizer, read_hf_config
from orbit_core.policy.build import pick_device
from orbit_core.policy.embedded import resolve_model_path
from orbit_core.policy.load import load_base
from orbit_core.preflight.checkpoint import CheckpointReport, check_checkpoint
from orbit_core.preflight.runtime import RuntimeReport, runtime_parity
from orbit_core.rollout.engine import BuiltinEngine

PRECISIONS = ("int4", "fp8", "nvfp4", "bf16")


@dataclass
class PreflightResult:
    checkpoint: CheckpointReport | None
    runtime: RuntimeReport | None

    @property
    def passed(self) -> bool:
        return all(r.passed for r in (self.checkpoint, self.runtime) if r is not None)


def run_preflight(config: RecipeConfig, precision: str, log=print, engine_overrides: dict | None = None) -> PreflightResult:
    """``engine_overrides`` changes the rollout side's architecture fields (a deliberately broken engine)."""
    if precision not in PRECISIONS:
        if "=" in precision:  # an override where the precision goes: `orbit preflight --recipe r a.b=c`
            raise OrbitError(f"orbit preflight takes the precision first, then overrides; got {precision!r}",
                             f"e.g. orbit preflight bf16 --recipe NAME {precision} (one of {', '.join(PRECISIONS)})")
        raise OrbitError(f"unknown precision {precision!r}", f"use one of {', '.join(PRECISIONS)}")
    p = config.preflight
    path = resolve_model_path(config.model.path, config.model.warmstart_steps, log)
    quant = read_hf_config(path).get("quantization_config")
    fmt = None
    if quant:
        from orbit_core.quant.formats import format_from_config

        fmt = format_from_config(quant, path)[0].name
    if (fmt or "bf16") != precision:
        raise OrbitError(f"{path} is {fmt or 'not quantized (bf16/fp32)'}, not {precision}",
                         f"run `orbit preflight {fmt or 'bf16'}` or point model.path at a {precision} checkpoint")
    source = p.source_path or None
    if source is None and fmt and is_embedded(config.model.path):
        source = resolve_model_path(f"{PREFIX}{TASK}", config.model.warmstart_steps, log)
    checkpoint = None if p.skip_checkpoint else check_checkpoint(path, source)
    runtime = None
    if not p.skip_runtime:
        device = pick_device(config.model.device)
        tokenizer = load_tokenizer(path)
        if config.train.backend == "megatron":
            from orbit_core.models.megatron_gpt import load_megatron_policy

            trainer_model = load_megatron_policy(path, config.model.dtype, device)
        else:
            trainer_model = load_base(path, config.model.dtype, device)
        engine_model = load_base(path, config.model.dtype, device)
        if engine_overrides:
            engine_model.config = dataclasses.replace(engine_model.config, **engine_overrides)
            engine_model._rope_len = 0
        chat = use_chat_template(tokenizer, config.data.apply_chat_template)
        records = load_records(config.data.train_path, config.data)[: p.num_prompts]
        prompts = [encode_prompt(tokenizer, r.prompt, chat, config.data.max_prompt_len) for r in records]
        engine = BuiltinEngine(engine_model, tokenizer, seed=config.train.seed)
        runtime = runtime_parity(engine, trainer_model, tokenizer, prompts, p.max_new_tokens, p.topk,
                                 p.max_logprob_abs_diff, p.min_topk_agreement, config.rollout.temperature or 1.0,
                                 p.max_logprob_mean_abs_diff)
    return PreflightResult(checkpoint, runtime)
