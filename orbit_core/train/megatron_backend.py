"""The ``megatron`` trainer backend: the frozen base in a megatron-core ``GPTModel``, the adapter on
its linears, and the torch backend's RL losses and optimizer over those adapter tensors.

Adapters keep HF names on the way out (checkpoints, engine syncs), so the engine, ``export-adapter``
and ``merge-adapter`` work unchanged. The builtin engine keeps its own ``DecoderLM`` copy of the
base; after every optimizer step the adapter is copied into it, so the colocated engine and eval
sample from the adapter just trained.
"""

from __future__ import annotations

import torch

from orbit_core.config.schema import RecipeConfig
from orbit_core.models.megatron_gpt import MegatronLM, hf_names, load_megatron_policy
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.base import adapter_state_dict, load_adapter_state_dict
from orbit_core.peft.slots import engine_adapter_state
from orbit_core.peft.value_head import attach_value_head
from orbit_core.policy.build import PolicyModel, apply_adapter
from orbit_core.train.torch_backend import TorchTrainer


class MegatronTrainer(TorchTrainer):
    def __init__(self, policy: PolicyModel, config: RecipeConfig, teacher: DecoderLM | None = None):
        model: MegatronLM = load_megatron_policy(policy.base_path, config.model.dtype, policy.device)
        apply_adapter(model, config.peft)
        if config.rl.value_head:
            attach_value_head(model, model.config.hidden_size)
        model.to(policy.device)
        self.engine_model = policy.model
        modules = hf_names(model)
        self.to_hf = {f"{m}.{leaf}": f"{h}.{leaf}" for m, h in modules.items()
                      for leaf in ("lora_A", "lora_B", "oft_skew")}
        self.from_hf = {h: m for m, h in self.to_hf.items()}
        super().__init__(model, config, teacher)
        # both sides start from the policy's adapter init (the same seed as a torch-backend run)
        self.load_adapter(adapter_state_dict(policy.model), "the initial adapter")

    def _rename(self, state: dict[str, torch.Tensor], names: dict[str, str]) -> dict[str, torch.Tensor]:
        return {names.get(name, name): tensor for name, tensor in state.items()}

    def update(self, batch) -> dict[str, float]:
        stats = super().update(batch)
        if not stats["update_skipped"]:
            load_adapter_state_dict(self.engine_model, self.adapter_state(), "the trainer's adapter")
        return stats

    def adapter_state(self) -> dict[str, torch.Tensor]:
        return self._rename(adapter_state_dict(self.model), self.to_hf)

    def engine_adapter_state(self) -> dict[str, torch.Tensor]:
        return self._rename(engine_adapter_state(self.model), self.to_hf)

    def load_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None:
        load_adapter_state_dict(self.model, self._rename(adapter, self.from_hf), source)
        load_adapter_state_dict(self.engine_model, adapter, source)
