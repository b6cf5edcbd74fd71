"""The ``megatron`` trainer backend: the frozen base in a megatron-core ``GPTModel``, the adapter on
its linears, and the torch backend's RL losses and optimizer over those adapter tensors.

Adapters keep HF names on the way out (checkpoints, engine syncs), so the engine, ``export-adapter``
and ``merge-adapter`` work unchanged. The builtin engine keeps its own ``DecoderLM`` copy of the
base; after every optimizer step the adapter is copied into it, so the colocated engine and eval
sample from the adapter just trained.

With ``train.tensor_parallel > 1`` this process is rank 0 of the tensor-parallel group
(``megatron_tp.py``): each call that runs the model goes to every rank first. Adapters and
optimizer state are gathered from the ranks whenever they leave the trainer.
"""

from __future__ import annotations

import contextlib
import os
from typing import Any

import torch
from torch import nn

from orbit_core.config.schema import RecipeConfig
from orbit_core.errors import OrbitError
from orbit_core.models.transformer import DecoderLM
from orbit_core.peft.base import adapter_state_dict, load_adapter_state_dict
from orbit_core.peft.slots import ADAPTER_TENSORS
from orbit_core.policy.build import PolicyModel
from orbit_core.train.megatron_tp import RankGroup, ShardTrainer, parallel_sizes, unshard_adapter


def megatron_base_dir(base_path: str, config: RecipeConfig) -> str:
    """The base converted once for the ranks to load their shards from (kept beside the run)."""
    from orbit_core.convert.megatron import hf_to_megatron

    out = os.path.join(config.train.output_dir, "megatron-base")
    if not os.path.isdir(out):
        hf_to_megatron(base_path, out)
    return out


class _AllRanks(nn.Module):
    """The model as the runtime preflight calls it: every rank runs the forward."""

    def __init__(self, trainer: "MegatronTrainer"):
        super().__init__()
        self._trainer = [trainer]  # not a submodule: the parameters stay the trainer's
        ep = trainer.size // trainer.tp
        self.implementation = f"megatron-core GPTModel, TP={trainer.tp}" + (f", EP={ep}" if ep > 1 else "")

    def parameters(self, recurse: bool = True):
        return self._trainer[0].model.parameters(recurse)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        trainer = self._trainer[0]
        with trainer._together("logits", input_ids.cpu()):
            return trainer.model(input_ids)


class MegatronTrainer(ShardTrainer):
    def __init__(self, policy: PolicyModel, config: RecipeConfig, teacher: DecoderLM | None = None):
        tp, ep = parallel_sizes(config)
        size = tp * ep
        megatron_dir, self.ranks = None, None
        c = policy.model.config
        if ep > 1:
            if c.moe is None or c.moe.num_experts % ep:
                raise OrbitError(f"train.expert_parallel={ep} needs an MoE base whose experts it divides "
                                 f"({c.model_type}, {c.moe.num_experts if c.moe else 0} experts)",
                                 "use train.expert_parallel=1, or a number of ranks that divides the experts")
            self.ranks = RankGroup(size, config, policy.base_path, None, policy.device)
        elif size > 1:
            if c.moe is not None:
                raise OrbitError("train.tensor_parallel > 1 does not split MoE models (megatron needs sequence "
                                 "parallelism there)", "use train.expert_parallel instead")
            for what, n in (("vocab_size", c.vocab_size), ("num_attention_heads", c.num_heads),
                            ("num_key_value_heads", c.num_kv_heads), ("intermediate_size", c.intermediate_size)):
                if n % size:
                    raise OrbitError(f"train.tensor_parallel={size} does not divide the model's {what} ({n})",
                                     "use a train.tensor_parallel that divides it")
            megatron_dir = megatron_base_dir(policy.base_path, config)
            self.ranks = RankGroup(size, config, policy.base_path, megatron_dir, policy.device)
        try:
            super().__init__(config, policy.base_path, megatron_dir, policy.device, 0, size, teacher)
            self.engine_model = policy.model
            self.parity_model = self.model if size == 1 else _AllRanks(self)
            # every rank starts from the policy's adapter init (the same seed as a torch-backend run)
            self.load_adapter(adapter_state_dict(policy.model), "the initial adapter")
        except BaseException:
            self.close()
            raise

    @contextlib.contextmanager
    def _together(self, command: str, payload: Any = None):
        """The other ranks run ``command`` while this one runs the body. An exception out of the body
        leaves them inside a collective, so ``close`` then stops them instead of waiting."""
        if self.ranks is None:
            yield
            return
        self.ranks.send(command, payload)
        yield
        self.ranks.in_call = False

    def score(self, batch):
        with self._together("score", batch):
            return super().score(batch)

    def reference_logprobs(self, batch):
        with self._together("reference", batch):
            return super().reference_logprobs(batch)

    def update(self, batch) -> dict[str, float]:
        with self._together("update", batch):
            stats = super().update(batch)
        if not stats["update_skipped"]:
            load_adapter_state_dict(self.engine_model, self.adapter_state(), "the trainer's adapter")
        return stats

    def adapter_state(self) -> dict[str, torch.Tensor]:
        if self.ranks is None or self.tp == 1:  # expert parallel: every rank holds the whole adapter
            return self._rename(adapter_state_dict(self.model), self.to_hf)
        return unshard_adapter(self.ranks.gather("adapter", self.shard_state()))

    def engine_adapter_state(self) -> dict[str, torch.Tensor]:
        return {n: t for n, t in self.adapter_state().items() if n.rsplit(".", 1)[-1] in ADAPTER_TENSORS}

    def load_adapter(self, adapter: dict[str, torch.Tensor], source: str) -> None:
        with self._together("load_adapter", adapter):
            self.load_whole_adapter(adapter, source)
        load_adapter_state_dict(self.engine_model, adapter, source)

    def state_dict(self) -> dict[str, Any]:
        if self.ranks is None:
            return self.optimizer_state()
        ranks = self.ranks.gather("state", self.optimizer_state())
        return {"ranks": ranks, "updates_done": self.updates_done}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if self.ranks is None:
            return super().load_state_dict(state)
        if len(state.get("ranks", [])) != self.size:
            raise OrbitError(f"the checkpoint's optimizer state is not from {self.size} tensor-parallel ranks",
                             "resume with the train.tensor_parallel it was written with")
        with self._together("load_state", state):
            super().load_state_dict(state["ranks"][0])

    def close(self) -> None:
        if self.ranks is not None:
            self.ranks.close()
            self.ranks = None
