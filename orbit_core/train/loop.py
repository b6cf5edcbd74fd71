"""The one RL loop, read top to bottom: setup, then each step (rollout -> reward -> advantages ->
updates -> sync -> log / eval / save), then cleanup.

The loop sees a trainer only through ``TrainerBackend`` and the engine only through
``RolloutSource`` (``train/backends.py``); ``train.backend`` and ``rollout.backend`` pick them.
"""

from __future__ import annotations

import json
import random
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from orbit_core import __version__
from orbit_core.config.loader import to_dict, to_yaml
from orbit_core.config.schema import RecipeConfig
from orbit_core.data.jsonl import load_records
from orbit_core.data.prompts import check_labels, encode_records, use_chat_template
from orbit_core.data.sampler import PromptSampler
from orbit_core.errors import OrbitError
from orbit_core.eval.evaluate import EvalReport, evaluate
from orbit_core.models.moe import set_dequant_chunk, take_dequant_count
from orbit_core.policy.build import build_policy, check_adapter_fits, check_device, load_teacher
from orbit_core.preflight.runtime import runtime_parity
from orbit_core.rl.reward_pool import build_rewards
from orbit_core.rollout.adapter_payload import full_weight_bytes
from orbit_core.rollout.engine import BuiltinEngine
from orbit_core.rollout.types import SamplingParams
from orbit_core.train.backends import build_rollouts, build_trainer
from orbit_core.train.batch import build_batch
from orbit_core.train.checkpoint import save_checkpoint
from orbit_core.train.metrics import MetricsLogger, write_rollouts
from orbit_core.train.prepare import prepare_batch, split_updates
from orbit_core.train.rollout_driver import RoundSpec
from orbit_core.train.run_dir import EVAL_REPORT, plan_resume
from orbit_core.train.step_metrics import StepTimes, average_updates, step_row


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
    already_complete: bool = False
    """The run had finished before this call: nothing was trained, the results are the saved ones."""


class TrainingRun:
    def __init__(self, config: RecipeConfig, callbacks: Callbacks | None = None):
        self.config = config
        self.cb = callbacks or Callbacks()
        self.out = Path(config.train.output_dir)
        self.result = RunResult(output_dir=str(self.out), steps_done=0)
        self.rewards = self.rollouts = self.logger = self.trainer = self.plan = None
        self.threads = torch.get_num_threads()
        self.saved_step = 0

    # -- setup ----------------------------------------------------------------------------
    def setup(self) -> bool:
        """Build everything; False when the run was already complete (its saved results are in ``result``)."""
        torch.manual_seed(self.config.train.seed)
        self.plan = plan_resume(self.config, self.cb.on_message)
        if self._already_complete():
            return False
        for change in self.plan.changes:
            self.cb.on_message(f"resume: {change}")
        self._load_data()
        self._build_policy_and_trainer()
        self._start_rollouts()
        self._open_run_dir(self._runtime_preflight())
        return True

    def _load_data(self) -> None:
        c = self.config
        self.records = load_records(c.data.train_path, c.data)
        self.test_records = load_records(c.eval.test_path, c.data) if c.eval.enabled else None
        for what, records in (("train data", self.records), ("eval data", self.test_records or [])):
            check_labels(records, c.rl.reward, c.data.label_key, what)
        check_adapter_fits(c.model, c.peft)
        if c.train.orchestrator == "local":  # devices named here, before anything loads (Ray's are its actors')
            engine = c.rollout.engine_device if c.rollout.placement == "non-colocated" else "auto"
            for name, spec in (("model.device", c.model.device), ("rollout.engine_device", engine)):
                if spec != "auto":
                    check_device(spec, name)
        self.rewards = build_rewards(c.rl)  # worker processes start while the model loads

    def _build_policy_and_trainer(self) -> None:
        c, rl = self.config, self.config.rl
        self.policy = build_policy(c.model, c.peft, self.cb.on_message, value_head=rl.value_head, fake_qat=c.quant.fake_qat)
        set_dequant_chunk(self.policy.model, c.moe.dequant_chunk_experts, c.moe.grouped_gemm)
        self.tokenizer = self.policy.tokenizer
        self.chat = use_chat_template(self.tokenizer, c.data.apply_chat_template)
        self.prompts = encode_records(self.tokenizer, self.records, self.chat, c.data, "train data")
        test_prompts = encode_records(self.tokenizer, self.test_records or [], self.chat, c.data, "eval data")
        for what, encoded in (("train data", self.prompts), ("eval data", test_prompts)):
            if encoded.truncated or encoded.unknown:
                self.cb.on_message(encoded.summary(what, c.data.max_prompt_len))
        teacher = None
        if rl.advantage_estimator == "on_policy_distillation":
            teacher = load_teacher(rl.teacher_path, c.model.dtype, self.policy.device, self.policy.model.config.vocab_size,
                                   self.cb.on_message)
        self.trainer = build_trainer(c, self.policy, teacher)
        self.engine = BuiltinEngine(self.policy.model, self.tokenizer, max_running=c.rollout.max_running, seed=c.train.seed,
                                    cuda_graph=c.rollout.cuda_graph)
        self.sampler = PromptSampler(len(self.records), c.train.seed, c.data.shuffle)
        self.shuffle_rng = random.Random(c.train.seed)
        if self.plan.state is not None:
            self._restore(self.plan.state)

    def _start_rollouts(self) -> None:
        c = self.config
        if c.train.mode == "async" and c.rl.tis_cap == 0:
            self.cb.on_message("train.mode=async with rl.tis_cap=0: stale samples are clipped against the trainer's "
                               "recompute but not reweighted; set rl.tis_cap (e.g. 2.0) to correct them")
        self.rollouts = build_rollouts(c, self.policy, self.engine, self._round_spec(), self.start_step, self.cb.on_message)
        if self.rollouts.engine_info():
            self.cb.on_engine_start(self.rollouts.engine_info())

    def _open_run_dir(self, preflight: dict[str, Any]) -> None:
        """The run really starts here: only now is anything in the run directory written."""
        c, t = self.config, self.config.train
        self.out.mkdir(parents=True, exist_ok=True)
        (self.out / "config.yaml").write_text(to_yaml(c))
        self.logger = MetricsLogger(t.output_dir, t.wandb, t.wandb_project, to_dict(c), resume_step=self.start_step,
                                    log=self.cb.on_message)
        self.logger.log({"step": self.start_step, "data/prompts": self.prompts.total,
                         "data/truncated_prompts": self.prompts.truncated,
                         "data/unknown_char_prompts": self.prompts.unknown, **preflight})
        self.full_bytes = full_weight_bytes(self.policy.model, next(self.policy.model.parameters()).dtype)
        self.result.steps_done = self.saved_step = self.start_step
        if self.plan.state is not None:
            self.result.last_checkpoint = self.plan.state["path"]
        saved = self.plan.saved_report or {}
        if saved.get("before"):
            self.result.eval_before = EvalReport.from_dict(saved["before"])

    def _already_complete(self) -> bool:
        """Trained to ``train.steps`` and, when eval is on, evaluated (a run stopped during its final
        eval is not complete: ``run`` redoes that eval)."""
        state, report = self.plan.state, self.plan.saved_report or {}
        if state is None or self.plan.start_step < self.config.train.steps:
            return False
        if self.config.eval.enabled and not report.get("after"):
            return False
        self.result = RunResult(str(self.out), self.plan.start_step, last_checkpoint=state["path"], already_complete=True,
                                eval_before=EvalReport.from_dict(report["before"]) if report.get("before") else None,
                                eval_after=EvalReport.from_dict(report["after"]) if report.get("after") else None)
        self.cb.on_message(f"{self.out} is already complete at step {self.plan.start_step}: showing its saved results "
                           "(raise train.steps to continue it, or use train.overwrite=true to start over)")
        return True

    @property
    def start_step(self) -> int:
        return self.plan.start_step

    def _restore(self, state: dict[str, Any]) -> None:
        self.trainer.load_adapter(state["adapter"], state["path"])
        self.trainer.load_state_dict(state["optimizer"])
        self.sampler.restore(state["trainer_state"]["data"])
        rng = state["rng"]
        torch.set_rng_state(rng["torch"])
        self.engine.generator.set_state(rng["engine"])
        self.shuffle_rng.setstate(rng["shuffle"])
        self.cb.on_message(f"resumed from {state['path']} (step {self.start_step})")

    def _round_spec(self) -> RoundSpec:
        r, rl = self.config.rollout, self.config.rl
        params = SamplingParams(r.max_new_tokens, r.temperature, r.top_p, r.top_k, tuple(r.stop), r.n_samples_per_prompt)
        return RoundSpec(self.rewards, lambda n: [self.records[i] for i in self.sampler.take(n)],
                         lambda record: self.prompts.ids[record.line], params, r.batch_size, rl.filter_zero_signal_groups,
                         rl.dynamic_sampling_max_rounds, self.sampler.state)

    def _runtime_preflight(self) -> dict[str, Any]:
        """Step-0 engine-vs-trainer logprob parity, against the engine that will generate the rollouts."""
        pf = self.config.preflight
        if not pf.runtime or pf.skip_runtime:
            return {}
        prompts = [self.prompts.ids[rec.line] for rec in self.records[: pf.num_prompts]]
        report = runtime_parity(self.rollouts.parity_engine, self.trainer.parity_model, self.tokenizer, prompts,
                                pf.max_new_tokens, pf.topk, pf.max_logprob_abs_diff, pf.min_topk_agreement,
                                self.config.rollout.temperature or 1.0, pf.max_logprob_mean_abs_diff)
        names = f"{report.engine} vs {report.trainer}"
        self.cb.on_message(f"runtime preflight ({names}): max |logprob diff| {report.max_abs_diff:.2e}, mean "
                           f"{report.mean_abs_diff:.2e}, top-{pf.topk} agreement {report.topk_agreement:.3f} over "
                           f"{report.tokens} tokens")
        if not report.passed:
            worst = "; ".join(f"prompt {r.prompt_index} token {r.position} {r.token!r}: engine {r.engine_logprob:.3f} "
                              f"trainer {r.trainer_logprob:.3f}" for r in report.worst[:3])
            raise OrbitError(
                f"runtime preflight ({names}) failed: mean |logprob diff| {report.mean_abs_diff:.3g} (gate "
                f"{pf.max_logprob_mean_abs_diff}), max {report.max_abs_diff:.3g} (gate "
                f"{pf.max_logprob_abs_diff}), top-{pf.topk} agreement {report.topk_agreement:.3f} (gate "
                f"{pf.min_topk_agreement}); worst: {worst}",
                "run `orbit preflight` for the worst tokens; where the gap is rounding (bf16 activations differ by a "
                "few hundredths at most), raise the gate it failed; preflight.skip_runtime=true makes a smoke run")
        return {"preflight/implementations": names, "preflight/max_logprob_abs_diff": report.max_abs_diff,
                "preflight/mean_logprob_abs_diff": report.mean_abs_diff,
                "preflight/topk_agreement": report.topk_agreement}

    # -- the steps ------------------------------------------------------------------------
    def run(self) -> RunResult:
        t, e = self.config.train, self.config.eval
        if self.test_records is not None and e.before_train and self.start_step == 0:
            self.result.eval_before = self.evaluate(0)
        self.cb.on_start(self.start_step, t.steps)
        self.rollouts.begin(self.start_step)
        self.counters = self.rollouts.engine_counters()
        for step in range(self.start_step + 1, t.steps + 1):
            row = self.train_step(step)
            self.logger.log(row)
            self.result.metrics.append(row)
            self.result.steps_done = step
            self.cb.on_step(row)
            if self.test_records is not None and t.eval_interval and step % t.eval_interval == 0 and step != t.steps:
                self.evaluate(step)
            if step == t.steps or (t.save_interval and step % t.save_interval == 0):
                self.save(step)
        if self.test_records is not None:
            self.result.eval_after = self.evaluate(t.steps)
        self._write_report()
        return self.result

    def train_step(self, step: int) -> dict[str, Any]:
        start = time.perf_counter()
        rollouts = self.rollouts.collect(step)
        if self.config.train.save_rollouts:
            write_rollouts(self.out / "rollouts" / f"step_{step:06d}.jsonl", step, rollouts.groups)
        train_start = time.perf_counter()
        train_stats = self.update(step, rollouts)
        sync_start = time.perf_counter()
        sync_stats = self.rollouts.publish(step, self.trainer.engine_adapter_state())
        times = StepTimes(start, train_start, sync_start, time.perf_counter())
        counters = self.rollouts.engine_counters()
        row = step_row(step, rollouts, train_stats, sync_stats, times, self.counters, counters, self.full_bytes)
        dequantized = take_dequant_count(self.policy.model)
        if dequantized is not None:  # this process's engine and trainer (not a separate engine's)
            row["moe/experts_dequantized"] = dequantized
        self.counters = counters
        return row

    def update(self, step: int, rollouts) -> dict[str, Any]:
        t, rl = self.config.train, self.config.rl
        completions = [c for g in rollouts.groups for c in g.completions]
        scores = torch.tensor([s for g in rollouts.groups for s in g.scores])
        batch = build_batch(completions, scores, self.tokenizer.pad_token_id or 0)
        stats = prepare_batch(batch, self.trainer, rl, self.config.rollout.n_samples_per_prompt,
                              with_teacher=rl.advantage_estimator == "on_policy_distillation")
        order = list(range(len(batch)))
        self.shuffle_rng.shuffle(order)
        updates = [self.trainer.update(batch.select(index)) for index in split_updates(len(batch), t.global_batch_size, order)]
        row = average_updates(updates)
        if row["train/skipped_updates"]:
            self.cb.on_message(f"step {step}: skipped {row['train/skipped_updates']} of {len(updates)} updates "
                               "(non-finite loss or gradient); the adapter kept its previous values")
        response_tokens = float(batch.response_mask.sum())
        return {"reward/mean": float(scores.mean()), "reward/std": float(scores.std()) if len(scores) > 1 else 0.0,
                **row, "response_len/mean": response_tokens / len(batch), "response_tokens": response_tokens, **stats}

    def evaluate(self, step: int) -> EvalReport:
        c, e = self.config, self.config.eval
        report = evaluate(self.engine, self.tokenizer, self.test_records, self.rewards, chat=self.chat,
                          max_prompt_len=c.data.max_prompt_len, max_new_tokens=e.max_new_tokens, n_samples=e.n_samples,
                          ks=e.k, temperature=e.temperature, stop=tuple(c.rollout.stop))
        self.engine.release()
        self.logger.log({"step": step, "eval/greedy_accuracy": report.greedy_accuracy,
                         **{f"eval/{k}": v for k, v in report.pass_at_k.items()}})
        self.cb.on_eval(step, report)
        return report

    # -- saving and cleanup ---------------------------------------------------------------
    def save(self, step: int) -> str:
        c = self.config
        rng = {"torch": torch.get_rng_state(), "engine": self.engine.generator.get_state(),
               "shuffle": self.shuffle_rng.getstate()}
        adapter_config = {"peft": to_dict(c)["peft"], "base_model": self.policy.base_path,
                          "target_layers": self.policy.adapter_targets, "orbit_version": __version__, "recipe": to_dict(c)}
        path = save_checkpoint(c.train.output_dir, step, self.trainer.adapter_state(), adapter_config,
                               self.trainer.state_dict(), rng, {"data": self.rollouts.data_state(step),
                                                                "orbit_version": __version__}, c.train.keep_last)
        self.result.last_checkpoint, self.saved_step = str(path), step
        return str(path)

    def save_before_stopping(self) -> None:
        """An engine crash or a failed sync: keep the last completed step (if it is sane) before stopping."""
        if self.logger is None or self.result.steps_done <= self.saved_step:
            return
        try:
            self.cb.on_message(f"saved {self.save(self.result.steps_done)} before stopping")
        except OrbitError as err:
            self.cb.on_message(f"could not save step {self.result.steps_done}: {err.problem}")

    def _write_report(self) -> None:
        r = self.result
        report = {"before": r.eval_before.to_dict() if r.eval_before else None,
                  "after": r.eval_after.to_dict() if r.eval_after else None,
                  "steps": r.steps_done, "last_checkpoint": r.last_checkpoint}
        tmp = self.out / f".{EVAL_REPORT}.tmp"
        tmp.write_text(json.dumps(report, indent=2))
        tmp.replace(self.out / EVAL_REPORT)

    def close(self) -> None:
        for part in (self.rollouts, self.rewards, self.logger, self.trainer):
            if part is not None:
                part.close()
        torch.set_num_threads(self.threads)
        if self.plan is not None and self.plan.lock is not None:  # last: the run's files are all written
            self.plan.lock.release()


def run_training(config: RecipeConfig, callbacks: Callbacks | None = None) -> RunResult:
    """Train to ``config``: here, or as Ray actors with ``train.orchestrator=ray``."""
    if config.train.orchestrator == "ray":
        from orbit_core.train.ray_run import run_on_ray

        return run_on_ray(config, callbacks or Callbacks())
    return run_here(config, callbacks)


def run_here(config: RecipeConfig, callbacks: Callbacks | None = None) -> RunResult:
    run = TrainingRun(config, callbacks)
    try:
        if not run.setup():
            return run.result
        return run.run()
    except OrbitError:
        run.save_before_stopping()
        raise
    finally:
        run.close()
