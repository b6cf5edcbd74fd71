"""The one RL loop: rollout -> reward -> advantages -> minibatch updates -> log / eval / checkpoint."""

from __future__ import annotations

import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from orbit_core import __version__
from orbit_core.config.loader import to_dict, to_yaml
from orbit_core.config.schema import RecipeConfig
from orbit_core.data.prompts import encode_prompt, use_chat_template
from orbit_core.errors import OrbitError
from orbit_core.eval.evaluate import EvalReport, evaluate
from orbit_core.preflight.runtime import runtime_parity
from orbit_core.rl.estimators import compute_advantages, needs_reference
from orbit_core.rl.losses import truncated_importance_weights
from orbit_core.rollout.adapter_payload import full_weight_bytes
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams
from orbit_core.train.batch import build_batch
from orbit_core.train.checkpoint import latest_checkpoint, load_checkpoint, save_checkpoint
from orbit_core.train.metrics import MetricsLogger, write_rollouts
from orbit_core.train.rollout_driver import ColocatedRollouts, RoundSpec
from orbit_core.train.remote_setup import start_remote_rollouts
from orbit_core.train.setup import build_policy, build_rewards, check_adapter_fits, eval_records, load_records, load_teacher
from orbit_core.train.torch_backend import TorchTrainer


@dataclass
class Callbacks:
    """How the caller (the CLI) watches a run; the library never prints progress itself."""

    on_message: Callable[[str], None] = print
    on_start: Callable[[int, int], None] = lambda start, total: None
    on_step: Callable[[dict[str, Any]], None] = lambda metrics: None
    on_eval: Callable[[int, EvalReport], None] = lambda step, report: None
    on_engine_start: Callable[[dict[str, Any]], None] = lambda info: None
    """A non-colocated engine process is up: its pid, device and threads."""


@dataclass
class RunResult:
    output_dir: str
    steps_done: int
    eval_before: EvalReport | None = None
    eval_after: EvalReport | None = None
    last_checkpoint: str | None = None
    metrics: list[dict[str, Any]] = field(default_factory=list)


class PromptSampler:
    """Shuffled passes over the prompts; its position is part of the checkpoint."""

    def __init__(self, size: int, seed: int, shuffle: bool):
        self.size, self.seed, self.shuffle = size, seed, shuffle
        self.epoch, self.cursor = 0, 0
        self._order = self._make_order()

    def _make_order(self) -> list[int]:
        order = list(range(self.size))
        if self.shuffle:
            random.Random(self.seed + self.epoch).shuffle(order)
        return order

    def take(self, count: int) -> list[int]:
        picked = []
        while len(picked) < count:
            if self.cursor >= self.size:
                self.epoch, self.cursor = self.epoch + 1, 0
                self._order = self._make_order()
            picked.append(self._order[self.cursor])
            self.cursor += 1
        return picked

    def state(self) -> dict[str, int]:
        return {"epoch": self.epoch, "cursor": self.cursor}

    def restore(self, state: dict[str, int]) -> None:
        self.epoch, self.cursor = int(state["epoch"]), int(state["cursor"])
        self._order = self._make_order()


def _resume_path(config: RecipeConfig) -> Path | None:
    resume = config.train.resume
    if resume == "never":
        return None
    if resume == "auto":
        return latest_checkpoint(config.train.output_dir)
    path = Path(resume)
    if not path.is_dir():
        raise OrbitError(f"train.resume={resume}: no such checkpoint directory", "use auto, never or a step_* directory")
    return path


def _runtime_preflight(config: RecipeConfig, parity_engine, model, tokenizer, records, chat, cb: Callbacks) -> dict[str, Any]:
    """Step-0 engine-vs-trainer logprob parity, against the engine that will generate the rollouts."""
    pf = config.preflight
    if not pf.runtime or pf.skip_runtime:
        return {}
    prompts = [encode_prompt(tokenizer, rec.prompt, chat, config.data.max_prompt_len) for rec in records[: pf.num_prompts]]
    report = runtime_parity(parity_engine, model, tokenizer, prompts, pf.max_new_tokens, pf.topk, pf.max_logprob_abs_diff,
                            pf.min_topk_agreement, config.rollout.temperature or 1.0)
    cb.on_message(f"runtime preflight: max |logprob diff| {report.max_abs_diff:.2e}, top-{pf.topk} agreement "
                  f"{report.topk_agreement:.3f} over {report.tokens} tokens")
    if not report.passed:
        raise OrbitError(
            f"runtime preflight failed: max |logprob diff| {report.max_abs_diff:.3g} (gate {pf.max_logprob_abs_diff}), "
            f"top-{pf.topk} agreement {report.topk_agreement:.3f} (gate {pf.min_topk_agreement})",
            "run `orbit preflight` for the worst tokens, or set preflight.skip_runtime=true for a smoke run")
    return {"preflight/max_logprob_abs_diff": report.max_abs_diff, "preflight/mean_logprob_abs_diff": report.mean_abs_diff,
            "preflight/topk_agreement": report.topk_agreement}


def run_training(config: RecipeConfig, callbacks: Callbacks | None = None) -> RunResult:
    cb = callbacks or Callbacks()
    t, r, rl = config.train, config.rollout, config.rl
    torch.manual_seed(t.seed)
    out = Path(t.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "config.yaml").write_text(to_yaml(config))

    records = load_records(config.data.train_path, config.data)
    test_records = eval_records(config.eval, config.data)
    rewards = build_rewards(rl)
    check_adapter_fits(config.model, config.peft)
    policy = build_policy(config.model, config.peft, cb.on_message, value_head=rl.value_head,
                          fake_qat=config.quant.fake_qat)
    model, tokenizer = policy.model, policy.tokenizer
    teacher = None
    if rl.advantage_estimator == "on_policy_distillation":
        teacher = load_teacher(rl.teacher_path, config.model.dtype, policy.device, model.config.vocab_size, cb.on_message)
    chat = use_chat_template(tokenizer, config.data.apply_chat_template)
    engine = BuiltinEngine(model, tokenizer, max_running=r.max_running, seed=t.seed)
    samples_per_step = r.batch_size * r.n_samples_per_prompt
    updates_per_step = samples_per_step // t.global_batch_size
    trainer = TorchTrainer(model, t, rl, r.temperature if r.temperature > 0 else 1.0, t.steps * updates_per_step,
                           r.max_new_tokens)
    sampler = PromptSampler(len(records), t.seed, config.data.shuffle)
    shuffle_rng = random.Random(t.seed)
    adapter_config = {"peft": to_dict(config)["peft"], "base_model": policy.base_path, "target_layers": policy.adapter_targets,
                      "orbit_version": __version__, "recipe": to_dict(config)}

    start_step = 0
    resume_from = _resume_path(config)
    if resume_from is not None:
        state = load_checkpoint(resume_from)
        trainer.load_adapter(state["adapter"], str(resume_from))
        trainer.load_state_dict(state["optimizer"])
        sampler.restore(state["trainer_state"]["data"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        engine.generator.set_state(rng["engine"])
        shuffle_rng.setstate(rng["shuffle"])
        start_step = int(state["trainer_state"]["step"])
        cb.on_message(f"resumed from {resume_from} (step {start_step})")

    stop = tuple(r.stop)
    params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, stop, r.n_samples_per_prompt)
    round_spec = RoundSpec(rewards, lambda n: [records[i] for i in sampler.take(n)],
                           lambda rec: encode_prompt(tokenizer, rec.prompt, chat, config.data.max_prompt_len),
                           params, r.batch_size, rl.filter_zero_signal_groups, rl.dynamic_sampling_max_rounds, sampler.state)
    threads = torch.get_num_threads()
    if r.placement == "non-colocated":
        source = start_remote_rollouts(config, policy, round_spec, start_step, cb.on_message)
        parity_engine = source.engine
        cb.on_engine_start(dict(source.engine.info))
    else:
        source = ColocatedRollouts(engine, round_spec)
        parity_engine = engine
    try:
        preflight_metrics = _runtime_preflight(config, parity_engine, model, tokenizer, records, chat, cb)
    except BaseException:
        source.close()
        torch.set_num_threads(threads)
        raise

    logger = MetricsLogger(t.output_dir, t.wandb, t.wandb_project, to_dict(config), resume_step=start_step)
    result = RunResult(output_dir=str(out), steps_done=start_step)
    if preflight_metrics:
        logger.log({"step": start_step, **preflight_metrics})
    full_bytes = full_weight_bytes(model, next(model.parameters()).dtype)
    saved_step = start_step

    def run_eval(step: int) -> EvalReport:
        e = config.eval
        report = evaluate(engine, tokenizer, test_records, rewards, chat=chat, max_prompt_len=config.data.max_prompt_len,
                          max_new_tokens=e.max_new_tokens, n_samples=e.n_samples, ks=e.k, temperature=e.temperature, stop=stop)
        engine.release()
        logger.log({"step": step, "eval/greedy_accuracy": report.greedy_accuracy,
                    **{f"eval/{k}": v for k, v in report.pass_at_k.items()}})
        cb.on_eval(step, report)
        return report

    def save(step: int) -> str:
        nonlocal saved_step
        rng_state = {"torch": torch.get_rng_state(), "engine": engine.generator.get_state(), "shuffle": shuffle_rng.getstate()}
        path = save_checkpoint(t.output_dir, step, trainer.adapter_state(), adapter_config, trainer.state_dict(), rng_state,
                               {"data": source.data_state(step), "orbit_version": __version__}, t.keep_last)
        result.last_checkpoint, saved_step = str(path), step
        return str(path)

    def train_on(step: int, rollouts) -> dict[str, Any]:
        completions = [c for g in rollouts.groups for c in g.completions]
        scores = torch.tensor([s for g in rollouts.groups for s in g.scores])
        batch = build_batch(completions, scores, tokenizer.pad_token_id or 0)
        stats: dict[str, Any] = {}
        if t.mode == "async":
            # Importance ratios against the behaviour policy: the logprobs recorded at sampling.
            batch.old_logprobs = batch.rollout_logprobs
            if trainer.has_value_head:
                batch.old_values = trainer.score(batch)[1]
        else:
            batch.old_logprobs, batch.old_values = trainer.score(batch)
            stats["rollout/trainer_logprob_abs_diff_max"] = (
                (batch.old_logprobs - batch.rollout_logprobs).abs() * batch.response_mask).max().item()
        if needs_reference(rl):
            batch.ref_logprobs = trainer.logprobs(batch, reference=True)
        if teacher is not None:
            batch.teacher_logprobs = trainer.score(batch, model=teacher)[0]
        batch.advantages, batch.returns = compute_advantages(
            rl, scores, batch.response_mask, r.n_samples_per_prompt, batch.old_logprobs, batch.ref_logprobs,
            batch.old_values, batch.teacher_logprobs)
        if rl.tis_cap > 0:
            batch.tis_weights, truncated = truncated_importance_weights(
                batch.old_logprobs, batch.rollout_logprobs, batch.response_mask, rl.tis_cap)
            stats["rollout/tis_truncated_fraction"] = float(truncated)
        order = list(range(len(batch)))
        shuffle_rng.shuffle(order)
        update_stats = []
        for u in range(updates_per_step):
            index = torch.tensor(order[u * t.global_batch_size : (u + 1) * t.global_batch_size])
            update_stats.append(trainer.update(batch.select(index)))
        response_tokens = float(batch.response_mask.sum())
        return {
            "reward/mean": float(scores.mean()),
            "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
            **{k: sum(s.get(k, 0.0) for s in update_stats) / len(update_stats) for k in update_stats[0]},
            "response_len/mean": response_tokens / len(batch),
            "response_tokens": response_tokens,
            **stats,
        }

    try:
        if test_records is not None and config.eval.before_train and start_step == 0:
            result.eval_before = run_eval(0)
        cb.on_start(start_step, t.steps)
        source.begin(start_step)
        busy_before = source.engine_counters()
        for step in range(start_step + 1, t.steps + 1):
            step_start = time.perf_counter()
            rollouts = source.collect(step)
            if t.save_rollouts:
                write_rollouts(out / "rollouts" / f"step_{step:06d}.jsonl", step, rollouts.groups)
            train_start = time.perf_counter()
            metrics: dict[str, Any] = {"step": step, **train_on(step, rollouts)}
            sync_start = time.perf_counter()
            metrics.update(source.publish(step))
            end = time.perf_counter()
            busy_now = source.engine_counters()
            reward_s = rollouts.reward_s
            response_tokens = metrics.pop("response_tokens")
            if busy_now is None:
                rollout_s, generated = rollouts.extra["rollout_s"], response_tokens
            else:  # the engine works ahead: count what it did during this step, not the batch it handed over
                rollout_s = busy_now.busy_s - busy_before.busy_s
                reward_s += busy_now.reward_s - busy_before.reward_s
                generated = busy_now.tokens - busy_before.tokens
            busy_before = busy_now
            step_s = end - step_start
            idle_s = rollouts.extra["idle_s"]
            staleness = rollouts.extra["staleness"]
            samples = sum(staleness.values())
            metrics.update({
                "reward/errors": rollouts.reward_errors,
                "reward/timeouts": rollouts.reward_timeouts,
                "rollout/sampling_rounds": rollouts.rounds,
                "rollout/groups_filtered": rollouts.groups_filtered,
                "time/step_s": step_s,
                "time/rollout_s": rollout_s,
                "time/reward_s": reward_s,
                "time/train_s": sync_start - train_start,
                "time/sync_s": end - sync_start,
                "time/idle_s": idle_s,
                "time/bubble_fraction": idle_s / step_s,
                "sync/full_weight_bytes": full_bytes,
                "staleness/mean": sum(k * n for k, n in staleness.items()) / max(samples, 1),
                "staleness/max": max(staleness),
                **{f"staleness/count_{k}": staleness.get(k, 0) for k in range(max(staleness) + 1)},
            })
            if rollout_s > 0:  # an async engine with nothing left to generate has no throughput to report
                metrics["tokens_per_s"] = generated / rollout_s
            if busy_now is not None:
                metrics["time/engine_idle_fraction"] = max(0.0, 1.0 - rollout_s / step_s)
            if rollouts.last_error:
                metrics["reward/last_error"] = rollouts.last_error
            logger.log(metrics)
            result.metrics.append(metrics)
            result.steps_done = step
            cb.on_step(metrics)
            if test_records is not None and config.eval.enabled and t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
                run_eval(step)
            if step == t.steps or (t.save_interval and step % t.save_interval == 0):
                save(step)
        if test_records is not None and start_step < t.steps:
            result.eval_after = run_eval(t.steps)
    except OrbitError:
        # An engine crash or a failed sync: keep the last completed step (if sane) before stopping.
        if result.steps_done > saved_step and all(torch.isfinite(v).all() for v in trainer.adapter_state().values()):
            cb.on_message(f"saved {save(result.steps_done)} before stopping")
        raise
    finally:
        source.close()
        torch.set_num_threads(threads)
        logger.close()
    return result
