"""The mixture-of-experts block (Qwen3-MoE, and Qwen2-MoE's gated shared expert), beside the dense MLP.

Routing: ``softmax(x W_gate)`` in fp32, the top ``k`` experts per token, renormalized when
``norm_topk_prob``; each token's output is the routing-weighted sum of its experts' SwiGLU MLPs,
plus ``sigmoid(x w_shared) * shared_expert(x)`` for Qwen2-MoE. Only the experts that some token
routes to run. Weights load by the per-expert names HF checkpoints use
(``mlp.experts.{e}.gate_proj.weight``, ``mlp.gate.weight``, ``mlp.shared_expert...``).
"""

from __future__ import annotations

import torch
from torch import nn

from orbit_core.models.config import DecoderConfig


class SparseMoE(nn.Module):
    def __init__(self, config: DecoderConfig):
        super().__init__()
        from orbit_core.models.transformer import MLP

        moe = config.moe
        self.top_k, self.norm_topk_prob = moe.experts_per_token, moe.norm_topk_prob
        self.gate = nn.Linear(config.hidden_size, moe.num_experts, bias=False)
        self.experts = nn.ModuleList(MLP(config, moe.expert_intermediate_size) for _ in range(moe.num_experts))
        if moe.shared_expert_intermediate_size:
            self.shared_expert = MLP(config, moe.shared_expert_intermediate_size)
            self.shared_expert_gate = nn.Linear(config.hidden_size, 1, bias=False)
        else:
            self.shared_expert = None

    def route(self, tokens: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """tokens [n, hidden] -> (routing weights [n, k] in the activation dtype, expert ids [n, k])."""
        logits = self.gate(tokens)
        weights, experts = torch.topk(torch.softmax(logits, dim=-1, dtype=torch.float32), self.top_k, dim=-1)
        if self.norm_topk_prob:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        return weights.to(logits.dtype), experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        tokens = x.reshape(-1, x.shape[-1])
        weights, experts = self.route(tokens)
        out = torch.zeros_like(tokens)
        for expert in experts.unique().tolist():  # experts in increasing order, each on its own tokens
            token, slot = (experts == expert).nonzero(as_tuple=True)
            part = self.experts[expert](tokens[token]) * weights[token, slot, None]
            out.index_add_(0, token, part.to(out.dtype))
        if self.shared_expert is not None:
            out = out + torch.sigmoid(self.shared_expert_gate(tokens)) * self.shared_expert(tokens)
        return out.view_as(x)
