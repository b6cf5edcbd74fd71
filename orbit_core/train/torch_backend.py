"""The ``torch`` trainer backend: native PyTorch, torch's AdamW over the adapter parameters only."""

from __future__ import annotations

import contextlib
import math
from typing import Any

import torch

from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.models.moe import moe_layers, moe_routing, stack_trace
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.base import adapter_disabled, adapter_parameters, adapter_state_dict, load_adapter_state_dict
from orbit_core.peft.oft import project_oft_
from orbit_core.peft.slots import engine_adapter_state
from orbit_core.peft.value_head import values_from_hidden
from orbit_core.rl.kl import kl_estimate, resolve_kl_type
from orbit_core.rl.logprobs import chunked_token_entropy, chunked_token_logprobs, token_entropy, token_logprobs
from orbit_core.rl.losses import aggregate, clipped_policy_loss, clipped_value_loss, gspo_policy_loss
from orbit_core.train.batch import RolloutBatch, micro_batch_rows
from orbit_core.train.schedule import lr_at


def routing_disagreement(trainer_choice: torch.Tensor, micro: RolloutBatch) -> tuple[int, int]:
    """(positions whose expert set differs in any MoE layer, positions compared), over each row's
    fed tokens. trainer_choice: [rows * seq, layers, k] from the trainer's own routing."""
    engine = micro.routing.long()
    rows, seq = engine.shape[:2]
    ours = trainer_choice.view(rows, seq, *engine.shape[2:]).sort(-1).values
    differs = (ours != engine.sort(-1).values).flatten(2).any(-1)
    fed = torch.arange(seq, device=engine.device)[None, :] < (torch.tensor(micro.lengths(), device=engine.device)[:, None] - 1)
    return int((differs & fed).sum()), int(fed.sum())


def adamw(params: list[torch.nn.Parameter], config: RecipeConfig) -> torch.optim.AdamW:
    """torch's AdamW, fused on CUDA (one kernel for every adapter tensor), foreach elsewhere."""
    t = config.train
    on_cuda = bool(params) and params[0].device.type == "cuda"
    return torch.optim.AdamW(params, lr=t.lr, betas=(t.adam_beta1, t.adam_beta2), weight_decay=t.weight_decay,
                             fused=on_cuda or None, foreach=None if on_cuda else True)


def compile_layers(setting: str, model: DecoderLM, device: torch.device, is_moe: bool) -> bool:
    """Whether ``train.compile`` compiles this model's training layers (``auto``: a dense model on CUDA)."""
    fake_quant = any(getattr(m, "fake_quant", None) is not None for m in model.modules())
    if setting == "on" and (is_moe or fake_quant):
        what = "an MoE model (data-dependent expert routing)" if is_moe else "fake-quantized adapters (QAT)"
        raise OrbitError(f"train.compile=on does not support {what}", "set train.compile to auto or off")
    if setting == "auto":
        return device.type == "cuda" and not is_moe and not fake_quant
    return setting == "on"


class TorchTrainer:
    def __init__(self, model: DecoderLM, config: RecipeConfig, teacher: DecoderLM | None = None):
        r = config.rollout
        self.model, self.teacher = model, teacher
        self.train_cfg, self.rl_cfg = config.train, config.rl
        self.temperature = r.temperature if r.temperature > 0 else 1.0
        updates_per_step = r.batch_size * r.n_samples_per_prompt // config.train.global_batch_size
        self.total_updates = max(config.train.steps * updates_per_step, 1)
        self.norm_length = r.max_new_tokens  # Dr. GRPO's constant normalizer
        self.kl_type = resolve_kl_type(config.rl.kl_type, as_loss=config.rl.use_kl_loss)
        self.device = next(model.parameters()).device
        self.params = adapter_parameters(model)
        self.optimizer = adamw(self.params, config)
        self.updates_done = 0
        self.has_value_head = hasattr(model, "value_head")
        self.parity_model = model
        model.activation_checkpointing = config.train.activation_checkpointing
        self.is_moe = bool(moe_layers(model))
        if compile_layers(config.train.compile, model, self.device, self.is_moe):
            model.compile_training_layers()
        self._routing_counts: tuple[int, int] | None = None

    # -- scoring (no grad) ----------------------------------------------------------------
    @torch.no_grad()
    def _forward_logprobs(self, batch: RolloutBatch, net: DecoderLM, reference: bool = False, with_values: bool = False,
                          ) -> tuple[torch.Tensor, torch.Tensor | None]:
        was_training = net.training
        net.eval()
        logprobs = torch.zeros_like(batch.response_mask)
        values = torch.zeros_like(batch.response_mask) if with_values else None
        measure = net is self.model and not reference and self.is_moe and batch.routing is not None
        differ = total = 0
        try:
            for index in self._micro_batches(batch):
                micro = batch.select(index).trimmed().to(self.device)
                inputs = micro.input_ids[:, :-1]
                with self._routing(micro, net) as traces:
                    if reference:
                        with adapter_disabled(net):
                            hidden = net(inputs, hidden_only=True)
                    else:
                        hidden = net(inputs, hidden_only=True)
                if measure:
                    d, n = routing_disagreement(stack_trace(traces), micro)
                    differ, total = differ + d, total + n
                if with_values:
                    values[index, : hidden.shape[1]] = values_from_hidden(net, hidden).cpu()
                part = chunked_token_logprobs(hidden, net.lm_head.weight, micro.input_ids[:, 1:], self.temperature)
                logprobs[index, : part.shape[1]] = part.cpu()
        finally:
            net.train(was_training)
        if measure:
            self._routing_counts = (differ, total)
        return logprobs, values

    def _routing(self, micro: RolloutBatch, net: DecoderLM | None = None):
        """Trace (and with ``rl.routing_replay``, replay the engine's) expert choices of an MoE forward."""
        if not self.is_moe or (net is not None and net is not self.model):
            return contextlib.nullcontext(None)
        replay = micro.routing if self.rl_cfg.routing_replay and micro.routing is not None else None
        return moe_routing(self.model, replay)

    def routing_mismatch(self) -> float | None:
        """Fraction of positions in the last ``score`` whose top-k expert set in some MoE layer differed
        from the engine's; None for a dense model or without recorded routing."""
        if self._routing_counts is None:
            return None
        differ, total = self._routing_counts
        self._routing_counts = None
        return differ / max(total, 1)

    def score(self, batch: RolloutBatch) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self._forward_logprobs(batch, self.model, with_values=self.has_value_head)

    def reference_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        return self._forward_logprobs(batch, self.model, reference=True)[0]

    def teacher_logprobs(self, batch: RolloutBatch) -> torch.Tensor:
        if self.teacher is None:
            raise OrbitError("teacher logprobs asked for but no teacher is loaded", "set rl.teacher_path")
        return self._forward_logprobs(batch, self.teacher)[0]

    def _micro_batches(self, batch: RolloutBatch) -> list[torch.Tensor]:
        return micro_batch_rows(batch, self.train_cfg.micro_batch_size, self.train_cfg.max_tokens_per_micro_batch)

    # -- updates --------------------------------------------------------------------------
    def _set_lr(self) -> float:
        t = self.train_cfg
        lr = lr_at(self.updates_done, self.total_updates, t.lr, t.lr_schedule, t.warmup_steps, t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def _micro_loss(self, micro: RolloutBatch) -> dict[str, torch.Tensor]:
        rl = self.rl_cfg
        with self._routing(micro):
            hidden = self.model(micro.input_ids[:, :-1], hidden_only=True)
        mask, targets, head = micro.response_mask, micro.input_ids[:, 1:], self.model.lm_head.weight
        if rl.entropy_coef:  # the entropy's gradient needs the full logits
            logits = self.model.lm_head(hidden)
            logprobs = token_logprobs(logits, targets, self.temperature)
            entropy = aggregate(token_entropy(logits, self.temperature), mask, rl.loss_agg, self.norm_length)
        else:  # no fp32 [batch, seq, vocab] tensor; the entropy is a metric only
            logprobs = chunked_token_logprobs(hidden, head, targets, self.temperature)
            entropy = aggregate(chunked_token_entropy(hidden.detach(), head, self.temperature), mask, rl.loss_agg,
                                self.norm_length)
        if rl.advantage_estimator == "gspo":
            pg_loss, clip_fraction = gspo_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, rl.eps_clip,
                                                      rl.eps_clip_high, rl.loss_agg, micro.tis_weights, self.norm_length)
        else:
            pg_loss, clip_fraction = clipped_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, rl.eps_clip,
                                                         rl.eps_clip_high, rl.loss_agg, micro.tis_weights, self.norm_length)
        parts = {"pg_loss": pg_loss, "clip_fraction": clip_fraction, "entropy": entropy}
        loss = pg_loss - rl.entropy_coef * entropy if rl.entropy_coef else pg_loss
        if micro.ref_logprobs is not None:
            kl = aggregate(kl_estimate(logprobs, micro.ref_logprobs, self.kl_type), mask, rl.loss_agg, self.norm_length)
            parts["kl"] = kl
            if rl.use_kl_loss:
                loss = loss + rl.kl_coef * kl
        if self.has_value_head and micro.returns is not None:
            values = values_from_hidden(self.model, hidden)
            value_loss, value_clip_fraction = clipped_value_loss(values, micro.old_values, micro.returns, mask, rl.value_clip,
                                                                 rl.loss_agg, self.norm_length)
            parts.update(value_loss=value_loss, value_clip_fraction=value_clip_fraction)
            loss = loss + rl.value_loss_coef * value_loss
        parts["loss"] = loss
        return parts

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One optimizer step over ``batch`` (= one global batch), in micro-batches.

        A non-finite loss or gradient norm skips the step (gradients dropped, adapter and
        optimizer untouched) and reports ``update_skipped=1``.
        """
        t = self.train_cfg
        self.model.train()
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        # each micro-batch weighs its share of the global normalizer: tokens for token-mean, else sequences
        by_tokens = self.rl_cfg.loss_agg == "token-mean"
        total = float(batch.response_mask.sum().clamp(min=1.0)) if by_tokens else float(len(batch))
        sums: dict[str, float] = {}
        for index in self._micro_batches(batch):
            micro = batch.select(index).trimmed().to(self.device)
            weight = (float(micro.response_mask.sum()) if by_tokens else float(len(micro))) / total
            parts = self._micro_loss(micro)
            (parts["loss"] * weight).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight
        grad_norm = self._clip_grads(t.grad_clip if t.grad_clip > 0 else float("inf"))
        if not (math.isfinite(sums["loss"]) and math.isfinite(grad_norm)):
            self.optimizer.zero_grad(set_to_none=True)
            return {**sums, "grad_norm": grad_norm, "lr": lr, "update_skipped": 1.0}
        self.optimizer.step()
        project_oft_(self.model)
        self.updates_done += 1
        return {**sums, "grad_norm": grad_norm, "lr": lr, "update_skipped": 0.0}

    def close(self) -> None:
        """Nothing to release: the model lives in this process."""

    def _clip_grads(self, max_norm: float) -> float:
        """Clip the adapter's gradients to ``max_norm`` in total; returns their norm before clipping."""
        return float(torch.nn.utils.clip_grad_norm_(self.params, max_norm))

    # -- state ----------------------------------------------------------------------------
    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model)

    def engine_adapter_state(self) -> dict[str, torch.Tensor]:
        return engine_adapter_state(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "updates_done": self.updates_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        try:
            self.optimizer.load_state_dict(state["optimizer"])
        except (KeyError, ValueError, TypeError) as err:
            raise OrbitError(f"the checkpoint's optimizer state does not fit this trainer ({type(err).__name__}: {err})",
                             "it was written by an older Orbit or another adapter; start a new run") from err
        self.updates_done = int(state["updates_done"])

    def load_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None:
        load_adapter_state_dict(self.model, adapter, source)
