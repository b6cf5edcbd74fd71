"""The mixture-of-experts block (Qwen3-MoE, and Qwen2-MoE's gated shared expert), beside the dense MLP.

Routing: ``softmax(x W_gate)`` in fp32, the top ``k`` experts per token, renormalized when
``norm_topk_prob``; each token's output is the routing-weighted sum of its experts' SwiGLU MLPs,
plus ``sigmoid(x w_shared) * shared_expert(x)`` for Qwen2-MoE. Only the experts that some token
routes to run. Weights load by the per-expert names HF checkpoints use
(``mlp.experts.{e}.gate_proj.weight``, ``mlp.gate.weight``, ``mlp.shared_expert...``).

Routing can be traced and replayed (``moe_routing``): the engine records each token's experts per
MoE layer, and the trainer can log how often its own choice differs (a source of engine/trainer
mismatch in RL) or replay the engine's choice so both compute the same experts.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import torch
from torch import nn

from orbit_core.models.config import DecoderConfig
from orbit_core.models.mlp import MLP
from orbit_core.models.moe_experts import routed_experts


class SparseMoE(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        moe = config.moe
        self.top_k, self.norm_topk_prob = moe.experts_per_token, moe.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, moe.expert_intermediate_size) for _ in range(moe.num_experts))
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(config, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    trace: list[torch.Tensor] | None = None
    """When a list, each forward appends its own top-k choice [tokens, k] (set by ``moe_routing``)."""
    replay: torch.Tensor | None = None
    """Expert ids [tokens, k] to use instead of this layer's own top-k (set by ``moe_routing``)."""

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, hidden] -> (routing weights [n, k] in the activation dtype, expert ids [n, k])."""
        logits = self.gate(tokens)
        probs = torch.softmax(logits, dim=-1, dtype=torch.float32)
        weights, experts = torch.topk(probs, self.top_k, dim=-1)
        if self.trace is not None:
            self.trace.append(experts)
        if self.replay is not None:
            experts = self.replay.to(experts.device, torch.long)
            weights = probs.gather(-1, experts)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts

    dequant_chunk: int = 16
    """Packed experts: dequantize the active ones this many at a time into a reused buffer and run
    them as a grouped GEMM (``moe_experts``); 0 runs each active expert's own modules."""
    experts_dequantized: int = 0
    """Experts dequantized by the chunked path since the last reset (forward and backward)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(tokens)
        if self.dequant_chunk and _packed(self.experts[0]):
            out = routed_experts(self, tokens, weights, experts)
        else:
            out = torch.zeros_like(tokens)
            for expert in experts.unique().tolist():  # experts in increasing order, each on its own tokens
                token, slot = (experts == expert).nonzero(as_tuple=True)
                part = self.experts[expert](tokens[token]) * weights[token, slot, None]
                out.index_add_(0, token, part.to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.view_as(x)


def _packed(expert: MLP) -> bool:
    """Packed linears (quant's ``QuantLinear``: they dequantize), bare or under LoRA or OFT (without
    engine slots or fake QAT); dense experts run each expert's own modules."""
    for name in ("gate_proj", "up_proj", "down_proj"):
        module = getattr(expert, name)
        if hasattr(module, "lora_A") or hasattr(module, "oft_skew"):
            if module.slot_bank is not None or module.fake_quant is not None:
                return False
            module = module.base
        if not hasattr(module, "dequantized"):
            return False
    return True


def moe_layers(model: nn.Module) -> list[SparseMoE]:
    return [m for m in model.modules() if isinstance(m, SparseMoE)]


def set_dequant_chunk(model: nn.Module, chunk: int, grouped_gemm: str | None = None) -> None:
    """``moe.dequant_chunk_experts`` on every MoE layer (a chunk smaller than top-k is refused), and
    ``moe.grouped_gemm`` for this process when given."""
    from orbit_core.errors import OrbitError
    from orbit_core.models.moe_experts import GROUPED_MM

    if grouped_gemm is not None and moe_layers(model):
        GROUPED_MM["impl"] = grouped_gemm

    for layer in moe_layers(model):
        if chunk < 0 or 0 < chunk < layer.top_k:
            raise OrbitError(f"moe.dequant_chunk_experts={chunk} is smaller than the model's top-k ({layer.top_k})",
                             f"use at least {layer.top_k} (or 0 to run each expert's own modules)")
        layer.dequant_chunk = chunk


def take_dequant_count(model: nn.Module) -> int | None:
    """Experts dequantized by the chunked path since the last call (None: no MoE layer)."""
    layers = moe_layers(model)
    if not layers:
        return None
    count = sum(layer.experts_dequantized for layer in layers)
    for layer in layers:
        layer.experts_dequantized = 0
    return count


@contextlib.contextmanager
def moe_routing(model: nn.Module, replay: torch.Tensor | None = None) -> Iterator[list[list[torch.Tensor]]]:
    """Trace every MoE layer's own choice during the forwards inside; with ``replay`` ([..., layers, k],
    leading dims flattened to the forward's tokens), route by it instead. Yields the per-layer traces."""
    layers = moe_layers(model)
    traces: list[list[torch.Tensor]] = [[] for _ in layers]
    for i, layer in enumerate(layers):
        layer.trace = traces[i]
        layer.replay = None if replay is None else replay[..., i, :].reshape(-1, replay.shape[-1])
    try:
        yield traces
    finally:
        for layer in layers:
            layer.trace = layer.replay = None


def stack_trace(traces: list[list[torch.Tensor]], index: int = 0) -> torch.Tensor:
    """The ``index``-th forward's choices of every layer -> [tokens, layers, k]."""
    return torch.stack([t[index] for t in traces], dim=1)
