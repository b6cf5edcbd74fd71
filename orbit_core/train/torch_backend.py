"""The ``torch`` trainer backend: native PyTorch, AdamW over adapter parameters only."""

from __future__ import annotations

from typing import Any, Protocol

import torch

from orbit_core.config.schema import RLSection, TrainSection
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.lora import adapter_disabled, adapter_parameters, adapter_state_dict, load_adapter_state_dict
from orbit_core.rl.kl import kl_estimate
from orbit_core.rl.logprobs import token_entropy, token_logprobs
from orbit_core.rl.losses import clipped_policy_loss, masked_mean
from orbit_core.train.batch import RolloutBatch
from orbit_core.train.schedule import lr_at


class TrainerBackend(Protocol):
    def logprobs(self, batch: RolloutBatch, *, reference: bool = False) -> torch.Tensor: ...
    def update(self, batch: RolloutBatch, global_batch_size: int) -> dict[str, float]: ...
    def adapter_state(self) -> dict[str, torch.Tensor]: ...
    def state_dict(self) -> dict[str, Any]: ...
    def load_state_dict(self, state: dict[str, Any]) -> None: ...


class TorchTrainer:
    def __init__(self, model: DecoderLM, train_cfg: TrainSection, rl_cfg: RLSection, temperature: float, total_updates: int):
        self.model = model
        self.train_cfg, self.rl_cfg = train_cfg, rl_cfg
        self.temperature = temperature
        self.total_updates = max(total_updates, 1)
        self.device = next(model.parameters()).device
        self.params = adapter_parameters(model)
        self.optimizer = torch.optim.AdamW(
            self.params, lr=train_cfg.lr, betas=(train_cfg.adam_beta1, train_cfg.adam_beta2),
            weight_decay=train_cfg.weight_decay,
        )
        self.updates_done = 0

    def _forward(self, batch: RolloutBatch) -> torch.Tensor:
        return self.model(batch.input_ids[:, :-1])

    @torch.no_grad()
    def logprobs(self, batch: RolloutBatch, *, reference: bool = False, micro_batch_size: int | None = None) -> torch.Tensor:
        """Per-token logprobs [batch, seq-1] of the targets; ``reference`` runs with the adapter disabled."""
        was_training = self.model.training
        self.model.eval()
        size = micro_batch_size or self.train_cfg.micro_batch_size
        out = torch.zeros_like(batch.response_mask)
        try:
            for start in range(0, len(batch), size):
                index = torch.arange(start, min(start + size, len(batch)))
                micro = batch.select(index).trimmed().to(self.device)
                if reference:
                    with adapter_disabled(self.model):
                        logits = self._forward(micro)
                else:
                    logits = self._forward(micro)
                values = token_logprobs(logits, micro.input_ids[:, 1:], self.temperature)
                out[index, : values.shape[1]] = values.cpu()
        finally:
            self.model.train(was_training)
        return out

    def _set_lr(self) -> float:
        t = self.train_cfg
        lr = lr_at(self.updates_done, self.total_updates, t.lr, t.lr_schedule, t.warmup_steps, t.min_lr)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        return lr

    def update(self, batch: RolloutBatch, global_batch_size: int) -> dict[str, float]:
        """One optimizer step over ``batch`` (= one global batch), in micro-batches."""
        rl, t = self.rl_cfg, self.train_cfg
        self.model.train()
        lr = self._set_lr()
        self.optimizer.zero_grad(set_to_none=True)
        total_tokens = float(batch.response_mask.sum().clamp(min=1.0))
        sums = {"loss": 0.0, "pg_loss": 0.0, "kl": 0.0, "entropy": 0.0, "clip_fraction": 0.0}
        for start in range(0, len(batch), t.micro_batch_size):
            micro = batch.select(torch.arange(start, min(start + t.micro_batch_size, len(batch)))).trimmed().to(self.device)
            # token-mean over the whole global batch: weight each micro-batch by its token share
            weight = float(micro.response_mask.sum()) / total_tokens
            logits = self._forward(micro)
            logprobs = token_logprobs(logits, micro.input_ids[:, 1:], self.temperature)
            pg_loss, clip_fraction = clipped_policy_loss(
                logprobs, micro.old_logprobs, micro.advantages, micro.response_mask, rl.eps_clip, rl.eps_clip_high, rl.loss_agg,
            )
            loss = pg_loss
            entropy = masked_mean(token_entropy(logits, self.temperature), micro.response_mask)
            if rl.entropy_coef:
                loss = loss - rl.entropy_coef * entropy
            kl = torch.zeros(())
            if micro.ref_logprobs is not None:
                kl = masked_mean(kl_estimate(logprobs, micro.ref_logprobs, rl.kl_type), micro.response_mask)
                if rl.use_kl_loss:
                    loss = loss + rl.kl_coef * kl
            (loss * weight).backward()
            for key, value in (("loss", loss), ("pg_loss", pg_loss), ("kl", kl), ("entropy", entropy), ("clip_fraction", clip_fraction)):
                sums[key] += float(value.detach()) * weight
        grad_norm = torch.nn.utils.clip_grad_norm_(self.params, t.grad_clip if t.grad_clip > 0 else float("inf"))
        self.optimizer.step()
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
