"""The ``torch`` trainer backend: native PyTorch, AdamW over adapter parameters only."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from orbit_core.config.schema import RLSection, TrainSection
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.base import adapter_disabled, adapter_parameters, adapter_state_dict, load_adapter_state_dict
from orbit_core.peft.oft import project_oft_
from orbit_core.peft.value_head import values_from_hidden
from orbit_core.rl.kl import kl_estimate
from orbit_core.rl.logprobs import token_entropy, token_logprobs
from orbit_core.rl.losses import aggregate, clipped_policy_loss, clipped_value_loss, gspo_policy_loss
from orbit_core.train.batch import RolloutBatch
from orbit_core.train.optim import AdapterAdamW
from orbit_core.train.schedule import lr_at


class TrainerBackend(Protocol):
    def logprobs(self, batch: RolloutBatch, *, reference: bool = False) -> torch.Tensor: ...
    def update(self, batch: RolloutBatch) -> dict[str, float]: ...
    def adapter_state(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchTrainer:
    def __init__(self, model: DecoderLM, train_cfg: TrainSection, rl_cfg: RLSection, temperature: float,
                 total_updates: int, max_new_tokens: int):
        self.model = model
        self.train_cfg, self.rl_cfg = train_cfg, rl_cfg
        self.temperature = temperature
        self.total_updates = max(total_updates, 1)
        self.norm_length = max_new_tokens  # Dr. GRPO's constant normalizer
        self.device = next(model.parameters()).device
        self.params = adapter_parameters(model)
        self.optimizer = AdapterAdamW(self.params, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
                                      weight_decay=train_cfg.weight_decay, state_dtype=train_cfg.optimizer_dtype,
                                      offload=train_cfg.optimizer_offload)
        self.updates_done = 0
        self.has_value_head = hasattr(model, "value_head")

    @torch.no_grad()
    def score(self, batch: RolloutBatch, *, reference: bool = False, model: DecoderLM | None = None,
              ) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Per-token logprobs [batch, seq-1] (and values when there is a value head).

        ``reference`` runs with the adapter disabled; ``model`` scores with another model (a teacher).
        """
        net = model or self.model
        with_values = model is None and not reference and self.has_value_head
        was_training = net.training
        net.eval()
        logprobs = torch.zeros_like(batch.response_mask)
        values = torch.zeros_like(batch.response_mask) if with_values else None
        size = self.train_cfg.micro_batch_size
        try:
            for start in range(0, len(batch), size):
                index = torch.arange(start, min(start + size, len(batch)))
                micro = batch.select(index).trimmed().to(self.device)
                inputs = micro.input_ids[:, :-1]
                if reference:
                    with adapter_disabled(net):
                        logits = net(inputs)
                elif with_values:
                    logits, hidden = net(inputs, return_hidden=True)
                    values[index, : logits.shape[1]] = values_from_hidden(net, hidden).cpu()
                else:
                    logits = net(inputs)
                part = token_logprobs(logits, micro.input_ids[:, 1:], self.temperature)
                logprobs[index, : part.shape[1]] = part.cpu()
        finally:
            net.train(was_training)
        return logprobs, values

    def logprobs(self, batch: RolloutBatch, *, reference: bool = False) -> torch.Tensor:
        return self.score(batch, reference=reference)[0]

    def _set_lr(self) -> float:
        t = self.train_cfg
        lr = lr_at(self.updates_done, self.total_updates, t.lr, t.lr_schedule, t.warmup_steps, t.min_lr)
        self.optimizer.param_groups[0]["lr"] = lr
        return lr

    def _micro_loss(self, micro: RolloutBatch) -> dict[str, torch.Tensor]:
        rl = self.rl_cfg
        if self.has_value_head:
            logits, hidden = self.model(micro.input_ids[:, :-1], return_hidden=True)
        else:
            logits, hidden = self.model(micro.input_ids[:, :-1]), None
        mask = micro.response_mask
        logprobs = token_logprobs(logits, micro.input_ids[:, 1:], self.temperature)
        if rl.advantage_estimator == "gspo":
            pg_loss, clip_fraction = gspo_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask,
                                                      rl.eps_clip, rl.eps_clip_high)
        else:
            pg_loss, clip_fraction = clipped_policy_loss(logprobs, micro.old_logprobs, micro.advantages, mask, rl.eps_clip,
                                                         rl.eps_clip_high, rl.loss_agg, micro.tis_weights, self.norm_length)
        parts = {"pg_loss": pg_loss, "clip_fraction": clip_fraction}
        loss = pg_loss
        entropy = aggregate(token_entropy(logits, self.temperature), mask, rl.loss_agg, self.norm_length)
        parts["entropy"] = entropy
        if rl.entropy_coef:
            loss = loss - rl.entropy_coef * entropy
        if micro.ref_logprobs is not None:
            kl = aggregate(kl_estimate(logprobs, micro.ref_logprobs, rl.kl_type), mask, rl.loss_agg, self.norm_length)
            parts["kl"] = kl
            if rl.use_kl_loss:
                loss = loss + rl.kl_coef * kl
        if hidden is not None and micro.returns is not None:
            values = values_from_hidden(self.model, hidden)
            value_loss, value_clip_fraction = clipped_value_loss(values, micro.old_values, micro.returns, mask, rl.value_clip,
                                                                 rl.loss_agg, self.norm_length)
            parts.update(value_loss=value_loss, value_clip_fraction=value_clip_fraction)
            loss = loss + rl.value_loss_coef * value_loss
        parts["loss"] = loss
        return parts

    def update(self, batch: RolloutBatch) -> dict[str, float]:
        """One optimizer step over ``batch`` (= one global batch), in micro-batches."""
        t = self.train_cfg
        self.model.train()
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        # each micro-batch weighs its share of the global normalizer: tokens for token-mean, else sequences
        by_tokens = self.rl_cfg.loss_agg == "token-mean" and self.rl_cfg.advantage_estimator != "gspo"
        total = float(batch.response_mask.sum().clamp(min=1.0)) if by_tokens else float(len(batch))
        sums: dict[str, float] = {}
        for start in range(0, len(batch), t.micro_batch_size):
            micro = batch.select(torch.arange(start, min(start + t.micro_batch_size, len(batch)))).trimmed().to(self.device)
            weight = (float(micro.response_mask.sum()) if by_tokens else float(len(micro))) / total
            parts = self._micro_loss(micro)
            (parts["loss"] * weight).backward()
            for key, value in parts.items():
                sums[key] = sums.get(key, 0.0) + float(value.detach()) * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.optimizer.step()
        project_oft_(self.model)
        self.updates_done += 1
        return {**sums, "grad_norm": float(grad_norm), "lr": lr}

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return adapter_state_dict(self.model)

    def state_dict(self) -> dict[str, Any]:
        return {"optimizer": self.optimizer.state_dict(), "updates_done": self.updates_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.updates_done = int(state["updates_done"])

    def load_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None:
        load_adapter_state_dict(self.model, adapter, source)
