"""YAML recipes -> typed RecipeConfig, with validated ``section.field=value`` overrides."""

from __future__ import annotations

import dataclasses
import difflib
import math
import os
import types
import typing
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import yaml

from orbit_core.config.schema import SECTIONS, RecipeConfig
from orbit_core.errors import OrbitError

RECIPE_DIR = Path(__file__).parent / "recipes"


def list_recipes() -> list[str]:
    return sorted(p.stem for p in RECIPE_DIR.glob("*.yaml"))


def recipe_path(name_or_path: str) -> Path:
    """Resolve a shipped recipe name or a user's YAML path."""
    candidate = Path(name_or_path)
    if candidate.suffix in (".yaml", ".yml") or os.sep in name_or_path:
        if not candidate.is_file():
            raise OrbitError(f"recipe file not found: {name_or_path}", "check the path")
        return candidate
    shipped = RECIPE_DIR / f"{name_or_path}.yaml"
    if shipped.is_file():
        return shipped
    close = difflib.get_close_matches(name_or_path, list_recipes(), n=3)
    hint = f"did you mean {', '.join(close)}?" if close else "run `orbit recipes list`"
    raise OrbitError(f"unknown recipe '{name_or_path}'", hint)


def _section_types() -> dict[str, type]:
    hints = typing.get_type_hints(RecipeConfig)
    return {name: hints[name] for name in SECTIONS}


def _field_hints(section_cls: type) -> dict[str, Any]:
    return typing.get_type_hints(section_cls)


def _type_name(tp: Any) -> str:
    origin = get_origin(tp)
    if origin is Literal:
        return "one of " + "|".join(str(a) for a in get_args(tp))
    if origin is list:
        return f"list of {_type_name(get_args(tp)[0])}"
    if origin in (typing.Union, types.UnionType):
        return " or ".join(_type_name(a) for a in get_args(tp))
    return getattr(tp, "__name__", str(tp))


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Convert ``value`` (from YAML or a CLI string) to ``tp`` or raise a one-line error."""
    origin = get_origin(tp)
    bad = OrbitError(f"{where}: expected {_type_name(tp)}, got {value!r}", f"set {where} to a valid {_type_name(tp)}")
    if origin is Literal:
        choices = get_args(tp)
        as_str = str(value).lower() if isinstance(value, bool) else value
        if as_str in choices:
            return as_str
        raise bad
    if origin in (typing.Union, types.UnionType):
        args = get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _coerce(value, arg, where)
            except OrbitError:
                continue
        raise bad
    if origin is list:
        (inner,) = get_args(tp)
        if isinstance(value, str):
            value = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
        if not isinstance(value, (list, tuple)):
            raise bad
        return [_coerce(v, inner, where) for v in value]
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "1", "yes", "on", "false", "0", "no", "off"):
            return value.lower() in ("true", "1", "yes", "on")
        raise bad
    if tp in (int, float):
        numeric_ok = isinstance(value, int) or (tp is float and isinstance(value, float))
        if isinstance(value, bool) or not (numeric_ok or isinstance(value, str)):
            raise bad
        try:
            return tp(value)
        except ValueError:
            raise bad from None
    if tp is str:
        if isinstance(value, (str, int, float)) and not isinstance(value, bool):
            return str(value)
        raise bad
    raise bad


def _unknown(kind: str, name: str, valid: list[str]) -> OrbitError:
    close = difflib.get_close_matches(name, valid, n=3, cutoff=0.5)
    hint = f"did you mean {', '.join(close)}?" if close else f"valid {kind}s: {', '.join(valid)}"
    return OrbitError(f"unknown {kind} '{name}'", hint)


def build_config(raw: dict[str, Any]) -> RecipeConfig:
    """Validate a nested dict (sections -> fields) and build a RecipeConfig."""
    if not isinstance(raw, dict):
        raise OrbitError("a recipe must be a YAML mapping of sections", f"use sections: {', '.join(SECTIONS)}")
    sections = _section_types()
    built: dict[str, Any] = {}
    for name, values in raw.items():
        if name not in sections:
            raise _unknown("section", str(name), list(SECTIONS))
        if values is None:
            values = {}
        if not isinstance(values, dict):
            raise OrbitError(f"section '{name}' must be a mapping of fields", f"write it as `{name}:` with indented fields")
        hints = _field_hints(sections[name])
        kwargs = {}
        for key, value in values.items():
            if key not in hints:
                valid = [f"{name}.{k}" for k in hints]
                raise _unknown("key", f"{name}.{key}", valid)
            kwargs[key] = _coerce(value, hints[key], f"{name}.{key}")
        built[name] = sections[name](**kwargs)
    config = RecipeConfig(**built)
    validate(config)
    return config


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply ``section.field=value`` strings to a nested dict (Megatron-Bridge style)."""
    merged = {k: dict(v or {}) for k, v in raw.items()}
    sections = _section_types()
    for item in overrides:
        if "=" not in item or "." not in item.split("=", 1)[0]:
            raise OrbitError(f"bad override '{item}'", "write overrides as section.field=value, e.g. train.lr=1e-4")
        key, value = item.split("=", 1)
        section, field_name = key.split(".", 1)
        if section not in sections:
            raise _unknown("section", section, list(SECTIONS))
        hints = _field_hints(sections[section])
        if field_name not in hints:
            raise _unknown("key", key, [f"{section}.{k}" for k in hints])
        parsed: Any = value
        if get_origin(hints[field_name]) is list and value.startswith("["):
            parsed = yaml.safe_load(value)
        merged.setdefault(section, {})[field_name] = parsed
    return merged


def load_recipe(name_or_path: str, overrides: list[str] | None = None) -> RecipeConfig:
    path = recipe_path(name_or_path)
    try:
        raw = yaml.safe_load(path.read_text()) or {}
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        where = f" line {mark.line + 1}" if mark else ""
        raise OrbitError(f"recipe {path}{where} is not valid YAML", "fix the YAML syntax") from err
    except UnicodeDecodeError as err:
        raise OrbitError(f"recipe {path} is not UTF-8 text", "save it as UTF-8") from err
    if not isinstance(raw, dict):
        raise OrbitError(f"recipe {path} is a YAML {type(raw).__name__}, not a mapping of sections",
                         f"write it as sections ({', '.join(SECTIONS)}) with indented fields")
    return build_config(apply_overrides(raw, overrides or []))


def to_dict(config: RecipeConfig) -> dict[str, Any]:
    return dataclasses.asdict(config)


def to_yaml(config: RecipeConfig) -> str:
    return yaml.safe_dump(to_dict(config), sort_keys=False)


def _check_finite(config: RecipeConfig) -> None:
    for section in SECTIONS:
        for f in dataclasses.fields(getattr(config, section)):
            value = getattr(getattr(config, section), f.name)
            if isinstance(value, float) and not math.isfinite(value):
                raise OrbitError(f"{section}.{f.name} must be a finite number, got {value}", f"set {section}.{f.name} to a number")


def validate(config: RecipeConfig) -> None:
    """Cross-field checks, done before anything loads."""
    _check_finite(config)
    t, r = config.train, config.rollout
    positive = {
        "train.steps": t.steps, "train.global_batch_size": t.global_batch_size,
        "train.micro_batch_size": t.micro_batch_size, "rollout.batch_size": r.batch_size,
        "rollout.n_samples_per_prompt": r.n_samples_per_prompt, "rollout.max_new_tokens": r.max_new_tokens,
        "rollout.max_running": r.max_running, "peft.rank": config.peft.rank,
        "eval.n_samples": config.eval.n_samples, "data.max_prompt_len": config.data.max_prompt_len,
        "train.lr": t.lr, "rl.reward_timeout_s": config.rl.reward_timeout_s,
    }
    for name, value in positive.items():
        if value <= 0:
            raise OrbitError(f"{name} must be > 0, got {value}", f"set {name} to a positive number")
    estimator = config.rl.advantage_estimator
    if estimator in ("grpo", "gspo", "reinforce_plus_plus_baseline") and r.n_samples_per_prompt < 2:
        raise OrbitError(f"rl.advantage_estimator={estimator} measures each sample against its prompt's "
                         "group; with rollout.n_samples_per_prompt=1 every advantage is zero and nothing is learned",
                         "use rollout.n_samples_per_prompt >= 2 (e.g. 8), or rl.advantage_estimator="
                         "reinforce_plus_plus or ppo")
    if t.global_batch_size % t.micro_batch_size:
        raise OrbitError(
            f"train.global_batch_size ({t.global_batch_size}) is not a multiple of train.micro_batch_size ({t.micro_batch_size})",
            "make global_batch_size = micro_batch_size x gradient accumulation steps",
        )
    samples = r.batch_size * r.n_samples_per_prompt
    if samples % t.global_batch_size:
        raise OrbitError(
            f"rollout.batch_size x rollout.n_samples_per_prompt ({samples}) is not a multiple of train.global_batch_size ({t.global_batch_size})",
            "each rollout must split into whole optimizer steps",
        )
    if not 0.0 < r.top_p <= 1.0:
        raise OrbitError(f"rollout.top_p must be in (0, 1], got {r.top_p}", "set rollout.top_p=1.0 to disable")
    if r.top_k < 0:
        raise OrbitError(f"rollout.top_k must be >= 0, got {r.top_k}", "use 0 to disable top-k")
    if r.top_p < 1.0 or r.top_k > 0:
        raise OrbitError(f"rollout.top_p={r.top_p} / rollout.top_k={r.top_k} sample from a truncated distribution, but the "
                         "trainer's importance ratios use the full softmax", "train with rollout.top_p=1.0 rollout.top_k=0")
    if not 0.0 <= config.data.max_truncated_fraction <= 1.0:
        raise OrbitError(f"data.max_truncated_fraction must be in [0, 1], got {config.data.max_truncated_fraction}",
                         "use e.g. 0.01 to allow 1% of prompts to be cut")
    if t.max_tokens_per_micro_batch < 0:
        raise OrbitError(f"train.max_tokens_per_micro_batch must be >= 0, got {t.max_tokens_per_micro_batch}",
                         "use 0 to size micro-batches by train.micro_batch_size")
    if t.min_lr < 0 or t.weight_decay < 0:
        raise OrbitError("train.min_lr and train.weight_decay must be >= 0", "fix those train fields")
    if r.temperature < 0 or config.eval.temperature < 0:
        raise OrbitError("temperature must be >= 0", "use 0 for greedy decoding")
    if r.temperature == 0:  # the extreme of the truncation refused above
        raise OrbitError("rollout.temperature=0 decodes greedily: a group's samples are one answer (zero advantage) "
                         "and none is drawn from the softmax the trainer's importance ratios use",
                         "train with rollout.temperature > 0 (e.g. 1.0); eval.temperature=0 stays for greedy eval")
    if any(k <= 0 or k > config.eval.n_samples for k in config.eval.k):
        raise OrbitError(
            f"eval.k values {config.eval.k} must be in [1, eval.n_samples={config.eval.n_samples}]",
            "raise eval.n_samples or lower eval.k",
        )
    rl = config.rl
    if rl.advantage_estimator == "ppo" and not rl.value_head:
        raise OrbitError("rl.advantage_estimator=ppo needs a value head", "set rl.value_head=true")
    if rl.advantage_estimator == "on_policy_distillation" and not rl.teacher_path:
        raise OrbitError("rl.advantage_estimator=on_policy_distillation needs a teacher", "set rl.teacher_path to a checkpoint dir")
    if rl.tis_cap < 0 or rl.dynamic_sampling_max_rounds < 1:
        raise OrbitError("rl.tis_cap must be >= 0 and rl.dynamic_sampling_max_rounds >= 1", "fix those rl fields")
    if config.peft.method == "oft" and config.peft.oft_block_size <= 0:
        raise OrbitError(f"peft.oft_block_size must be > 0, got {config.peft.oft_block_size}", "use e.g. 16 or 32")
    if r.adapter_double_buffer and (t.mode != "async" or r.placement != "non-colocated"):
        raise OrbitError(
            f"rollout.adapter_double_buffer=true needs an async, non-colocated run (got train.mode={t.mode}, "
            f"rollout.placement={r.placement})",
            "set train.mode=async rollout.placement=non-colocated, or adapter_double_buffer=false")
    if t.tensor_parallel < 1:
        raise OrbitError(f"train.tensor_parallel must be >= 1, got {t.tensor_parallel}", "use e.g. train.tensor_parallel=2")
    if t.tensor_parallel > 1 and t.backend != "megatron":
        raise OrbitError(f"train.tensor_parallel={t.tensor_parallel} needs train.backend=megatron",
                         "add train.backend=megatron, or use train.tensor_parallel=1")
    if t.tensor_parallel > 1 and (config.peft.dropout > 0 or t.orchestrator != "local"):
        raise OrbitError("train.tensor_parallel > 1 runs with peft.dropout=0 and train.orchestrator=local",
                         "set peft.dropout=0 train.orchestrator=local, or use train.tensor_parallel=1")
    if t.expert_parallel < 1:
        raise OrbitError(f"train.expert_parallel must be >= 1, got {t.expert_parallel}", "use e.g. train.expert_parallel=2")
    if t.expert_parallel > 1 and (t.backend != "megatron" or t.tensor_parallel > 1):
        raise OrbitError(f"train.expert_parallel={t.expert_parallel} needs train.backend=megatron at train.tensor_parallel=1",
                         "add train.backend=megatron train.tensor_parallel=1, or use train.expert_parallel=1")
    if t.expert_parallel > 1 and (config.peft.dropout > 0 or t.orchestrator != "local"):
        raise OrbitError("train.expert_parallel > 1 runs with peft.dropout=0 and train.orchestrator=local",
                         "set peft.dropout=0 train.orchestrator=local, or use train.expert_parallel=1")
    if t.backend == "megatron" and (t.activation_checkpointing != "none" or config.quant.fake_qat):
        raise OrbitError("train.backend=megatron does not build activation checkpointing or fake QAT yet",
                         "use train.activation_checkpointing=none quant.fake_qat=false, or train.backend=torch")
    if t.backend == "megatron" and t.compile == "on":
        raise OrbitError("train.compile=on compiles the torch trainer's layers; train.backend=megatron has its own",
                         "use train.compile=auto (or off) with train.backend=megatron")
    ray = t.orchestrator == "ray"
    if ray:
        _check_ray(config)
    elif r.num_engines != 1:
        raise OrbitError(f"rollout.num_engines={r.num_engines} needs train.orchestrator=ray",
                         "add train.orchestrator=ray, or use rollout.num_engines=1")
    if t.mode == "async" and r.placement != "non-colocated" and not ray:
        raise OrbitError("train.mode=async needs rollout.placement=non-colocated (a colocated engine is time-sliced "
                         "with the trainer, nothing overlaps)", "add rollout.placement=non-colocated")
    if t.mode == "async" and t.max_staleness < 1:
        raise OrbitError(f"train.max_staleness must be >= 1 in async mode, got {t.max_staleness}",
                         "use train.mode=sync for fully on-policy steps")
    if r.placement == "non-colocated" and config.quant.fake_qat:
        raise OrbitError("quant.fake_qat=true is not supported with rollout.placement=non-colocated",
                         "use rollout.placement=colocated for fake-QAT runs")
    if r.engine_threads < 0 or r.engine_timeout_s <= 0 or r.engine_start_timeout_s <= 0:
        raise OrbitError("rollout.engine_threads must be >= 0, rollout.engine_timeout_s and "
                         "rollout.engine_start_timeout_s > 0", "fix those rollout fields")
    if r.backend == "sglang":
        if not r.sglang_urls:
            raise OrbitError("rollout.backend=sglang needs running servers: launching SGLang is not built yet",
                             "start `python -m sglang.launch_server ... --enable-lora` or `orbit serve`, then set "
                             "rollout.sglang_urls=[http://host:port]")
        if config.peft.method != "lora":
            raise OrbitError("rollout.backend=sglang serves LoRA adapters only (SGLang has no OFT)",
                             "use peft.method=lora, or rollout.backend=builtin for OFT")
        if config.preflight.runtime and not config.preflight.skip_runtime:
            raise OrbitError("the runtime preflight needs the engine's top-k ids, which SGLang's /generate does not return "
                             "here", "set preflight.runtime=false with rollout.backend=sglang")
        if not ray and (t.mode != "sync" or r.placement != "colocated"):
            raise OrbitError("rollout.backend=sglang runs async only under Ray", "use train.mode=sync, or add "
                             "train.orchestrator=ray (the servers are already separate processes: leave "
                             "rollout.placement=colocated)")
    if config.rl.reward_workers < -1:
        raise OrbitError(f"rl.reward_workers must be -1 (one per core), 0 (threads) or a count, got {config.rl.reward_workers}",
                         "use rl.reward_workers=-1")
    if config.rl.use_kl_loss and config.rl.kl_coef <= 0:
        raise OrbitError("rl.use_kl_loss is on but rl.kl_coef is 0", "set rl.kl_coef > 0 or rl.use_kl_loss=false")


def _check_ray(config: RecipeConfig) -> None:
    r, ray = config.rollout, config.ray
    if r.num_engines < 1:
        raise OrbitError(f"rollout.num_engines must be >= 1, got {r.num_engines}", "use e.g. rollout.num_engines=2")
    if r.backend == "sglang" and r.num_engines not in (1, len(r.sglang_urls)):
        raise OrbitError(f"rollout.num_engines={r.num_engines} but {len(r.sglang_urls)} rollout.sglang_urls: with SGLang "
                         "there is one engine actor per server", "leave rollout.num_engines=1, or list one URL per engine")
    if r.adapter_double_buffer:
        raise OrbitError("rollout.adapter_double_buffer applies to the local engine process; a Ray engine actor loads "
                         "each adapter between two generate calls", "drop rollout.adapter_double_buffer with train.orchestrator=ray")
    if config.quant.fake_qat:
        raise OrbitError("quant.fake_qat=true is not supported with train.orchestrator=ray",
                         "use train.orchestrator=local rollout.placement=colocated for fake-QAT runs")
    if ray.trainer_cpus <= 0 or ray.engine_cpus <= 0 or ray.max_engine_restarts < 0 or ray.start_timeout_s <= 0:
        raise OrbitError("ray.trainer_cpus and ray.engine_cpus must be > 0, ray.max_engine_restarts >= 0 and "
                         "ray.start_timeout_s > 0", "fix those ray fields")
