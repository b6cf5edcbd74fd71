"""Mixture-of-experts bases in the megatron-core ``GPTModel`` (``train.backend=megatron``).

The MoE block is megatron-core's own: ``TopKRouter``, the all-gather token dispatcher and a
``SequentialMLP`` of this rank's experts. Under expert parallelism (``train.expert_parallel=N``,
megatron's EP group) each rank holds experts ``[r * E/N, (r+1) * E/N)``. The dispatcher gathers
the group's tokens, each rank runs its experts on the tokens routed to them, and a reduce-scatter
returns each rank the combined output for its own tokens. The all-gather dispatcher is used because
megatron's all-to-all one needs CUDA streams, and one dispatcher on CPU and GPU keeps the tested
path the one that runs.

Routing matches Qwen3-MoE. With ``norm_topk_prob``, the router takes the top k logits and then a
softmax over them, which equals softmax, top k, renormalize. Without it, the softmax runs over all
experts first and the top k are not renormalized. The router runs in fp32, as Orbit's does.

Weights are read straight from the HF safetensors, one tensor at a time. Each rank keeps only its
own experts, so no rank holds the whole model, and no Megatron checkpoint is written for MoE bases.
"""

from __future__ import annotations

import torch

from orbit_core.errors import OrbitError
from orbit_core.models.config import DecoderConfig


def check_moe(c: DecoderConfig) -> None:
    moe = c.moe
    if moe.shared_expert_intermediate_size:
        raise OrbitError(f"train.backend=megatron does not build shared experts yet ({c.model_type})",
                         "use train.backend=torch for this model")
    if moe.mlp_only_layers or moe.decoder_sparse_step != 1:
        raise OrbitError("train.backend=megatron builds MoE models whose every layer is sparse; this one has dense "
                         f"layers (mlp_only_layers={list(moe.mlp_only_layers)}, decoder_sparse_step={moe.decoder_sparse_step})",
                         "use train.backend=torch for this model")


def moe_config_fields(c: DecoderConfig) -> dict:
    """The TransformerConfig fields of the MoE block; none for a dense model."""
    if c.moe is None:
        return {}
    check_moe(c)
    from megatron.core.transformer.moe import moe_utils

    # megatron-core 0.16 tests ``te_general_gemm is not None`` in the fp32 router, but defines the
    # name only when Transformer Engine imports; without TE the router raised NameError
    if not hasattr(moe_utils, "te_general_gemm"):
        moe_utils.te_general_gemm = None
    return dict(num_moe_experts=c.moe.num_experts, moe_router_topk=c.moe.experts_per_token,
                moe_ffn_hidden_size=c.moe.expert_intermediate_size, moe_token_dispatcher_type="allgather",
                moe_router_pre_softmax=not c.moe.norm_topk_prob, moe_router_dtype="fp32",
                moe_router_load_balancing_type="none", moe_aux_loss_coeff=0.0, moe_permute_fusion=False)


def is_moe_layer(mlp) -> bool:
    return hasattr(mlp, "router")


def local_experts(gpt) -> list[int]:
    """The global expert ids this rank holds, in ``local_experts`` order."""
    return [int(e) for e in gpt.decoder.layers[0].mlp.local_expert_indices]


def _target(name: str, experts: dict[int, int]) -> tuple[str, int | None] | None:
    """HF tensor name -> (GPTModel parameter, row block of a fused one) or None (another rank's expert).
    Row blocks: 0/1/2 = q/k/v of ``linear_qkv``, 0/1 = gate/up of ``linear_fc1``."""
    if name == "model.embed_tokens.weight":
        return "embedding.word_embeddings.weight", None
    if name == "model.norm.weight":
        return "decoder.final_layernorm.weight", None
    if name == "lm_head.weight":
        return "output_layer.weight", None
    parts = name.split(".")
    if parts[:2] != ["model", "layers"]:
        raise KeyError(name)
    layer, rest = f"decoder.layers.{parts[2]}.", ".".join(parts[3:])
    fixed = {"input_layernorm.weight": ("input_layernorm.weight", None),
             "post_attention_layernorm.weight": ("pre_mlp_layernorm.weight", None),
             "self_attn.o_proj.weight": ("self_attention.linear_proj.weight", None),
             "self_attn.q_norm.weight": ("self_attention.q_layernorm.weight", None),
             "self_attn.k_norm.weight": ("self_attention.k_layernorm.weight", None),
             "mlp.gate.weight": ("mlp.router.weight", None)}
    for i, proj in enumerate(("q_proj", "k_proj", "v_proj")):
        for leaf in ("weight", "bias"):
            fixed[f"self_attn.{proj}.{leaf}"] = (f"self_attention.linear_qkv.{leaf}", i)
    if rest in fixed:
        target, block = fixed[rest]
        return layer + target, block
    if rest.startswith("mlp.experts."):
        expert, proj = int(parts[5]), parts[6]
        if expert not in experts:
            return None
        local = f"mlp.experts.local_experts.{experts[expert]}."
        return {"gate_proj": (layer + local + "linear_fc1.weight", 0), "up_proj": (layer + local + "linear_fc1.weight", 1),
                "down_proj": (layer + local + "linear_fc2.weight", None)}[proj]
    raise KeyError(name)


def load_moe_from_hf(gpt, c: DecoderConfig, base_path: str) -> None:
    """Fill the GPTModel from the HF checkpoint, reading one tensor at a time; this rank's experts only."""
    from orbit_core.convert.megatron import _qkv_order
    from orbit_core.models.checkpoint import iter_tensors, weight_files

    params = dict(gpt.named_parameters())
    experts = {e: i for i, e in enumerate(local_experts(gpt))}
    pending: dict[str, dict[int, torch.Tensor]] = {}  # fused parameters waiting for their blocks
    filled = set()
    for name, tensor in iter_tensors(weight_files(base_path)):
        try:
            found = _target(name, experts)
        except (KeyError, IndexError, ValueError):
            raise OrbitError(f"{base_path}: tensor {name} has no place in megatron-core's MoE GPTModel",
                             "use train.backend=torch for this model") from None
        if found is None or (name == "lm_head.weight" and c.tie_word_embeddings):
            continue
        target, block = found
        if target not in params:
            raise OrbitError(f"{base_path}: {name} maps to {target}, which this GPTModel lacks",
                             "the checkpoint does not match its config.json")
        if block is not None:
            count = 3 if "linear_qkv" in target else 2
            blocks = pending.setdefault(target, {})
            blocks[block] = tensor
            if len(blocks) < count:
                continue
            del pending[target]
            tensor = _qkv_order(c, blocks[0], blocks[1], blocks[2]) if count == 3 else torch.cat([blocks[0], blocks[1]])
        with torch.no_grad():
            if params[target].shape != tensor.shape:
                raise OrbitError(f"{base_path}: {name} gives {target} the shape {tuple(tensor.shape)}, the model "
                                 f"asks for {tuple(params[target].shape)}", "the checkpoint does not match its config.json")
            params[target].copy_(tensor)
        filled.add(target)
    missing = sorted(set(params) - filled)
    if missing:
        raise OrbitError(f"{base_path} did not fill {missing[0]} of the MoE GPTModel",
                         "the checkpoint is incomplete or of another architecture")
